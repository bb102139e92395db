"""Sampling a consistency model: one or a few evaluations of the consistency function
(Song et al. 2023, "Consistency Models", Algorithm 1; as Easy Consistency Tuning samples, Geng et al. 2024)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Counted, Denoiser
from lit_score.diffusion.sdes import SDE
from lit_score.rng import SeededNoise
from lit_score.sampling.base import SampleResult, Sampler, _is_real, check_int, check_real, initial_noise
from lit_score.sampling.sigma import sigma_like

ECT_SIGMA_2STEP = 0.821  # ECT's intermediate level for 2-step sampling on CIFAR-10 (Geng et al. 2024)
DEFAULT_SIGMAS = ("[0.821] for 2 steps (ECT), else the inner levels of EDM's rho = 7 schedule of steps + 1 levels "
                  "from sigma_max to sigma_min")


def default_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The intermediate levels s_1 > ... > s_{steps-1} used when none are given: ECT's [0.821] for 2 steps, else
    sigma_1, ..., sigma_{steps-1} of EDM's schedule from sigma_0 = sigma_max to sigma_steps = sigma_min
    (Karras et al. 2022, eq. 5)."""
    if steps == 2:
        return [ECT_SIGMA_2STEP]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / steps * (b - a)) ** rho for i in range(1, steps)]


def _check_sigmas(sigmas: Any, steps: int, sigma_min: float, sigma_max: float | None,
                  default: bool = False) -> None:
    """Raise ValueError unless ``sigmas`` are steps - 1 decreasing numbers in (sigma_min, sigma_max)."""
    hi = float("inf") if sigma_max is None else sigma_max
    if (isinstance(sigmas, (list, tuple)) and len(sigmas) == steps - 1 and all(_is_real(s) for s in sigmas)
            and all(sigma_min < s < hi for s in sigmas) and all(a > b for a, b in zip(sigmas, sigmas[1:]))):
        return
    if steps == 1:
        raise ValueError(f"sigmas must be None or [] with steps = 1 (no intermediate levels), got {sigmas!r}")
    upper = "the SDE's sigma_max" if sigma_max is None else f"{sigma_max:g}"
    valid = f"steps - 1 = {steps - 1} decreasing numbers in ({sigma_min:g}, {upper})"
    if default:
        raise ValueError(f"sigmas must be {valid}; the default for steps = {steps}, {sigmas!r}, is not, got None")
    raise ValueError(f"sigmas must be {valid} (or None: {DEFAULT_SIGMAS}), got {sigmas!r}")


class ConsistencySampler(Sampler):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1), as ECT samples (Geng et al. 2024).

    The model's denoiser D(x_hat; sigma) is the consistency function f(x_hat, sigma): the sigma-view probability-flow
    ODE's flow map from sigma down to sigma_min, f(x, sigma_min) = x. With z the seed's starting noise:
    x_hat = sigma_max z, x_0 = D(x_hat; sigma_max); then for each intermediate level s_k (s_1 > s_2 > ...),
    x_hat = x_0 + s_k z_k and x_0 = D(x_hat; s_k), z_k fresh per-image normals from draws 1, 2, ... of each seed's
    noise stream. Algorithm 1 re-noises with sqrt(s_k^2 - sigma_min^2); ECT's code, followed here, with s_k itself.
    NFE = ``steps``. The samples are x_hat at sigma_min ~ 0, i.e. x_0: as for every sigma-view sampler, the SDE's
    scale s(t) never enters, so any SDE works (its sigma_max is used only where ``sigma_max`` is None).

    Args:
        steps: network evaluations: 1 (one step), 2, 3, ...
        sigmas: the intermediate levels s_1 > ... > s_{steps-1} in (sigma_min, sigma_max) (default: ECT's [0.821]
            for 2 steps, else the inner levels of EDM's rho = 7 schedule of steps + 1 levels from sigma_max to
            sigma_min).
        sigma_max: the first level (ECT: 80), or None for the SDE's sigma_max.
        sigma_min: the consistency function's end level (ECT: 0.002); bounds ``sigmas`` and ends the default
            schedule.
    """

    def __init__(self, steps: int = 1, sigmas: Sequence[float] | None = None, sigma_max: float | None = 80.0,
                 sigma_min: float = 0.002) -> None:
        check_int("steps", steps, 1)
        check_real("sigma_max", sigma_max, 0, low_open=True, none="the SDE's sigma_max")
        check_real("sigma_min", sigma_min, 0, low_open=True)
        if sigma_max is not None and not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be below sigma_max, got sigma_min = {sigma_min!r} and "
                             f"sigma_max = {sigma_max!r}")
        if sigmas is not None or steps == 1:
            _check_sigmas([] if sigmas is None else sigmas, steps, sigma_min, sigma_max)
        elif sigma_max is not None:
            _check_sigmas(default_sigmas(steps, sigma_min, sigma_max), steps, sigma_min, sigma_max, default=True)
        self.steps, self.sigma_max, self.sigma_min = steps, sigma_max, sigma_min
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]

    def noise_levels(self, sde: SDE) -> list[float]:
        """The levels D is called at under ``sde``: sigma_max, s_1, ..., s_{steps-1}."""
        hi = float(sde.sigma_max) if self.sigma_max is None else float(self.sigma_max)
        if self.sigmas is not None:
            sigmas = self.sigmas
        else:
            sigmas = default_sigmas(self.steps, self.sigma_min, hi) if self.steps > 1 else []
        if self.sigma_max is None:
            if not self.sigma_min < hi:
                raise ValueError(f"sigma_min must be below the SDE's sigma_max = {hi:g}, got {self.sigma_min!r}")
            _check_sigmas(sigmas, self.steps, self.sigma_min, hi, default=self.sigmas is None)
        return [hi, *sigmas]

    def planned_nfe(self, sde: SDE) -> int:
        return self.steps

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", start_noise: Tensor | None = None) -> SampleResult:
        """x_0 = D(sigma_max z; sigma_max), z the seeds' starting noise (or ``start_noise``), re-noised to and
        denoised from each intermediate level."""
        levels = self.noise_levels(sde)
        counted = Counted(D)
        x_hat = initial_noise(seeds, shape, device, start_noise) * levels[0]
        noise = SeededNoise(seeds, shape, device, step=1)  # draws 1, 2, ...: as the sigma-view samplers
        x_0 = counted(x_hat, sigma_like(x_hat, levels[0]))
        for s in levels[1:]:
            x_hat = x_0 + s * noise().to(x_0)
            x_0 = counted(x_hat, sigma_like(x_hat, s))
        return SampleResult(x_0, counted.nfe)
