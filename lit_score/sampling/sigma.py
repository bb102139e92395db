"""Fast samplers through the sigma view of any lit-score SDE (Karras et al. 2022, eq. 4):
x_t = s(t) (x_0 + sigma(t) n), so x_hat = x_t / s(t) follows the VE ODE dx_hat/dsigma = (x_hat - D(x_hat; sigma)) / sigma
with the model's denoiser D (``lit_score.diffusion.denoiser``), called directly.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.registry import Registry
from lit_score.diffusion.denoiser import Counted, Denoiser
from lit_score.sampling.base import SampleResult, Sampler
from lit_score.rng import SeededNoise
from lit_score.diffusion.sdes import SDE

Schedule = Callable[[SDE, int, float, float], Tensor]  # (sde, n, sigma_min, sigma_max) -> sigma_0 > ... > sigma_{n-1}
SCHEDULES: Registry[Schedule] = Registry("sigma schedule")


@SCHEDULES.register("uniform")
def uniform_schedule(sde: SDE, n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """sigma(t_i) with t_i uniform between t(sigma_max) and t(sigma_min) (Song et al. 2021)."""
    t = torch.linspace(float(sde.t_from_sigma(torch.tensor(sigma_max, dtype=torch.float64))),
                       float(sde.t_from_sigma(torch.tensor(sigma_min, dtype=torch.float64))), n, dtype=torch.float64)
    return sde.sigma(t)


@SCHEDULES.register("geometric")
def geometric_schedule(sde: SDE, n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Geometric sigmas, i.e. uniform in log-SNR = -2 log sigma (Song & Ermon 2019; Lu et al. 2022)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def karras_schedule(sde: SDE, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022, eq. 5)."""
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


SCHEDULES.register("karras")(karras_schedule)


def sigma_steps(sde: SDE, steps: int, schedule: str, sigma_min: float | None, sigma_max: float | None) -> Tensor:
    """The schedule's sigma_0 > ... > sigma_{steps-1}, then sigma_steps = 0.

    Defaults: sigma_max of the SDE, and sigma_min = max(SDE's sigma_min, 0.002) (Karras et al. 2022, Table 1).
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    lo = max(sde.sigma_min, 0.002) if sigma_min is None else sigma_min
    hi = sde.sigma_max if sigma_max is None else sigma_max
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
    sigmas = SCHEDULES[schedule](sde, steps, lo, hi)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def edm_sample(D: Denoiser, x: Tensor, sigmas: Tensor, noise: Callable[[], Tensor], S_churn: float = 0.0,
               S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0) -> Tensor:
    """Karras et al. 2022, Algorithm 2 (Algorithm 1, deterministic Heun, when S_churn = 0); x starts at sigma_0."""
    n = len(sigmas) - 1
    sig = lambda v: torch.full((x.shape[0],), float(v), dtype=x.dtype, device=x.device)  # noqa: E731
    for i in range(n):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t_cur**2) * S_noise * noise()
        d = (x - D(x, sig(t_hat))) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:
            d_prime = (x_next - D(x_next, sig(t_next))) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def dpm_solver_pp_2m(D: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M) in the sigma view, lambda = -log sigma (Lu et al. 2022, Algorithm 2); last step first order."""
    sig = lambda v: torch.full((x.shape[0],), float(v), dtype=x.dtype, device=x.device)  # noqa: E731
    d_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = D(x, sig(s_cur))
        if s_next == 0:
            x = d
            break
        h = math.log(s_cur / s_next)
        if d_prev is None:
            d_hat = d
        else:
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
        x = (s_next / s_cur) * x - math.expm1(-h) * d_hat
        d_prev, h_prev = d, h
    return x


def float32_net(D: Denoiser) -> Callable[[Tensor, Tensor], Tensor]:
    """D for a float64 sampler: inputs cast to float32 (the network's dtype), output back to float64."""
    return lambda x, sigma: D(x.float(), sigma.float()).double()


class _SigmaSampler(Sampler):
    def __init__(self, steps: int, schedule: str, sigma_min: float | None, sigma_max: float | None,
                 float64: bool = False) -> None:
        SCHEDULES[schedule]
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps, self.schedule, self.sigma_min, self.sigma_max = steps, schedule, sigma_min, sigma_max
        self.float64 = float64

    def _start(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str):
        sigmas = sigma_steps(sde, self.steps, self.schedule, self.sigma_min, self.sigma_max)
        counted = Counted(D)
        noise = SeededNoise(seeds, shape, device)
        x = noise() * float(sigmas[0])
        if self.float64:  # as EDM's sampler: float64 state, the network in its own dtype
            return float32_net(counted), x.double(), sigmas, noise, counted
        return counted, x, sigmas, noise, counted


class EDMSampler(_SigmaSampler):
    """EDM's Heun sampler, deterministic (S_churn = 0, Algorithm 1) or stochastic (Algorithm 2), for any SDE.

    Args:
        steps: N noise levels (NFE = 2N - 1).
        schedule: a name in ``SCHEDULES``: karras (rho = 7, default), geometric (log-SNR), uniform (in t).
        sigma_min, sigma_max: ends of the schedule (default: max(SDE's sigma_min, 0.002) and the SDE's sigma_max).
        S_churn, S_min, S_max, S_noise: stochasticity (Karras et al. 2022, section 4).
        float64: step in float64, calling the network in float32, as EDM's own sampler.
    """

    def __init__(self, steps: int = 18, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, S_churn: float = 0.0, S_min: float = 0.0,
                 S_max: float = float("inf"), S_noise: float = 1.0, float64: bool = False) -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)
        if S_churn < 0 or S_noise < 0 or S_min > S_max:
            raise ValueError(f"need S_churn >= 0, S_noise >= 0, S_min <= S_max; got {S_churn}, {S_noise}, "
                             f"{S_min}, {S_max}")
        self.S_churn, self.S_min, self.S_max, self.S_noise = S_churn, S_min, S_max, S_noise

    def planned_nfe(self, sde: SDE) -> int:
        return 2 * self.steps - 1  # Heun at each level, Euler on the last step to sigma = 0

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu") -> SampleResult:
        D, x, sigmas, noise, counted = self._start(D, sde, shape, seeds, device)
        x = edm_sample(D, x, sigmas, noise, self.S_churn, self.S_min, self.S_max, self.S_noise)
        return SampleResult(x.float(), counted.nfe)  # x_hat at sigma = 0 is x_0


class DPMSolverPP(_SigmaSampler):
    """DPM-Solver++(2M), multistep second order, one evaluation per step (Lu et al. 2022), for any SDE."""

    def __init__(self, steps: int = 20, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False) -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)

    def planned_nfe(self, sde: SDE) -> int:
        return self.steps

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu") -> SampleResult:
        D, x, sigmas, _, counted = self._start(D, sde, shape, seeds, device)
        return SampleResult(dpm_solver_pp_2m(D, x, sigmas).float(), counted.nfe)
