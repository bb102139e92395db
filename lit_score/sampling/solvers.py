"""The fastest published solvers in the sigma view of any lit-score SDE (see ``sigma.py``, which also holds
DPM-Solver++ of every order), plus the adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021).

Each solver is a pure function ``(D, x, sigmas[, noise], ...) -> x`` stepping x_hat from ``sigmas[0]`` down the
grid (a final sigma = 0 is a denoising step, x = D(x; sigma)); stochastic ones draw ``noise()`` once per step.
In log-SNR lambda = -log sigma with h = lambda_{i+1} - lambda_i, the exact solution of the sigma-view ODE is
x_{i+1} = (sigma_{i+1} / sigma_i) x_i + int_0^h e^{-(h - u)} D(lambda_i + u) du (Lu et al. 2022, DPM-Solver++), which the
exponential integrators approximate from past denoiser outputs.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Counted, Denoiser
from lit_score.rng import SeededNoise
from lit_score.sampling.base import (SampleResult, Sampler, check_bool, check_choice, check_int, check_real, denoise,
                                     initial_noise, time_vector)
from lit_score.sampling.sigma import (SIGMA_ARGS, DPMSolverPP, SigmaSampler, check_dpm_solver_pp, dpm_solver_pp,
                                      sigma_like)
from lit_score.diffusion.sdes import SDE, VESDE, ScoreFn, bcast

Noise = Callable[[], Tensor]


def euler(D: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Euler's method on dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3); order 1."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (s_next - s) * (x - D(x, sigma_like(x, s))) / s
    return x


def _unipc_psi(h: float, n: int) -> float:
    """int_0^h e^{-(h-u)} (u / h)^n du = h I_n, I_n = int_0^1 e^{-h(1-v)} v^n dv (series for h < 1, else recurrence)."""
    if h < 1:
        total, term = 0.0, 1.0 / (n + 1)  # sum_k (-h)^k n! / (n + k + 1)!
        for k in range(40):
            total += term
            term *= -h / (n + k + 2)
        return h * total
    I = -math.expm1(-h) / h
    for m in range(1, n + 1):
        I = (1 - m * I) / h
    return h * I


def _unipc_weights(rs: Sequence[float], h: float, B: float) -> Tensor:
    """a_k with sum_k a_k r_k^(n-1) = psi_n(h) / B(h) for n = 1..len(rs) (Zhao et al. 2023, Theorem 3.1); one
    coefficient is 1/2, which meets its condition to O(h) as the authors' code does, so B(h) matters there."""
    q = len(rs)
    if q == 1:
        return torch.tensor([0.5], dtype=torch.float64)
    R = torch.tensor([[r ** (n - 1) for r in rs] for n in range(1, q + 1)], dtype=torch.float64)
    b = torch.tensor([_unipc_psi(h, n) / B for n in range(1, q + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, b)


def _check_unipc(order: int, variant: str) -> None:
    check_choice("order", order, (1, 2, 3))
    check_choice("variant", variant, ("bh1", "bh2"))


def unipc(D: Denoiser, x: Tensor, sigmas: Tensor, order: int = 2, variant: str = "bh2",
          corrector: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023), data prediction, one evaluation per step.

    The predictor UniP-``order`` uses the last ``order`` denoiser outputs; the corrector UniC re-uses the output at
    the predicted point (which the next step needs anyway) and raises the order by one. ``variant``: B(h) = h
    ("bh1") or 1 - e^{-h} ("bh2"). The first steps use lower orders; the last step has no corrector.
    """
    _check_unipc(order, variant)
    n = len(sigmas) - 1
    lam = [-math.log(float(v)) if float(v) > 0 else math.inf for v in sigmas]
    m = D(x, sigma_like(x, float(sigmas[0]))) if n > 0 else x
    past: list[tuple[float, Tensor]] = []  # (lambda, D) at earlier points, newest last
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_next == 0:
            return m
        h = lam[i + 1] - lam[i]
        B = h if variant == "bh1" else -math.expm1(-h)
        use = past[len(past) - min(order - 1, len(past)):]
        rs = [(lp - lam[i]) / h for lp, _ in reversed(use)]
        Dr = [(dp - m) / r for (_, dp), r in zip(reversed(use), rs)]
        x_base = (s_next / s) * x - math.expm1(-h) * m
        x_pred = x_base
        if rs:
            a = _unipc_weights(rs, h, B)
            x_pred = x_base + B * sum(float(a_k) * d_k for a_k, d_k in zip(a, Dr))
        if i == n - 1:
            return x_pred
        m_next = D(x_pred, sigma_like(x, s_next))
        if corrector:
            a = _unipc_weights(rs + [1.0], h, B)
            x = x_base + B * (sum(float(a_k) * d_k for a_k, d_k in zip(a[:-1], Dr)) + float(a[-1]) * (m_next - m))
        else:
            x = x_pred
        past = (past + [(lam[i], m)])[-2:]
        m = m_next
    return x


_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _check_ipndm(order: int) -> None:
    check_choice("order", order, tuple(_ADAMS_BASHFORTH))


def _adams_bashforth_weights(nodes: Sequence[float], s_next: float) -> list[float]:
    """w_j with sum_j w_j p(nodes[j]) = int_{nodes[0]}^{s_next} p for every polynomial p of degree < len(nodes)."""
    s0, q = nodes[0], len(nodes)
    V = torch.tensor([[(v - s0) ** m for v in nodes] for m in range(q)], dtype=torch.float64)
    b = torch.tensor([(s_next - s0) ** (m + 1) / (m + 1) for m in range(q)], dtype=torch.float64)
    return torch.linalg.solve(V, b).tolist()


def ipndm(D: Denoiser, x: Tensor, sigmas: Tensor, order: int = 4, variable: bool = False) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS): Adams-Bashforth of order
    min(i + 1, ``order``) on d = (x - D) / sigma, one evaluation per step. Its fixed-step coefficients have the
    full order only on a grid uniform in sigma; ``variable`` uses the variable-step ones (iPNDM-v), full order on any
    smooth grid."""
    _check_ipndm(order)
    grid = [float(v) for v in sigmas]
    ds: list[Tensor] = []  # newest first
    for i in range(len(grid) - 1):
        s, s_next = grid[i], grid[i + 1]
        ds = [(x - D(x, sigma_like(x, s))) / s] + ds[:order - 1]
        if variable:
            w = _adams_bashforth_weights(grid[i::-1][:len(ds)], s_next)
        else:
            w = [(s_next - s) * c for c in _ADAMS_BASHFORTH[len(ds)]]
        x = x + sum(w_j * d for w_j, d in zip(w, ds))
    return x


def _check_adaptive(abstol: float, reltol: float, safety: float, exp: float, h_init: float) -> None:
    check_real("abstol", abstol, 0, low_open=True)
    check_real("reltol", reltol, 0)
    check_real("safety", safety, 0, 1, low_open=True)
    check_real("exp", exp, 0, low_open=True)
    check_real("h_init", h_init, 0, low_open=True)


def adaptive_sde(score_fn: ScoreFn, sde: SDE, x: Tensor, noise: Noise, eps: float, abstol: float = 0.0078,
                 reltol: float = 0.01, safety: float = 0.9, exp: float = 0.9, h_init: float = 0.01,
                 per_image: bool = True, max_iters: int = 100_000) -> tuple[Tensor, Tensor]:
    """The reverse SDE from T to eps with adaptive steps (Jolicoeur-Martineau et al. 2021, Algorithm 1).

    Each try takes an Euler-Maruyama step x' and an improved-Euler step x'' with the same noise, and accepts x''
    (extrapolation) when ||(x' - x'') / delta||_2 / sqrt(n) <= 1, delta = max(abstol, reltol max(|x'|, |x'_prev|));
    the next step is min(t - eps, safety h E^-exp). Step sizes are per image (or one per batch if not per_image).
    Returns x at eps and the score evaluations each image used before it reached eps, (B,).
    """
    _check_adaptive(abstol, reltol, safety, exp, h_init)
    if not 0 <= eps < sde.T:
        raise ValueError(f"need 0 <= eps < T = {sde.T}, got eps = {eps}")
    rsde = sde.reverse(score_fn)
    B = x.shape[0]
    t = torch.full((B,), sde.T, dtype=x.dtype, device=x.device)
    h = torch.full_like(t, min(h_init, sde.T - eps))
    x_prev = x
    nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    for _ in range(max_iters):
        running = (t - eps).abs() > 1e-6
        if not running.any():
            return x, nfe
        nfe += 2 * running.long()
        z = noise().to(x)
        hb, sq = bcast(h, x), bcast(h.sqrt(), x)
        drift, g = rsde.sde(x, t)
        K1 = -hb * drift + bcast(g, x) * sq * z
        drift2, g2 = rsde.sde(x + K1, t - h)
        K2 = -hb * drift2 + bcast(g2, x) * sq * z
        x_em, x_heun = x + K1, x + (K1 + K2) / 2
        delta = torch.clamp(reltol * torch.maximum(x_prev.abs(), x_em.abs()), min=abstol)
        q = ((x_em - x_heun) / delta).pow(2).flatten(1)
        err = q.mean(1).sqrt() if per_image else q.mean().sqrt().expand(B)
        accept = err <= 1
        a = bcast(accept, x)
        x, x_prev = torch.where(a, x_heun, x), torch.where(a, x_em, x_prev)
        t = torch.where(accept, t - h, t)
        h = torch.minimum((t - eps).clamp_min(0), safety * h * err.clamp_min(1e-12) ** -exp)
    raise RuntimeError(f"the adaptive SDE solver did not reach eps = {eps} in {max_iters} tries; loosen "
                       f"abstol / reltol (now {abstol}, {reltol}) or raise max_iters")


class EulerSampler(SigmaSampler):
    __doc__ = f"""Euler's method on the sigma-view probability-flow ODE (Karras et al. 2022, eq. 3), for any SDE.

    Args:
        {SIGMA_ARGS}
    """

    def __init__(self, steps: int = 50, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False) -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)

    def solve(self, D, x, sigmas, noise):
        return euler(D, x, sigmas)


class DPMSolverPP3M(DPMSolverPP):
    __doc__ = f"""DPM-Solver++(3M), multistep third order, one evaluation per step (Lu et al. 2022), for any SDE.

    Args:
        {SIGMA_ARGS}
    """

    order = 3


class DPMSolverPPSDE(SigmaSampler):
    __doc__ = f"""DPM-Solver++(2M) SDE / (3M) SDE (Lu et al. 2022, appendix; k-diffusion), each image's noise from its seed.

    Args:
        {SIGMA_ARGS}
        order: 2 or 3 (multistep order; 1 is SDE-DPM-Solver-1).
        eta: stochasticity (1: the reverse SDE; 0: the ODE solver).
        s_noise: scale of the added noise.
        solver_type: "midpoint" or "heun", the order-2 term when order = 2.
    """

    def __init__(self, steps: int = 20, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False, order: int = 3, eta: float = 1.0,
                 s_noise: float = 1.0, solver_type: str = "midpoint") -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)
        check_dpm_solver_pp(order, eta, s_noise, solver_type)
        self.order, self.eta, self.s_noise, self.solver_type = order, eta, s_noise, solver_type

    def solve(self, D, x, sigmas, noise):
        return dpm_solver_pp(D, x, sigmas, noise, self.order, self.eta, self.s_noise, self.solver_type)


