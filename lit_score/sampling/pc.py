"""Predictor-corrector sampling (Song et al. 2021, section 4.2, appendix G, Algorithms 2-5).

A predictor takes one step of a reverse-time SDE solver; a corrector runs score-based MCMC at a fixed time.
Both are plain functions ``(state, x, t) -> (x, x_mean)`` in the registries ``PREDICTORS`` and ``CORRECTORS``;
``x_mean`` is the step without its noise (what ``denoise`` returns at the end).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from lit_score.registry import Registry
from lit_score.diffusion.denoiser import Counted, Denoiser
from lit_score.sampling.base import (SampleResult, Sampler, check_bool, check_choice, check_int, check_real,
                                     initial_noise, time_vector)
from lit_score.rng import SeededNoise
from lit_score.diffusion.sdes import SDE, VESDE, VPSDE, ReverseSDE, ScoreFn, bcast, table_on


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
    step_rule: str | None = None  # how a corrector sets its step size (None: its default), see CORRECTOR_STEP_RULES


Step = Callable[[PCState, Tensor, Tensor], "tuple[Tensor, Tensor]"]
PREDICTORS: Registry[Step] = Registry("predictor")
CORRECTORS: Registry[Step] = Registry("corrector")


def rediscretize(sde: SDE, N: int) -> SDE:
    """``sde`` with an N-step discretisation; its network conditioning is irrelevant because samplers keep the
    model's own score function."""
    if N < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {N}")
    return sde if N == sde.N else sde.with_steps(N)


