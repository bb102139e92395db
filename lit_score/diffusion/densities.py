"""Gaussian mixtures whose SDE-perturbed densities and scores are exact, and the 2-D toy densities built from them.

If p_0 = sum_k w_k N(mu_k, diag(s_k^2)) and the SDE's kernel is N(scale(t) x_0, std(t)^2 I), then
p_t = sum_k w_k N(scale(t) mu_k, diag(scale(t)^2 s_k^2 + std(t)^2)) (Song et al. 2021, eq. 5 with a Gaussian prior).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.sdes import SDE, ScoreFn
from lit_score.registry import Registry


class GaussianMixture:
    """sum_k w_k N(mu_k, diag(s_k^2)) on R^D; samples and arguments may have any per-sample shape with D elements.

    Args:
        weights: (K,) non-negative mixture weights (normalised here).
        means: (K, D) component means.
        stds: (K,) isotropic or (K, D) diagonal component standard deviations, all > 0.
    """

    def __init__(self, weights: Sequence[float] | Tensor, means: Sequence[Sequence[float]] | Tensor,
                 stds: Sequence[float] | Tensor) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64)
        if mu.dim() != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(mu.shape)}")
        K, D = mu.shape
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum, got {w.tolist()}")
        if s.dim() == 1:
            s = s[:, None].expand(K, D)
        if s.shape != (K, D) or (s <= 0).any():
            raise ValueError(f"stds must be (K,) or (K, D) = ({K}, {D}) positive numbers, got shape {tuple(s.shape)}")
        self.weights, self.means, self.stds = w / w.sum(), mu, s.clone()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, D) in float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).float()

    def _perturbed(self, sde: SDE | None, t: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample component means (B, K, D) and variances (B, K, D) of p_t."""
        B = like.shape[0]
        mu, var = self.means.to(like.device), self.stds.to(like.device) ** 2
        if sde is None:
            return mu.expand(B, -1, -1), var.expand(B, -1, -1)
        t = torch.as_tensor(t, dtype=torch.float64, device=like.device).expand(B)
        scale, std = sde.marginal_prob(torch.ones(B, dtype=torch.float64, device=like.device), t)
        scale, std = scale[:, None, None], std[:, None, None]
        return scale * mu, scale**2 * var + std**2

    def _component_logp(self, x: Tensor, sde: SDE | None, t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        y = x.reshape(x.shape[0], -1).double()
        if y.shape[1] != self.dim:
            raise ValueError(f"this mixture lives in R^{self.dim}, got samples with {y.shape[1]} elements")
        m, v = self._perturbed(sde, t, y)
        diff = y[:, None, :] - m
        logn = -0.5 * (diff**2 / v + torch.log(2 * math.pi * v)).sum(-1)
        return logn + torch.log(self.weights.to(y.device)), diff, v

    def log_prob(self, x: Tensor, sde: SDE | None = None, t: Tensor | float | None = None) -> Tensor:
        """log p_t(x) per sample (float64); log p_0 = the mixture itself when ``sde`` is None."""
        return torch.logsumexp(self._component_logp(x, sde, t)[0], dim=1)

    def score(self, x: Tensor, sde: SDE | None = None, t: Tensor | float | None = None) -> Tensor:
        """grad_x log p_t(x) = sum_k r_k(x) (m_k - x) / v_k, in x's shape and dtype."""
        logp, diff, v = self._component_logp(x, sde, t)
        r = torch.softmax(logp, dim=1)[..., None]
        return (-(r * diff / v).sum(1)).reshape(x.shape).to(x.dtype)

    def score_fn(self, sde: SDE) -> ScoreFn:
        """The exact score s(x, t) of p_t under ``sde``."""
        return lambda x, t: self.score(x, sde, t)

    def posterior_mean(self, x_hat: Tensor, sigma: Tensor | float) -> Tensor:
        """E[x_0 | x_0 + sigma n = x_hat] = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (x_hat - mu_k)), with r_k the
        posterior weights of the components, in x_hat's shape and dtype."""
        y = x_hat.reshape(x_hat.shape[0], -1).double()
        if y.shape[1] != self.dim:
            raise ValueError(f"this mixture lives in R^{self.dim}, got samples with {y.shape[1]} elements")
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).expand(y.shape[0])[:, None, None] ** 2
        mu, var = self.means.to(y.device), self.stds.to(y.device) ** 2
        diff = y[:, None, :] - mu
        v = var + s2
        logr = -0.5 * (diff**2 / v + torch.log(2 * math.pi * v)).sum(-1) + torch.log(self.weights.to(y.device))
        r = torch.softmax(logr, dim=1)[..., None]
        return (r * (mu + var / v * diff)).sum(1).reshape(x_hat.shape).to(x_hat.dtype)

    def denoiser(self, sde: SDE) -> "MixtureDenoiser":
        """The exact denoiser (and score) of this mixture under ``sde``, usable wherever a model's is."""
        return MixtureDenoiser(self, sde)