class UniPC(SigmaSampler):
    __doc__ = f"""UniPC: UniP-p predictor with the UniC corrector at no extra evaluation (Zhao et al. 2023), for any SDE.

    Args:
        {SIGMA_ARGS}
        order: predictor order p (1-3); with the corrector the solver has order p + 1.
        variant: B(h) = h ("bh1") or 1 - e^(-h) ("bh2").
        corrector: apply UniC.
    """

    def __init__(self, steps: int = 10, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False, order: int = 2, variant: str = "bh2",
                 corrector: bool = True) -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)
        _check_unipc(order, variant)
        check_bool("corrector", corrector)
        self.order, self.variant, self.corrector = order, variant, corrector

    def solve(self, D, x, sigmas, noise):
        return unipc(D, x, sigmas, self.order, self.variant, self.corrector)


class IPNDM(SigmaSampler):
    __doc__ = f"""Improved PNDM: fixed-coefficient Adams-Bashforth of order up to 4 (Zhang & Chen 2023), for any SDE.

    Args:
        {SIGMA_ARGS}
        order: 1 to 4.
        variable: variable-step Adams-Bashforth coefficients (iPNDM-v).
    """

    def __init__(self, steps: int = 10, schedule: str = "karras", sigma_min: float | None = None,
                 sigma_max: float | None = None, float64: bool = False, order: int = 4,
                 variable: bool = False) -> None:
        super().__init__(steps, schedule, sigma_min, sigma_max, float64)
        _check_ipndm(order)
        check_bool("variable", variable)
        self.order, self.variable = order, variable

    def solve(self, D, x, sigmas, noise):
        return ipndm(D, x, sigmas, self.order, self.variable)


