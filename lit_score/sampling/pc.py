"""Predictor-corrector sampling (Song et al. 2021, section 4.2, appendix G, Algorithms 2-5).

A predictor takes one step of a reverse-time SDE solver; a corrector runs score-based MCMC at a fixed time.
Both are plain functions ``(state, x, t) -> (x, x_mean)`` in the registries ``PREDICTORS`` and ``CORRECTORS``;
``x_mean`` is the step without its noise (what ``denoise`` returns at the end).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from lit_score.registry import Registry
from lit_score.sampling.base import (SAMPLERS, CountingScore, SampleResult, Sampler, SeededNoise, seeded_prior,
                                     time_vector)
from lit_score.sdes import SDE, VESDE, VPSDE, ReverseSDE, ScoreFn, _bcast


@dataclass
class PCState:
    """What a predictor or corrector may use: the (re-discretised) SDE, its reverse, the score and the noise."""

    sde: SDE
    rsde: ReverseSDE
    score_fn: ScoreFn
    noise: Callable[[], Tensor]
    snr: float
    n_steps_each: int
    step_lr: float
    std_last: float  # marginal std at the final time: sigma_L of annealed Langevin


Step = Callable[[PCState, Tensor, Tensor], "tuple[Tensor, Tensor]"]
PREDICTORS: Registry[Step] = Registry("predictor")
CORRECTORS: Registry[Step] = Registry("corrector")


def rediscretize(sde: SDE, N: int) -> SDE:
    """A copy of ``sde`` whose discretisation (N, SMLD sigmas, DDPM betas) has N steps; its network
    conditioning is irrelevant because samplers keep the model's own score function."""
    if N < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {N}")
    if N == sde.N:
        return sde
    new = copy.copy(sde)
    new.N = N
    if isinstance(sde, VESDE):
        new.discrete_sigmas = torch.exp(torch.linspace(math.log(sde.sigma_min), math.log(sde.sigma_max), N))
    if isinstance(sde, VPSDE):
        new.discrete_betas = torch.linspace(sde.beta_0 / N, sde.beta_1 / N, N)
        new.alphas = 1.0 - new.discrete_betas
        new.alphas_cumprod = torch.cumprod(new.alphas, 0)
        new.sqrt_alphas_cumprod = torch.sqrt(new.alphas_cumprod)
        new.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - new.alphas_cumprod)
    return new


def _timestep(sde: SDE, t: Tensor) -> Tensor:
    return (t * (sde.N - 1) / sde.T).round().long()


