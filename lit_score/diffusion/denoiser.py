"""The model's one interface: the denoiser D(x_hat; sigma, cond) = E[x_0 | x_hat] (Karras et al. 2022, section 2),
where x_hat = x_t / s(t) is the SDE's sigma view x_t = s(t) (x_0 + sigma(t) n) (``lit_score.diffusion.sdes``).

A network F becomes a denoiser through one preconditioning (Karras et al. 2022, eq. 7 and Table 1):
D(x_hat; sigma) = c_skip(sigma) x_hat + c_out(sigma) F(c_in(sigma) x_hat; c_noise(sigma), cond).
EDM's own parametrisation and score_sde's (noise prediction for VP-type SDEs, the scaled score for VE, the discrete
SMLD and DDPM levels) are all preconditionings here; F is called with the noise label c_noise it embeds.
Samplers in the sigma view call D; the score-view samplers and the likelihood call ``Denoiser.score``.
"""
from __future__ import annotations

import abc
import copy
from typing import Callable

import torch
from torch import Tensor, nn

from lit_score.diffusion.sdes import SDE, VESDE, VPSDE, bcast, table_on
from lit_score.networks.cond import Cond


class Denoiser(abc.ABC):
    """D(x_hat; sigma, cond) for the sigma view of ``sde``, and the score it implies."""

    sde: SDE

    @abc.abstractmethod
    def __call__(self, x_hat: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        """E[x_0 | x_hat] at noise levels sigma (B,)."""

    def residual(self, x_hat: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        """D(x_hat; sigma) - x_hat, which a subclass may compute without the cancellation of the difference."""
        return self(x_hat, sigma, cond) - x_hat

    def score(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """grad log p_t(x) = (D(x / s; sigma) - x / s) / (s sigma^2) (Tweedie's formula; Karras et al. 2022, eq. 3)."""
        sigma, s = self.sde.sigma(t), self.sde.scale(t)
        return self.residual(x / bcast(s, x), sigma, cond) / bcast(s * sigma**2, x)

    def rows(self, index: Tensor) -> "Denoiser":
        """The denoiser of images ``index`` of the batch, for solvers that step some images only: per-image
        conditioning bound to the batch (class labels) is sliced; a denoiser without any is itself."""
        return self


def score_rows(score_fn: Callable[..., Tensor], index: Tensor) -> Callable[..., Tensor]:
    """``score_fn`` for images ``index`` of the batch: a denoiser's score of those rows (``Denoiser.rows``)."""
    owner = getattr(score_fn, "__self__", None)
    return owner.rows(index).score if isinstance(owner, Denoiser) else score_fn


class Counted(Denoiser):
    """A denoiser that counts its evaluations (NFE), D and score alike, and calls ``on_call`` after each."""

    def __init__(self, inner: Denoiser, on_call: Callable[[], None] | None = None) -> None:
        self.inner, self.sde, self.on_call, self.nfe = inner, inner.sde, on_call, 0
        self._root = self

    def _counted(self, out: Tensor) -> Tensor:
        self._root.nfe += 1
        if self.on_call is not None:
            self.on_call()
        return out

    def rows(self, index):
        inner = self.inner.rows(index)
        if inner is self.inner:
            return self
        view = copy.copy(self)
        view.inner = inner
        return view

    def __call__(self, x_hat, sigma, cond=None):
        return self._counted(self.inner(x_hat, sigma, cond))

    def score(self, x, t, cond=None):
        return self._counted(self.inner.score(x, t, cond))


class Preconditioning(abc.ABC):
    """c_skip, c_out, c_in and c_noise as functions of sigma (one value per sample) under the model's SDE."""

    @abc.abstractmethod
    def coefficients(self, sigma: Tensor, sde: SDE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma."""

    def check(self, sde: SDE) -> None:
        """Raise when this parametrisation is not defined under ``sde``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _label(value: Tensor, log: bool) -> Tensor:
    return value.log() if log else value


class EDMPrecond(Preconditioning):
    """EDM's own: unit-variance input and target for data of std sigma_data (Karras et al. 2022, Table 1, eq. 7)."""

    def __init__(self, sigma_data: float = 0.5) -> None:
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma, sde):
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


class ConsistencyPrecond(Preconditioning):
    """A consistency function f(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with f(x; sigma_min) = x for any F
    (Song et al. 2023, eq. 5 and appendix C): EDM's c_in and c_noise, c_skip = sigma_data^2 / ((sigma - sigma_min)^2
    + sigma_data^2), c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2), as ECT samples (Geng et
    al. 2024). A network trained with EDMPrecond keeps its meaning away from sigma_min.

    Args:
        sigma_data: the data's standard deviation.
        sigma_min: where f is the identity (the samplers' smallest noise level).
    """

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        if not sigma_data > 0 or not sigma_min > 0:
            raise ValueError(f"sigma_data and sigma_min must be positive, got {sigma_data} and {sigma_min}")
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)

    def coefficients(self, sigma, sde):
        sd2, above = self.sigma_data**2, sigma - self.sigma_min
        scale = (sigma**2 + sd2).rsqrt()
        return sd2 / (above**2 + sd2), above * self.sigma_data * scale, scale, sigma.log() / 4


class VPPrecond(Preconditioning):
    """The VP SDE's noise prediction in EDM's form (Karras et al. 2022, Table 1): c_skip = 1, c_out = -sigma,
    c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma) for its own linear beta schedule."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, M: int = 1000) -> None:
        if M < 2:
            raise ValueError(f"VPPrecond needs M >= 2, got {M}")
        self._schedule = VPSDE(beta_min, beta_max)
        self.beta_min, self.beta_max, self.M = float(beta_min), float(beta_max), int(M)

    def coefficients(self, sigma, sde):
        t = self._schedule.t_from_sigma(sigma)
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt(), (self.M - 1) * t


class VEPrecond(Preconditioning):
    """The VE SDE's parametrisation in EDM's form (Karras et al. 2022, Table 1): c_skip = 1, c_out = sigma,
    c_in = 1, c_noise = log(sigma / 2)."""

    def coefficients(self, sigma, sde):
        one = torch.ones_like(sigma)
        return one, sigma, one, torch.log(0.5 * sigma)


class NoisePrediction(Preconditioning):
    """score_sde's VP / sub-VP networks (DDPM++ cont.): F predicts the noise, score = -F / std(t), conditioned on
    999 t (Song et al. 2021, official ``get_score_fn``): c_skip = 1, c_out = -sigma, c_in = s(t), c_noise = 999 t.

    Args:
        log_label: c_noise = log(999 t), for networks with Fourier embeddings.
    """

    def __init__(self, log_label: bool = False) -> None:
        self.log_label = bool(log_label)

    def coefficients(self, sigma, sde):
        t = sde.t_from_sigma(sigma)
        return torch.ones_like(sigma), -sigma, sde.scale(t), _label(999 * t, self.log_label)


class ScorePrediction(Preconditioning):
    """score_sde's VE networks (NCSN++ cont.): F is the score times sigma, conditioned on sigma (Song et al. 2021):
    c_skip = 1, c_out = s sigma, c_in = s(t), c_noise = log sigma.

    Args:
        scale_by_sigma: F is sigma times the score (the official VE networks); false: F is the score itself,
            c_out = s sigma^2.
        log_label: c_noise = log sigma (Fourier embeddings, the official VE networks); false: sigma.
    """

    def __init__(self, scale_by_sigma: bool = True, log_label: bool = True) -> None:
        self.scale_by_sigma, self.log_label = bool(scale_by_sigma), bool(log_label)

    def coefficients(self, sigma, sde):
        s = sde.scale(sde.t_from_sigma(sigma))
        c_out = s * sigma if self.scale_by_sigma else s * sigma**2
        return torch.ones_like(sigma), c_out, s, _label(sigma, self.log_label)


class SMLDLevels(Preconditioning):
    """Networks trained with the discrete NCSN objective (Song & Ermon 2019) on a VE SDE's N levels: F is
    conditioned on the level sigma_i nearest sigma (counted from sigma_max down, as the official discrete labels)
    and gives the score at it: c_skip = 1, c_out = sigma^2 / sigma_i, c_in = 1, c_noise = log sigma_i.

    Args:
        scale_by_sigma, log_label: as ``ScorePrediction``, at the level sigma_i.
    """

    def __init__(self, scale_by_sigma: bool = True, log_label: bool = True) -> None:
        self.scale_by_sigma, self.log_label = bool(scale_by_sigma), bool(log_label)

    def check(self, sde: SDE) -> None:
        if not isinstance(sde, VESDE):
            raise TypeError(f"SMLDLevels needs a VESDE (its discrete noise levels), got {type(sde).__name__}")

    def coefficients(self, sigma, sde):
        level = torch.round((sde.T - sde.t_from_sigma(sigma)) * (sde.N - 1) / sde.T).long().clamp(0, sde.N - 1)
        sigma_i = table_on(sde.discrete_sigmas, sigma.device, sigma.dtype)[sde.N - 1 - level]
        c_out = sigma**2 / sigma_i if self.scale_by_sigma else sigma**2
        one = torch.ones_like(sigma)
        return one, c_out, one, _label(sigma_i, self.log_label)


class DDPMSteps(Preconditioning):
    """Networks trained with the discrete DDPM objective (Ho et al. 2020) on a VP SDE's N steps: F predicts the
    noise, conditioned on t (N - 1), scaled by the step's std sqrt(1 - alpha_bar_i), i = floor(t (N - 1))
    (official ``get_score_fn``, continuous=False): c_skip = 1, c_out = -sigma^2 s / std_i, c_in = s, c_noise = t (N - 1).

    Args:
        log_label: c_noise = log(t (N - 1)), for networks with Fourier embeddings.
    """

    def __init__(self, log_label: bool = False) -> None:
        self.log_label = bool(log_label)

    def check(self, sde: SDE) -> None:
        if not isinstance(sde, VPSDE):
            raise TypeError(f"DDPMSteps needs a VPSDE (its DDPM steps), got {type(sde).__name__}")

    def step_label(self, i: Tensor) -> Tensor:
        """c_noise of discrete step i, the label the DDPM objective trains F with."""
        return _label(i.float(), self.log_label)

    def coefficients(self, sigma, sde):
        t = sde.t_from_sigma(sigma)
        s = sde.scale(t)
        std_i = table_on(sde.sqrt_1m_alphas_cumprod, sigma.device, sigma.dtype)[sde.timestep(t).clamp(0, sde.N - 1)]
        return torch.ones_like(sigma), -sigma**2 * s / std_i, s, _label(t * (sde.N - 1), self.log_label)


class NetworkDenoiser(Denoiser):
    """D(x_hat; sigma, cond) = c_skip x_hat + c_out F(c_in x_hat; c_noise, cond) (Karras et al. 2022, eq. 7).

    ``net(x, c_noise)`` (``net(x, c_noise, cond)`` when conditioned) must not rescale its own output."""

    def __init__(self, net: nn.Module, precond: Preconditioning, sde: SDE) -> None:
        precond.check(sde)
        self.net, self.precond, self.sde = net, precond, sde

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on (0: unconditional)."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    def _parts(self, x_hat: Tensor, sigma: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor, Tensor]:
        """c_skip, c_out (broadcast to x_hat) and F(c_in x_hat; c_noise, cond)."""
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma, self.sde)
        x_in = bcast(c_in, x_hat) * x_hat
        out = self.net(x_in, c_noise) if cond is None else self.net(x_in, c_noise, cond)
        return bcast(c_skip, x_hat), bcast(c_out, x_hat), out.to(x_hat.dtype)

    def __call__(self, x_hat, sigma, cond=None):
        c_skip, c_out, out = self._parts(x_hat, sigma, cond)
        return c_skip * x_hat + c_out * out

    def residual(self, x_hat, sigma, cond=None):
        """(c_skip - 1) x_hat + c_out F: for score_sde's parametrisations (c_skip = 1) the score is c_out F / (s
        sigma^2) to float precision at every sigma, as their networks were trained."""
        c_skip, c_out, out = self._parts(x_hat, sigma, cond)
        return (c_skip - 1) * x_hat + c_out * out



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


__all__ = ["Denoiser", "Counted", "NetworkDenoiser", "Preconditioning", "EDMPrecond", "ConsistencyPrecond",
           "VPPrecond", "VEPrecond",
           "NoisePrediction", "ScorePrediction", "SMLDLevels", "DDPMSteps", "lognormal_sigma", "edm_weighting"]
