"""Denoising score-matching objectives: continuous (Song et al. 2021, eq. 7) and the discrete SMLD / DDPM ones."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lit_score.sdes import SDE, VESDE, VPSDE, ScoreFn, _bcast

ModelFn = Callable[[Tensor, Tensor], Tensor]


def _reduce(losses: Tensor, reduce_mean: bool) -> Tensor:
    """Per-sample reduction over data dimensions: mean, or half the sum as the official code."""
    flat = losses.flatten(1)
    return flat.mean(1) if reduce_mean else 0.5 * flat.sum(1)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _rand(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(n, device=like.device, dtype=like.dtype)
    return torch.rand(n, generator=generator, dtype=like.dtype).to(like.device)


def dsm_loss(score_fn: ScoreFn, sde: SDE, x: Tensor, eps: float = 1e-5, reduce_mean: bool = True,
             likelihood_weighting: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Continuous denoising score matching with t ~ U(eps, T) (Song et al. 2021, eq. 7).

    lambda(t) = std(t)^2 by default, or g(t)^2 with likelihood_weighting (Song et al. 2021b, "Maximum likelihood
    training of score-based diffusion models").
    """
    t = _rand(x.shape[0], x, generator) * (sde.T - eps) + eps
    z = _randn(x, generator)
    mean, std = sde.marginal_prob(x, t)
    score = score_fn(mean + _bcast(std, x) * z, t)
    if likelihood_weighting:
        g2 = sde.diffusion(t) ** 2
        losses = _reduce(torch.square(score + z / _bcast(std, x)), reduce_mean) * g2
    else:
        losses = _reduce(torch.square(score * _bcast(std, x) + z), reduce_mean)
    return losses.mean()


def smld_loss(model_fn: ModelFn, sde: VESDE, x: Tensor, reduce_mean: bool = False,
              generator: torch.Generator | None = None) -> Tensor:
    """Discrete NCSN objective over the geometric noise levels of a VE SDE, weighted by sigma^2 (Song & Ermon 2019, eq. 5-6).

    The network is conditioned on sigma and (with scale_by_sigma) outputs the score.
    """
    if not isinstance(sde, VESDE):
        raise TypeError(f"the SMLD loss needs a VESDE, got {type(sde).__name__}")
    idx = (_rand(x.shape[0], x, generator) * sde.N).long().clamp(max=sde.N - 1)
    sigma = sde.discrete_sigmas.to(x.device, x.dtype)[idx]
    noise = _randn(x, generator) * _bcast(sigma, x)
    score = model_fn(x + noise, sigma)
    target = -noise / _bcast(sigma, x) ** 2
    return (_reduce(torch.square(score - target), reduce_mean) * sigma**2).mean()


def ddpm_loss(model_fn: ModelFn, sde: VPSDE, x: Tensor, reduce_mean: bool = True,
              generator: torch.Generator | None = None) -> Tensor:
    """Discrete DDPM noise-prediction objective (Ho et al. 2020, eq. 14); the network sees the step index."""
    if not isinstance(sde, VPSDE):
        raise TypeError(f"the DDPM loss needs a VPSDE, got {type(sde).__name__}")
    idx = (_rand(x.shape[0], x, generator) * sde.N).long().clamp(max=sde.N - 1)
    a = sde.sqrt_alphas_cumprod.to(x.device, x.dtype)[idx]
    s = sde.sqrt_1m_alphas_cumprod.to(x.device, x.dtype)[idx]
    noise = _randn(x, generator)
    out = model_fn(_bcast(a, x) * x + _bcast(s, x) * noise, idx.to(x.dtype))
    return _reduce(torch.square(out - noise), reduce_mean).mean()