@PREDICTORS.register("euler_maruyama")
def euler_maruyama(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x <- x - [f - g^2 score] dt + g sqrt(dt) z, dt = T/N (Euler-Maruyama on eq. 6)."""
    dt = -s.sde.T / s.sde.N
    drift, diffusion = s.rsde.sde(x, t)
    x_mean = x + drift * dt
    return x_mean + _bcast(diffusion, x) * math.sqrt(-dt) * s.noise(), x_mean


@PREDICTORS.register("reverse_diffusion")
def reverse_diffusion(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x <- x - f_i + G_i^2 score + G_i z, the reverse of the forward discretisation (eq. 46-47)."""
    if isinstance(s.sde, VPSDE) and s.sde.beta_1 / s.sde.N >= 1:
        raise ValueError(f"reverse diffusion of a VPSDE needs discrete betas < 1, i.e. more than "
                         f"beta_max = {s.sde.beta_1} steps; got {s.sde.N}")
    f, G = s.rsde.discretize(x, t)
    x_mean = x - f
    return x_mean + _bcast(G, x) * s.noise(), x_mean


@PREDICTORS.register("ancestral_sampling")
def ancestral_sampling(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Ancestral sampling of the SMLD (eq. 47) or DDPM (eq. 45) Markov chain, for VE and VP SDEs."""
    i = _timestep(s.sde, t)
    if isinstance(s.sde, VESDE):
        sigmas = s.sde.discrete_sigmas.to(x.device, x.dtype)
        sigma = sigmas[i]
        adjacent = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        x_mean = x + s.score_fn(x, t) * _bcast(sigma**2 - adjacent**2, x)
        std = torch.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        return x_mean + _bcast(std, x) * s.noise(), x_mean
    if isinstance(s.sde, VPSDE):
        beta = s.sde.discrete_betas.to(x.device, x.dtype)[i]
        if (beta >= 1).any():
            raise ValueError(f"ancestral sampling of a VPSDE needs discrete betas < 1, i.e. more than "
                             f"beta_max = {s.sde.beta_1} steps; got {s.sde.N}")
        x_mean = (x + _bcast(beta, x) * s.score_fn(x, t)) / _bcast(torch.sqrt(1.0 - beta), x)
        return x_mean + _bcast(torch.sqrt(beta), x) * s.noise(), x_mean
    raise TypeError(f"ancestral sampling exists for VESDE and VPSDE only, not {type(s.sde).__name__}")


@PREDICTORS.register("none")
def no_predictor(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return x, x


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


@CORRECTORS.register("langevin")
def langevin(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Langevin MCMC with step eps = 2 alpha (snr ||z|| / ||score||)^2 per image (Algorithms 4-5)."""
    alpha = torch.ones_like(t)
    if isinstance(s.sde, VPSDE):
        alpha = s.sde.alphas.to(x.device, x.dtype)[_timestep(s.sde, t)]
    x_mean = x
    for _ in range(s.n_steps_each):
        grad, z = s.score_fn(x, t), s.noise()
        eps = 2 * alpha * (s.snr * _norm(z) / _norm(grad).clamp_min(1e-30)) ** 2
        x_mean = x + _bcast(eps, x) * grad
        x = x_mean + _bcast(torch.sqrt(2 * eps), x) * z
    return x, x_mean


@CORRECTORS.register("ald")
def annealed_langevin(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Annealed Langevin dynamics at level sigma_i: alpha_i = step_lr sigma_i^2 / sigma_L^2,
    x <- x + alpha_i / 2 score + sqrt(alpha_i) z, n_steps_each times (Song & Ermon 2019, Algorithm 1)."""
    std = s.sde.marginal_prob(torch.zeros_like(t), t)[1]
    alpha = s.step_lr * (std / s.std_last) ** 2
    x_mean = x
    for _ in range(s.n_steps_each):
        x_mean = x + _bcast(alpha / 2, x) * s.score_fn(x, t)
        x = x_mean + _bcast(torch.sqrt(alpha), x) * s.noise()
    return x, x_mean


@CORRECTORS.register("none")
def no_corrector(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return x, x


Projection = Callable[[Tensor, Tensor, Tensor], "tuple[Tensor, Tensor]"]


@SAMPLERS.register("pc")
class PCSampler(Sampler):
    """Predictor-corrector sampler on t_i = linspace(T, eps, steps) (Song et al. 2021, Algorithms 2-3).

    Args:
        predictor: a name in ``PREDICTORS``: euler_maruyama, reverse_diffusion, ancestral_sampling, none.
        corrector: a name in ``CORRECTORS``: langevin, ald (annealed Langevin dynamics), none.
        snr: signal-to-noise ratio r of the Langevin corrector.
        n_steps_each: corrector steps per noise level (T of Song & Ermon's Algorithm 1).
        step_lr: epsilon of annealed Langevin, whose step at level i is epsilon sigma_i^2 / sigma_L^2.
        steps: number of noise levels N (default: the SDE's own N).
        eps: last time, where the sampler stops; 0 puts the levels on the SDE's discrete sigmas.
        denoise: return the last step's noise-free mean.
        order: ``corrector_first`` (the default, the official score_sde code, with which the paper's FIDs were
            computed: the chain ends on a predictor step, so ``denoise`` removes the predictor's noise), or
            ``predictor_first`` (the paper's Algorithms 2-3).
    """

    def __init__(self, predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
                 n_steps_each: int = 1, step_lr: float = 2e-5, steps: int | None = None, eps: float = 1e-3,
                 denoise: bool = True, order: Literal["corrector_first", "predictor_first"] = "corrector_first"
                 ) -> None:
        self.predictor, self.corrector = PREDICTORS[predictor], CORRECTORS[corrector]
        self.predictor_name, self.corrector_name = predictor, corrector
        if order not in ("corrector_first", "predictor_first"):
            raise ValueError(f"order must be 'corrector_first' or 'predictor_first', got {order!r}")
        if n_steps_each < 1 or snr <= 0 or step_lr <= 0 or eps < 0:
            raise ValueError(f"need n_steps_each >= 1, snr > 0, step_lr > 0, eps >= 0; "
                             f"got {n_steps_each}, {snr}, {step_lr}, {eps}")
        self.snr, self.n_steps_each, self.step_lr, self.steps = snr, n_steps_each, step_lr, steps
        self.eps, self.denoise, self.order = eps, denoise, order

    def sample(self, score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", x_init: Tensor | None = None,
               project: Projection | None = None) -> SampleResult:
        """``project(x, x_mean, t)``, if given, runs after each time step (conditional generation, appendix I)."""
        sde = rediscretize(sde, self.steps or sde.N)
        counted = CountingScore(score_fn)
        noise = SeededNoise(seeds, shape, device)
        x = seeded_prior(sde, seeds, shape, device) if x_init is None else x_init
        timesteps = torch.linspace(sde.T, self.eps, sde.N, device=device, dtype=torch.float64).to(x.dtype)
        std_last = float(sde.marginal_prob(torch.zeros(1), timesteps[-1:].cpu())[1])
        if self.corrector_name == "ald" and std_last <= 0:
            raise ValueError("annealed Langevin needs a positive noise level at the last time; raise eps")
        state = PCState(sde, sde.reverse(counted), counted, noise, self.snr, self.n_steps_each, self.step_lr,
                        std_last)
        ops = [self.corrector, self.predictor] if self.order == "corrector_first" else [self.predictor, self.corrector]
        ops = [op for op in ops if op not in (no_predictor, no_corrector)]
        x_mean = x
        for t in timesteps:
            vec_t = time_vector(t, x)
            for op in ops:
                x, x_mean = op(state, x, vec_t)
            if project is not None:
                x, x_mean = project(x, x_mean, vec_t)
        return SampleResult(x_mean if self.denoise else x, counted.nfe)