class MixtureDenoiser(Denoiser):
    """The ideal denoiser of a Gaussian mixture, D = E[x_0 | x_hat], with its exact score (no Tweedie round trip)."""

    def __init__(self, mixture: GaussianMixture, sde: SDE) -> None:
        self.mixture, self.sde = mixture, sde

    def __call__(self, x_hat, sigma, cond=None):
        return self.mixture.posterior_mean(x_hat, sigma)

    def score(self, x, t, cond=None):
        return self.mixture.score(x, self.sde, t)


TOY_DENSITIES: Registry[Callable[[], GaussianMixture]] = Registry("toy density")


def _on_curve(points: torch.Tensor, std: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(len(points)), points, torch.full((len(points),), std))


@TOY_DENSITIES.register("two_gaussians")
def two_gaussians() -> GaussianMixture:
    """The talk's mixture: weights 0.2 / 0.8 at (-2, -2) and (2, 2), std 0.6 (unequal weights Langevin misses)."""
    return GaussianMixture([0.2, 0.8], [[-2.0, -2.0], [2.0, 2.0]], [0.6, 0.6])


@TOY_DENSITIES.register("eight_gaussians")
def eight_gaussians() -> GaussianMixture:
    a = torch.arange(8) * 2 * math.pi / 8
    return _on_curve(3 * torch.stack([a.cos(), a.sin()], 1), 0.25)


@TOY_DENSITIES.register("rings")
def rings() -> GaussianMixture:
    """Two concentric rings of radii 1.5 and 3, each a chain of 48 small Gaussians."""
    a = torch.arange(48) * 2 * math.pi / 48
    circle = torch.stack([a.cos(), a.sin()], 1)
    return _on_curve(torch.cat([1.5 * circle, 3.0 * circle]), 0.12)


@TOY_DENSITIES.register("moons")
def moons() -> GaussianMixture:
    """Two interleaved half circles (scikit-learn's make_moons shape, scaled by 2), 32 Gaussians each."""
    a = torch.linspace(0, math.pi, 32)
    upper = torch.stack([a.cos(), a.sin()], 1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
    return _on_curve(2 * (torch.cat([upper, lower]) - torch.tensor([0.5, 0.25])), 0.1)


@TOY_DENSITIES.register("checkerboard")
def checkerboard() -> GaussianMixture:
    """The black squares of a 4 x 4 board on [-4, 4]^2, each filled by 4 x 4 Gaussians."""
    centres = []
    for i in range(4):
        for j in range(4):
            if (i + j) % 2 == 0:
                for u in range(4):
                    for v in range(4):
                        centres.append([-4 + 2 * i + 0.25 + 0.5 * u, -4 + 2 * j + 0.25 + 0.5 * v])
    return _on_curve(torch.tensor(centres), 0.2)
