"""Seconds and network evaluations (NFE) per image of each sampler, at the CIFAR-10 network size.

The network has random weights (the cost of an evaluation does not depend on training). Each sampler runs a few
steps on a few images; every call of the network (through the denoiser or its score) is timed inside the run, so the sampler's own overhead
(its arithmetic and noise between the calls) is measured against its baseline, the network calls, in the same
run. Seconds per image at the sampler's default number of steps are extrapolated per NFE.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.report import Stat
from benchmarks.training import NetConfig, sync
from lit_score.diffusion.denoiser import Denoiser
from lit_score.sampling import DPMSolverPP, EDMSampler, ODESampler, PCSampler, Sampler


@dataclass(frozen=True)
class SamplerCase:
    """A sampler with few steps for the measurement, and its NFE at its default settings (None: adaptive)."""

    name: str
    make: Callable[[int], Sampler]
    default_nfe: int | None


def sampler_cases(sde_n: int) -> list[SamplerCase]:
    """PC (the paper's VE sampler: reverse diffusion + Langevin, 2 NFE per level), RK45 ODE, EDM Heun
    (deterministic and stochastic, 2N - 1 NFE), DPM-Solver++(2M) (N NFE)."""
    return [
        SamplerCase("PC reverse diffusion + Langevin", lambda s: PCSampler("reverse_diffusion", "langevin", snr=0.16,
                                                                             steps=s, denoise=True), 2 * sde_n),
        SamplerCase("ODE RK45 (rtol = atol = 1e-5)", lambda s: ODESampler(rtol=1e-5, atol=1e-5), None),
        SamplerCase("EDM Heun, 18 steps", lambda s: EDMSampler(steps=s), 2 * 18 - 1),
        SamplerCase("EDM stochastic (S_churn 40), 18 steps", lambda s: EDMSampler(steps=s, S_churn=40.0, S_min=0.05,
                                                                                  S_max=50.0, S_noise=1.003), 35),
        SamplerCase("DPM-Solver++(2M), 20 steps", lambda s: DPMSolverPP(steps=s), 20),
    ]


class TimedDenoiser(Denoiser):
    """A denoiser that times each of its evaluations, D or score (device-synchronised)."""

    def __init__(self, inner: Denoiser, device: torch.device) -> None:
        self.inner, self.sde, self.device, self.seconds = inner, inner.sde, device, []

    def _timed(self, fn: Callable[[], Tensor]) -> Tensor:
        sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        sync(self.device)
        self.seconds.append(time.perf_counter() - t0)
        return out

    def __call__(self, x_hat, sigma, cond=None):
        return self._timed(lambda: self.inner(x_hat, sigma, cond))

    def score(self, x, t, cond=None):
        return self._timed(lambda: self.inner.score(x, t, cond))


@torch.no_grad()
def measure_sampling(config: NetConfig, batch: int, steps: int, device: torch.device,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per sampler: measured NFE, seconds per NFE per image, overhead over the network calls, and the
    extrapolated seconds per image at the sampler's default NFE."""
    torch.manual_seed(0)
    net, sde, _ = config.build()
    net = net.to(device).eval()
    shape = tuple(net.data_shape)
    seeds = list(range(batch))
    rows = []
    D = NetConfig.denoiser(net, sde)
    D.score(torch.rand(batch, *shape, device=device), torch.full((batch,), 0.5, device=device))  # warm-up
    for case in sampler_cases(sde.N):
        timed = TimedDenoiser(D, device)
        sync(device)
        t0 = time.perf_counter()
        result = case.make(steps).sample(timed, sde, shape, seeds, device)
        sync(device)
        total = time.perf_counter() - t0
        calls, network = len(timed.seconds), sum(timed.seconds)
        per_nfe = Stat.of([s / batch for s in timed.seconds])
        s_per_nfe_image = total / calls / batch
        default = case.default_nfe
        rows.append({"config": config.name, "sampler": case.name, "batch": batch, "steps": steps,
                     "nfe": result.nfe, "calls": calls, "s_per_image": total / batch,
                     "s_per_nfe_per_image": per_nfe, "overhead": (total - network) / network,
                     "default_nfe": default,
                     "est_s_per_image": (default or result.nfe) * s_per_nfe_image})
        log(f"  sampling {case.name}: {result.nfe} NFE, {total:.3g}s for {batch} images")
    return rows
