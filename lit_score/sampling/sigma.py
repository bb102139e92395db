"""Fast samplers through the sigma view of any lit-score SDE (Karras et al. 2022, eq. 4):
x_t = s(t) (x_0 + sigma(t) n), so x_hat = x_t / s(t) follows the VE ODE dx_hat/dsigma = (x_hat - D(x_hat; sigma)) / sigma
with the model's denoiser D (``lit_score.diffusion.denoiser``), called directly.

Here: the noise-level schedules, ``SigmaSampler`` (the base of every sampler stepping down them, here and in
``solvers.py``), EDM's Heun sampler and DPM-Solver++ of orders 1-3 (ODE or SDE), written once.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.registry import Registry
from lit_score.diffusion.denoiser import Counted, Denoiser
from lit_score.sampling.base import (SampleResult, Sampler, check_bool, check_choice, check_int, check_real,
                                     initial_noise)
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


def sigma_like(x: Tensor, value: float) -> Tensor:
    """The noise level ``value`` once per sample of x, in x's dtype and on its device (what D takes)."""
    return torch.full((x.shape[0],), float(value), dtype=x.dtype, device=x.device)


def edm_sample(D: Denoiser, x: Tensor, sigmas: Tensor, noise: Callable[[], Tensor], S_churn: float = 0.0,
               S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0) -> Tensor:
    """Karras et al. 2022, Algorithm 2 (Algorithm 1, deterministic Heun, when S_churn = 0); x starts at sigma_0."""
    n = len(sigmas) - 1
    for i in range(n):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t_cur**2) * S_noise * noise()
        d = (x - D(x, sigma_like(x, t_hat))) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:
            d_prime = (x_next - D(x_next, sigma_like(x, t_next))) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def _phi2(H: float) -> float:
    """(H - 1 + e^{-H}) / H: the weight of h D' in int_0^h e^{-(h-u)} D."""
    return H / 2 - H**2 / 6 + H**3 / 24 if H < 1e-3 else 1 + math.expm1(-H) / H


def _phi3(H: float) -> float:
    """(H^2 / 2 - H + 1 - e^{-H}) / H^2: the weight of h^2 D''."""
    return H / 6 - H**2 / 24 + H**3 / 120 if H < 1e-3 else (H * H / 2 - H - math.expm1(-H)) / H**2


def check_dpm_solver_pp(order: int, eta: float, s_noise: float, solver_type: str) -> None:
    """Raise unless ``dpm_solver_pp`` takes these options."""
    check_choice("order", order, (1, 2, 3))
    check_real("eta", eta, 0)
    check_real("s_noise", s_noise, 0)
    check_choice("solver_type", solver_type, ("midpoint", "heun"))


def dpm_solver_pp(D: Denoiser, x: Tensor, sigmas: Tensor, noise: Callable[[], Tensor] | None = None, order: int = 2,
                  eta: float = 0.0, s_noise: float = 1.0, solver_type: str = "midpoint") -> Tensor:
    """Multistep DPM-Solver++ of order 1-3 in the sigma view, lambda = -log sigma (Lu et al. 2022), one evaluation
    per step; an SDE solver when eta > 0; the step to sigma = 0 is x = D.

    In log-SNR with h = lambda_{i+1} - lambda_i the exact solution of the sigma-view ODE is
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + int_0^h e^{-(h - u)} D(lambda_i + u) du; with eta the step is
    x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + ... + sigma' sqrt(1 - e^{-2 eta h}) s_noise z
    (eta = 1: SDE-DPM-Solver++, Lu et al. 2022, appendix). Higher-order terms come from the last ``order`` denoiser
    outputs; the first steps use lower orders. Order 2 with ``solver_type`` "midpoint" is DPM-Solver++(2M) (D
    extrapolated to the midpoint in lambda, Lu et al. 2022, Algorithm 2), "heun" its exponential-integrator weight.
    Order 3 is DPM-Solver++(3M): D'' is estimated as 2 f2 from the second divided difference f2; k-diffusion 0.1.1
    uses f2, which leaves its sample_dpmpp_3m_sde second order (tests/test_solvers.py measures both).
    """
    check_dpm_solver_pp(order, eta, s_noise, solver_type)
    if eta > 0 and noise is None:
        raise ValueError("the stochastic DPM-Solver++ (eta > 0) needs a noise source")
    Ds: list[Tensor] = []
    hs: list[float] = []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = D(x, sigma_like(x, s))
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        H = (1 + eta) * h
        k = min(order, len(Ds) + 1)
        midpoint = k == 2 and order == 2 and solver_type == "midpoint"
        d_hat = d
        if midpoint:
            r = hs[-1] / h
            d_hat = (1 + 1 / (2 * r)) * d - Ds[-1] / (2 * r)
        x_next = (s_next / s) * math.exp(-eta * h) * x - math.expm1(-H) * d_hat
        if k == 2 and not midpoint:
            d1 = (d - Ds[-1]) * (h / hs[-1])  # ~ h D'
            x_next = x_next + _phi2(H) * d1
        elif k == 3:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (d - Ds[-1]) / r0, (Ds[-1] - Ds[-2]) / r1
            f2 = (d1_0 - d1_1) / (r0 + r1)  # second divided difference in units of h
            x_next = x_next + _phi2(H) * (d1_0 + r0 * f2) + _phi3(H) * 2 * f2  # h D' and h^2 D''
        if eta > 0:
            x_next = x_next + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * noise().to(x)
        x = x_next
        Ds, hs = (Ds + [d])[-2:], (hs + [h])[-2:]
    return x