@PREDICTORS.register("euler_maruyama")
def euler_maruyama(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x <- x - [f - g^2 score] dt + g sqrt(dt) z, dt = T/N (Euler-Maruyama on eq. 6)."""
    dt = -s.sde.T / s.sde.N
    drift, diffusion = s.rsde.sde(x, t)
    x_mean = x + drift * dt
    return x_mean + bcast(diffusion, x) * math.sqrt(-dt) * s.noise(), x_mean


@PREDICTORS.register("reverse_diffusion")
def reverse_diffusion(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x <- x - f_i + G_i^2 score + G_i z, the reverse of the forward discretisation (eq. 46-47)."""
    if isinstance(s.sde, VPSDE) and s.sde.beta_1 / s.sde.N >= 1:
        raise ValueError(f"reverse diffusion of a VPSDE needs discrete betas < 1, i.e. more than "
                         f"beta_max = {s.sde.beta_1} steps; got {s.sde.N}")
    f, G = s.rsde.discretize(x, t)
    x_mean = x - f
    return x_mean + bcast(G, x) * s.noise(), x_mean


@PREDICTORS.register("ancestral_sampling")
def ancestral_sampling(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Ancestral sampling of the SMLD (eq. 47) or DDPM (eq. 45) Markov chain, for VE and VP SDEs."""
    i = s.sde.timestep(t)
    if isinstance(s.sde, VESDE):
        sigma = table_on(s.sde.discrete_sigmas, x.device, x.dtype)[i]
        adjacent = s.sde.adjacent_sigma(i).to(x.dtype)
        x_mean = x + s.score_fn(x, t) * bcast(sigma**2 - adjacent**2, x)
        std = torch.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        return x_mean + bcast(std, x) * s.noise(), x_mean
    if isinstance(s.sde, VPSDE):
        if float(s.sde.discrete_betas.max()) >= 1:  # a host-side table: no device synchronisation
            raise ValueError(f"ancestral sampling of a VPSDE needs discrete betas < 1, i.e. more than "
                             f"beta_max = {s.sde.beta_1} steps; got {s.sde.N}")
        beta = table_on(s.sde.discrete_betas, x.device, x.dtype)[i]
        x_mean = (x + bcast(beta, x) * s.score_fn(x, t)) / bcast(torch.sqrt(1.0 - beta), x)
        return x_mean + bcast(torch.sqrt(beta), x) * s.noise(), x_mean
    raise TypeError(f"ancestral sampling exists for VESDE and VPSDE only, not {type(s.sde).__name__}")


@PREDICTORS.register("none")
def no_predictor(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return x, x


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def _alpha(s: PCState, x: Tensor, t: Tensor) -> Tensor:
    """alpha_i = 1 - beta_i of the DDPM chain for a VPSDE, 1 otherwise (the official correctors' factor)."""
    if isinstance(s.sde, VPSDE):
        return table_on(s.sde.alphas, x.device, x.dtype)[s.sde.timestep(t)]
    return torch.ones_like(t)


def _rule(s: PCState, corrector: str) -> str:
    rules = CORRECTOR_STEP_RULES[corrector]
    if s.step_rule is None:
        return rules[0]
    if s.step_rule not in rules:
        raise ValueError(f"step_rule {s.step_rule!r} is not one of the {corrector} corrector's: {', '.join(rules)}")
    return s.step_rule


def _std(s: PCState, t: Tensor) -> Tensor:
    return s.sde.marginal_prob(torch.zeros_like(t), t)[1]


@CORRECTORS.register("langevin")
def langevin(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Langevin MCMC x <- x + eps score + sqrt(2 eps) z at fixed t (Song et al. 2021, Algorithms 4-5), with
    step rule ``marginal_std``: eps = 2 alpha_i (r std(t))^2, one step per time, so a valid Langevin kernel and
    the same for every image; or ``official``: eps = 2 alpha_i (r mean_b ||z_b|| / mean_b ||score_b||)^2,
    norms averaged over the batch as score_sde's LangevinCorrector."""
    rule = _rule(s, "langevin")
    alpha = _alpha(s, x, t)
    std = _std(s, t)
    x_mean = x
    for _ in range(s.n_steps_each):
        grad, z = s.score_fn(x, t), s.noise()
        if rule == "official":
            eps = (s.snr * _norm(z).mean() / _norm(grad).mean()) ** 2 * 2 * alpha
        else:
            eps = (s.snr * std) ** 2 * 2 * alpha
        x_mean = x + bcast(eps, x) * grad
        x = x_mean + bcast(torch.sqrt(eps * 2), x) * z
    return x, x_mean


@CORRECTORS.register("ald")
def annealed_langevin(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Annealed Langevin dynamics at level sigma_i = std(t), n_steps_each times. Step rule ``song_ermon``:
    alpha_i = step_lr sigma_i^2 / sigma_L^2, x <- x + alpha_i / 2 score + sqrt(alpha_i) z (Song & Ermon 2019,
    Algorithm 1); ``official``: score_sde's AnnealedLangevinDynamics, the same kernel with
    alpha_i / 2 = 2 a_i (r sigma_i)^2 (a_i = 1 - beta_i for a VPSDE, else 1)."""
    std = _std(s, t)
    if _rule(s, "ald") == "official":
        half = (s.snr * std) ** 2 * 2 * _alpha(s, x, t)
        noise_std = torch.sqrt(half * 2)
    else:
        alpha = s.step_lr * (std / s.std_last) ** 2
        half, noise_std = alpha / 2, torch.sqrt(alpha)
    x_mean = x
    for _ in range(s.n_steps_each):
        x_mean = x + bcast(half, x) * s.score_fn(x, t)
        x = x_mean + s.noise() * bcast(noise_std, x)
    return x, x_mean


CORRECTOR_STEP_RULES: dict[str, tuple[str, ...]] = {"langevin": ("marginal_std", "official"),
                                                    "ald": ("song_ermon", "official"), "none": ("none",)}
"""Step rules per corrector; the first is the default."""


@CORRECTORS.register("none")
def no_corrector(s: PCState, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return x, x


Projection = Callable[[Tensor, Tensor, Tensor], "tuple[Tensor, Tensor]"]


class PCSampler(Sampler):
    """Predictor-corrector sampler on t_i = linspace(T, eps, steps) (Song et al. 2021, Algorithms 2-3).

    The Langevin corrector's default step is eps_i = 2 alpha_i (snr std(t_i))^2 (``step_rule="marginal_std"``):
    it depends on the time alone, so each image depends on its seed only and the chain keeps p_t invariant (up to
    the O(eps) Langevin discretisation). It is the official snr rule eps = 2 alpha (snr ||z|| / ||score||)^2 with
    ||score|| replaced by its typical size sqrt(d) / std(t), which is what it is for images. ``step_rule="official"``
    reproduces score_sde's rule, norms averaged over the batch, so an image then depends on its batch-mates.

    Args:
        predictor: a name in ``PREDICTORS``: euler_maruyama, reverse_diffusion, ancestral_sampling, none.
        corrector: a name in ``CORRECTORS``: langevin, ald (annealed Langevin dynamics), none.
        snr: signal-to-noise ratio r of the Langevin corrector (and of ``ald`` with ``step_rule="official"``).
        n_steps_each: corrector steps per noise level (T of Song & Ermon's Algorithm 1).
        step_lr: epsilon of annealed Langevin, whose step at level i is epsilon sigma_i^2 / sigma_L^2.
        steps: number of noise levels N (default: the SDE's own N).
        eps: last time, where the sampler stops (default: as the official code, 1e-5 for a VESDE, 1e-3 otherwise);
            0 puts the levels on the SDE's discrete sigmas.
        denoise: return the last predictor step's noise-free mean (a corrector-only sampler returns its last
            iterate, as Song & Ermon's Algorithm 1 and the official code).
        order: ``corrector_first`` (the default, the official score_sde code, with which the paper's FIDs were
            computed: the chain ends on a predictor step, so ``denoise`` removes the predictor's noise), or
            ``predictor_first`` (the paper's Algorithms 2-3).
        step_rule: the corrector's step size, one of ``CORRECTOR_STEP_RULES[corrector]``: for langevin
            ``marginal_std`` (default) or ``official``; for ald ``song_ermon`` (default, Song & Ermon's
            Algorithm 1 with step_lr) or ``official`` (score_sde's AnnealedLangevinDynamics, with snr).
    The chain starts at x_T = prior std * z, z the seeds' starting noise; the predictor's and corrector's noise
    are draws 0, 1, ... of each seed's noise stream.
    """

    def __init__(self, predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
                 n_steps_each: int = 1, step_lr: float = 2e-5, steps: int | None = None, eps: float | None = None,
                 denoise: bool = True, order: Literal["corrector_first", "predictor_first"] = "corrector_first",
                 step_rule: str | None = None) -> None:
        check_choice("predictor", predictor, PREDICTORS.names())
        check_choice("corrector", corrector, CORRECTORS.names())
        check_real("snr", snr, 0, low_open=True)
        check_int("n_steps_each", n_steps_each, 1)
        check_real("step_lr", step_lr, 0, low_open=True)
        check_int("steps", steps, 1, none="the SDE's N")
        check_real("eps", eps, 0, none="1e-5 for a VESDE, 1e-3 otherwise")
        check_bool("denoise", denoise)
        check_choice("order", order, ("corrector_first", "predictor_first"))
        rules = CORRECTOR_STEP_RULES.get(corrector)
        if step_rule is None:
            step_rule = rules[0] if rules else None
        elif rules is not None and step_rule not in rules:
            raise ValueError(f"step_rule {step_rule!r} is not one of the {corrector} corrector's: {', '.join(rules)}")
        self.predictor, self.corrector = PREDICTORS[predictor], CORRECTORS[corrector]
        self.predictor_name, self.corrector_name = predictor, corrector
        self.snr, self.n_steps_each, self.step_lr, self.steps = snr, n_steps_each, step_lr, steps
        self.eps, self.denoise, self.order, self.step_rule = eps, denoise, order, step_rule

    def planned_nfe(self, sde: SDE) -> int:
        """One evaluation per predictor step and ``n_steps_each`` per corrector step, at each of the N levels."""
        per_level = (self.predictor is not no_predictor) + self.n_steps_each * (self.corrector is not no_corrector)
        return (self.steps or sde.N) * per_level

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", start_noise: Tensor | None = None, x_init: Tensor | None = None,
               project: Projection | None = None) -> SampleResult:
        """``x_init``, if given, is x_T itself (in place of prior std * z); ``project(x, x_mean, t)``, if given, runs
        after each time step (conditional generation, appendix I)."""
        sde = rediscretize(sde, self.steps or sde.N)
        counted = Counted(D)
        noise = SeededNoise(seeds, shape, device)
        x = sde.prior_from_noise(initial_noise(seeds, shape, device, start_noise)) if x_init is None else x_init
        eps = default_eps(sde) if self.eps is None else self.eps
        grid = torch.linspace(sde.T, eps, sde.N, dtype=torch.float64)
        timesteps = grid.to(device, x.dtype)  # one copy to the device; the steps index it there
        std_last = float(sde.marginal_prob(torch.zeros(1), grid[-1:].to(x.dtype))[1])
        if self.corrector_name == "ald" and std_last <= 0:
            raise ValueError("annealed Langevin needs a positive noise level at the last time; raise eps")
        state = PCState(sde, sde.reverse(counted.score), counted.score, noise, self.snr, self.n_steps_each, self.step_lr,
                        std_last, self.step_rule)
        ops = [self.corrector, self.predictor] if self.order == "corrector_first" else [self.predictor, self.corrector]
        ops = [op for op in ops if op not in (no_predictor, no_corrector)]
        x_mean = x
        for t in timesteps:
            vec_t = time_vector(t, x)
            for op in ops:
                x, x_mean = op(state, x, vec_t)
            if project is not None:
                x, x_mean = project(x, x_mean, vec_t)
        if self.predictor is no_predictor:  # corrector alone: the last iterate, as Algorithm 1 and score_sde
            return SampleResult(x, counted.nfe)
        return SampleResult(x_mean if self.denoise else x, counted.nfe)


def default_eps(sde: SDE) -> float:
    """The official code's last sampling time: 1e-5 for a VESDE, 1e-3 for VP-type SDEs."""
    return 1e-5 if isinstance(sde, VESDE) else 1e-3
