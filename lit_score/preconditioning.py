"""Network preconditioning of Karras et al. 2022 (EDM, section 5 and Table 1): the denoiser
D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)) around any lit-score network F,
and the score it implies for any SDE's sigma view x_t = s(t) (x_0 + sigma(t) n) (``lit_score.sdes``):
score(x_t, t) = (D(x_t / s; sigma) - x_t / s) / (s sigma^2) (Tweedie's formula, Karras et al. 2022, eq. 3).
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import Tensor, nn

from lit_score.sdes import SDE, ScoreFn, _bcast

Denoiser = Callable[[Tensor, Tensor], Tensor]  # D(x_hat (B, ...), sigma (B,))


class Preconditioning(abc.ABC):
    """c_skip, c_out, c_in and c_noise as functions of sigma (one value per sample)."""

    @abc.abstractmethod
    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class EDMPrecond(Preconditioning):
    """EDM's own: unit-variance input and target for data of std sigma_data (Karras et al. 2022, Table 1, eq. 7)."""

    def __init__(self, sigma_data: float = 0.5) -> None:
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


class VPPrecond(Preconditioning):
    """The VP SDE's noise prediction (DDPM++ cont., Song et al. 2021) in EDM's form (Karras et al. 2022, Table 1):
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma) of the linear beta schedule."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, M: int = 1000) -> None:
        if not 0 <= beta_min < beta_max or M < 2:
            raise ValueError(f"VPPrecond needs 0 <= beta_min < beta_max and M >= 2, got {beta_min}, {beta_max}, {M}")
        self.beta_min, self.beta_max, self.M = float(beta_min), float(beta_max), int(M)

    def t(self, sigma: Tensor) -> Tensor:
        """Inverse of sigma(t) = sqrt(exp(beta_min t + (beta_max - beta_min) t^2 / 2) - 1)."""
        d = self.beta_max - self.beta_min
        B = torch.log1p(sigma**2)
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B))

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt(), (self.M - 1) * self.t(sigma)


class VEPrecond(Preconditioning):
    """The VE SDE's parametrisation (NCSN++ cont., Song et al. 2021) in EDM's form (Karras et al. 2022, Table 1):
    c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma / 2)."""

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        one = torch.ones_like(sigma)
        return one, sigma, one, torch.log(0.5 * sigma)


def network_label(net: nn.Module, c_noise: Tensor) -> Tensor:
    """The label F is called with so that it embeds c_noise: lit-score's Fourier embeddings take log(label)
    (``embedding_type: fourier``), so they get exp(c_noise); positional ones get c_noise itself."""
    return c_noise.exp() if getattr(net, "embedding_type", None) == "fourier" else c_noise


def check_network(net: nn.Module) -> None:
    """Refuse a network that rescales its own output: the preconditioning's c_out does that."""
    if getattr(net, "scale_by_sigma", False):
        raise ValueError(f"{type(net).__name__} has scale_by_sigma: true, which divides its output by the noise "
                         "label; under a preconditioning c_out scales the output: set scale_by_sigma: false")


def preconditioned_denoiser(net: nn.Module, precond: Preconditioning) -> Denoiser:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, eq. 7)."""
    check_network(net)

    def D(x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
        out = net(_bcast(c_in, x) * x, network_label(net, c_noise))
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * out.to(x.dtype)

    return D


def score_from_denoiser(D: Denoiser, sde: SDE) -> ScoreFn:
    """score(x_t, t) = (D(x_t / s(t); sigma(t)) - x_t / s(t)) / (s(t) sigma(t)^2)."""

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        sigma, s = sde.sigma(t), sde.scale(t)
        x_hat = x / _bcast(s, x)
        return (D(x_hat, sigma) - x_hat) / _bcast(s * sigma**2, x)

    return score_fn


def lognormal_sigma(n: int, P_mean: float, P_std: float, like: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, section 5), one value per sample."""
    if generator is None:
        z = torch.randn(n, device=like.device, dtype=like.dtype)
    else:
        z = torch.randn(n, generator=generator, dtype=like.dtype).to(like.device)
    return torch.exp(P_mean + P_std * z)


def edm_weighting(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


__all__ = ["Preconditioning", "EDMPrecond", "VPPrecond", "VEPrecond", "preconditioned_denoiser",
           "score_from_denoiser", "network_label", "lognormal_sigma", "edm_weighting"]