class AdaptiveSDESampler(Sampler):
    """The adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021), "Gotta go fast", Algorithm 1.

    Args:
        abstol, reltol: mixed tolerance delta = max(abstol, reltol max(|x'|, |x'_prev|)).
        safety, exp: the step-size update h <- safety h E^-exp (paper: 0.9, 0.9).
        h_init: first step size in t.
        eps: final time (default: 1e-5 for VE, 1e-3 for VP and sub-VP, as the official code).
        step_control: "image" (a step size per image, so an image depends only on its seed) or "batch".
        denoise: finish with the denoiser, E[x_0 | x_eps] = D(x_eps / s; sigma(eps)) (one more evaluation).
        max_iters: give up after this many tries.
    NFE reported: the largest per-image count (2 per try, + 1 with denoise).
    """

    def __init__(self, abstol: float = 0.0078, reltol: float = 0.01, safety: float = 0.9, exp: float = 0.9,
                 h_init: float = 0.01, eps: float | None = None, step_control: str = "image", denoise: bool = True,
                 max_iters: int = 100_000) -> None:
        _check_adaptive(abstol, reltol, safety, exp, h_init)
        check_real("eps", eps, 0, none="1e-5 for a VESDE, 1e-3 otherwise")
        check_choice("step_control", step_control, ("image", "batch"))
        check_bool("denoise", denoise)
        check_int("max_iters", max_iters, 1)
        self.abstol, self.reltol, self.safety, self.exp, self.h_init = abstol, reltol, safety, exp, h_init
        self.eps, self.step_control, self.denoise, self.max_iters = eps, step_control, denoise, max_iters

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", start_noise: Tensor | None = None) -> SampleResult:
        """From x_T = prior std * z, z the seeds' starting noise (or ``start_noise``), to eps; the steps' noise
        from draws 0, 1, ... of each seed's noise stream."""
        eps = self.eps if self.eps is not None else (1e-5 if isinstance(sde, VESDE) else 1e-3)
        counted = Counted(D)
        x = sde.prior_from_noise(initial_noise(seeds, shape, device, start_noise))
        x, _ = adaptive_sde(counted.score, sde, x, SeededNoise(seeds, shape, device), eps, self.abstol, self.reltol,
                            self.safety, self.exp, self.h_init, self.step_control == "image", self.max_iters)
        if self.denoise:
            x = denoise(counted, sde, x, time_vector(eps, x))
        return SampleResult(x, counted.nfe)