def float32_net(D: Denoiser) -> Callable[[Tensor, Tensor], Tensor]:
    """D for a float64 sampler: inputs cast to float32 (the network's dtype), output back to float64."""
    return lambda x, sigma: D(x.float(), sigma.float()).double()


SIGMA_ARGS = """steps: noise levels N, then a last step to sigma = 0 (NFE = N).
        schedule: a name in ``SCHEDULES``: karras (rho = 7, default), geometric (log-SNR), uniform (in t).
        sigma_min, sigma_max: ends of the schedule (default: max(SDE's sigma_min, 0.002) and the SDE's sigma_max).
        float64: step in float64, calling the network in float32, as EDM's own sampler."""


class SigmaSampler(Sampler):
    __doc__ = f"""A sampler in the sigma view: x_hat starts at sigma_0 z, z the seed's starting noise (the same as the
    t-view samplers'), and a solver steps it down the schedule's noise levels to sigma = 0, where it is x_0; one
    network evaluation per level unless ``planned_nfe`` says otherwise. Stochastic solvers draw their noise from
    draws 1, 2, ... of each seed's noise stream (release 0.1 started from its draw 0). Subclasses give ``solve``.

    Args:
        {SIGMA_ARGS}
    """

    def __init__(self, steps: int, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False) -> None:
        check_int("steps", steps, 1)
        check_choice("schedule", schedule, SCHEDULES.names())
        check_real("sigma_min", sigma_min, 0, low_open=True, none="max(SDE's sigma_min, 0.002)")
        check_real("sigma_max", sigma_max, 0, low_open=True, none="the SDE's sigma_max")
        if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be below sigma_max, got sigma_min = {sigma_min!r} and "
                             f"sigma_max = {sigma_max!r}")
        check_bool("float64", float64)
        self.steps, self.schedule, self.sigma_min, self.sigma_max = steps, schedule, sigma_min, sigma_max
        self.float64 = float64

    @abc.abstractmethod
    def solve(self, D: Denoiser, x: Tensor, sigmas: Tensor, noise: Callable[[], Tensor]) -> Tensor:
        """x_hat at ``sigmas[-1]`` from x at ``sigmas[0]``; ``noise()`` draws each image's next normal variates."""

    def planned_nfe(self, sde: SDE) -> int:
        return self.steps

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", start_noise: Tensor | None = None) -> SampleResult:
        """From x_hat = sigma_0 z, z the seeds' starting noise (or ``start_noise``), to sigma = 0."""
        sigmas = sigma_steps(sde, self.steps, self.schedule, self.sigma_min, self.sigma_max)
        counted = Counted(D)
        x = initial_noise(seeds, shape, device, start_noise) * float(sigmas[0])
        noise = SeededNoise(seeds, shape, device, step=1)  # draws 1, 2, ...: as 0.1, whose draw 0 was the start
        net = counted
        if self.float64:  # as EDM's sampler: float64 state, the network in its own dtype
            net, x = float32_net(counted), x.double()
        return SampleResult(self.solve(net, x, sigmas, noise).float(), counted.nfe)  # x_hat at sigma = 0 is x_0


class EDMSampler(SigmaSampler):
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
        check_real("S_churn", S_churn, 0)
        check_real("S_min", S_min, 0)
        check_real("S_max", S_max, 0)
        if S_max < S_min:
            raise ValueError(f"S_max must be a number >= S_min = {S_min:g}, got {S_max!r}")
        check_real("S_noise", S_noise, 0)
        self.S_churn, self.S_min, self.S_max, self.S_noise = S_churn, S_min, S_max, S_noise

    def planned_nfe(self, sde: SDE) -> int:
        return 2 * self.steps - 1  # Heun at each level, Euler on the last step to sigma = 0

    def solve(self, D, x, sigmas, noise):
        return edm_sample(D, x, sigmas, noise, self.S_churn, self.S_min, self.S_max, self.S_noise)


class DPMSolverPP(SigmaSampler):
    __doc__ = f"""DPM-Solver++(2M), multistep second order, one evaluation per step (Lu et al. 2022), for any SDE
    (``DPMSolverPP3M``: the same sampler with ``order = 3``).

    Args:
        {SIGMA_ARGS}
    """

    order = 2

    def __init__(self, steps: int = 20, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False) -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)

    def solve(self, D, x, sigmas, noise):
        return dpm_solver_pp(D, x, sigmas, order=self.order)
