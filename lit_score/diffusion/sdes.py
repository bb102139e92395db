"""Forward SDEs dx = f(x, t) dt + g(t) dw and their reverses (Song et al. 2021).

Every SDE here is affine in x, so its perturbation kernel is Gaussian:
``x_t = scale(t) * (x_0 + sigma(t) * z)``, i.e. mean ``scale(t) x_0`` and std ``scale(t) sigma(t)``.
That "sigma view" (Karras et al. 2022, eq. 4) is what the fast samplers use.
"""
from __future__ import annotations

import abc
import copy
import math
import weakref
from typing import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]

def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) so it broadcasts against x (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


_TABLE_COPIES: dict[int, dict] = {}  # id(table) -> {(device, dtype): copy}, dropped with the table


def table_on(table: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``table.to(device, dtype)``, copied once per (table, device, dtype): a discretisation table indexed at
    every sampling step costs no host-to-device copy (a synchronisation on CUDA) after the first."""
    dtype = table.dtype if dtype is None else dtype
    if table.device == torch.device(device) and table.dtype == dtype:
        return table
    if id(table) not in _TABLE_COPIES:
        _TABLE_COPIES[id(table)] = {}
        weakref.finalize(table, _TABLE_COPIES.pop, id(table), None)
    copies, key = _TABLE_COPIES[id(table)], (str(device), dtype)
    if key not in copies:
        copies[key] = table.to(device, dtype)
    return copies[key]


class SDE(abc.ABC):
    """Base class of forward SDEs on [0, T]; subclass it and implement the abstract methods to add one."""

    def __init__(self, N: int = 1000) -> None:
        if N < 1:
            raise ValueError(f"N (the number of discretisation steps) must be >= 1, got {N}")
        self.N = N

    def _discretise(self) -> None:
        """Build the tables of the N-step discretisation (SMLD sigmas, DDPM betas); none by default."""

    def with_steps(self, N: int) -> "SDE":
        """A copy of this SDE whose discretisation has N steps (its continuous-time coefficients are unchanged)."""
        if N < 1:
            raise ValueError(f"the number of discretisation steps must be >= 1, got {N}")
        new = copy.copy(self)
        new.N = N
        new._discretise()
        return new

    @property
    def T(self) -> float:
        return 1.0

    @abc.abstractmethod
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t)."""

    @abc.abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), one value per sample."""

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.drift(x, t), self.diffusion(t)

    @abc.abstractmethod
    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the perturbation kernel p_0t(x_t | x_0 = x)."""

    @abc.abstractmethod
    def prior_sampling(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of p_T."""

    def prior_from_noise(self, z: Tensor) -> Tensor:
        """The sample of p_T that standard normal noise z maps to (how seeded samplers draw the prior)."""
        raise NotImplementedError(f"{type(self).__name__} must implement prior_from_noise(z) to be sampled with "
                                  "per-image seeds (e.g. return z * prior std for a Gaussian prior)")

    @abc.abstractmethod
    def prior_logp(self, z: Tensor) -> Tensor:
        """log p_T(z), one value per sample."""

    # sigma view (Karras et al. 2022, eq. 4): x_t = scale(t) * (x_0 + sigma(t) n)
    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise level sigma(t) of the scaled-out variable x_t / scale(t)."""

    @abc.abstractmethod
    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`sigma`."""

    def scale(self, t: Tensor) -> Tensor:
        """Signal scale s(t); 1 for variance-exploding SDEs."""
        return torch.ones_like(t)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(1e-5, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.T, dtype=torch.float64)))

    def timestep(self, t: Tensor) -> Tensor:
        """The discrete step index i of time t, truncating t (N - 1) / T as the official code does."""
        return (t * (self.N - 1) / self.T).long()

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One Euler-Maruyama step of size T/N: x_{i+1} = x_i + f_i + G_i z_i."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (eq. 6), or the probability-flow ODE (eq. 13) when probability_flow."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """dx = [f - g^2 score] dt + g dw-bar (Song et al. 2021, eq. 6); with probability_flow the ODE of eq. 13."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False) -> None:
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow
        self.N, self.T = forward.N, forward.T

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        coef = 0.5 if self.probability_flow else 1.0
        drift = drift - bcast(diffusion, x) ** 2 * score * coef
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Reverse of the forward SDE's own discretisation (reverse diffusion, Song et al. 2021 eq. 46-47)."""
        f, G = self.forward.discretize(x, t)
        coef = 0.5 if self.probability_flow else 1.0
        rev_f = f - bcast(G, x) ** 2 * self.score_fn(x, t) * coef
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class VESDE(SDE):
    """Variance exploding SDE, dx = sqrt(d[sigma^2(t)]/dt) dw (Song et al. 2021, eq. 9)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        super().__init__(N)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got sigma_min="
                             f"{sigma_min}, sigma_max={sigma_max}")
        self._sigma_min, self._sigma_max = float(sigma_min), float(sigma_max)
        self._discretise()

    def _discretise(self) -> None:
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(self._sigma_min), math.log(self._sigma_max), self.N))

    def adjacent_sigma(self, i: Tensor) -> Tensor:
        """sigma_{i-1} of the SMLD levels, with sigma_{-1} = 0 (Song et al. 2021, eq. 45)."""
        sigmas = table_on(self.discrete_sigmas, i.device)
        return torch.where(i == 0, torch.zeros_like(sigmas[i]), sigmas[(i - 1).clamp(min=0)])

    @property
    def sigma_min(self) -> float:
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        return self._sigma_max

    def sigma(self, t: Tensor) -> Tensor:
        return self._sigma_min * (self._sigma_max / self._sigma_min) ** t

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return torch.log(sigma / self._sigma_min) / math.log(self._sigma_max / self._sigma_min)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2 * math.log(self._sigma_max / self._sigma_min))

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return x, self.sigma(t)

    def prior_sampling(self, shape, generator=None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device) * self._sigma_max

    def prior_from_noise(self, z: Tensor) -> Tensor:
        return z * self._sigma_max

    def prior_logp(self, z: Tensor) -> Tensor:
        n = z[0].numel()
        return -n / 2 * math.log(2 * math.pi * self._sigma_max**2) - z.flatten(1).pow(2).sum(1) / (2 * self._sigma_max**2)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD discretisation: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z (Song et al. 2021, eq. 45)."""
        i = self.timestep(t)
        sigma, adjacent = table_on(self.discrete_sigmas, t.device)[i], self.adjacent_sigma(i)
        return torch.zeros_like(x), torch.sqrt(sigma**2 - adjacent**2)


class _VPFamily(SDE):
    """Shared linear beta schedule beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(N)
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"beta_min and beta_max must satisfy 0 <= beta_min < beta_max, got beta_min="
                             f"{beta_min}, beta_max={beta_max}")
        self.beta_0, self.beta_1 = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integral_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2

    def t_from_integral_beta(self, B: Tensor) -> Tensor:
        d = self.beta_1 - self.beta_0
        return 2 * B / (self.beta_0 + torch.sqrt(self.beta_0**2 + 2 * d * B))

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -0.5 * bcast(self.beta(t), x) * x

    def scale(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integral_beta(t))

    def prior_sampling(self, shape, generator=None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def prior_from_noise(self, z: Tensor) -> Tensor:
        return z

    def prior_logp(self, z: Tensor) -> Tensor:
        n = z[0].numel()
        return -n / 2 * math.log(2 * math.pi) - z.flatten(1).pow(2).sum(1) / 2


class VPSDE(_VPFamily):
    """Variance preserving SDE, dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (Song et al. 2021, eq. 11)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(beta_min, beta_max, N)
        self._discretise()

    def _discretise(self) -> None:
        """The DDPM chain of N steps: beta_i = beta(i / (N - 1)) / N, alpha_bar_i = prod_j<=i (1 - beta_j)."""
        self.discrete_betas = torch.linspace(self.beta_0 / self.N, self.beta_1 / self.N, self.N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        B = self.integral_beta(t)
        return bcast(torch.exp(-0.5 * B), x) * x, torch.sqrt(-torch.expm1(-B))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(torch.expm1(self.integral_beta(t)))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.t_from_integral_beta(torch.log1p(sigma**2))

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM discretisation: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z (Song et al. 2021, eq. 46)."""
        i = self.timestep(t)
        beta = table_on(self.discrete_betas, t.device)[i]
        alpha = table_on(self.alphas, t.device)[i]
        return bcast(torch.sqrt(alpha), x) * x - x, torch.sqrt(beta)


class subVPSDE(_VPFamily):
    """sub-VP SDE, dx = -beta(t)/2 x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw (Song et al. 2021, eq. 29)."""

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.integral_beta(t)))

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        B = self.integral_beta(t)
        return bcast(torch.exp(-0.5 * B), x) * x, -torch.expm1(-B)

    def sigma(self, t: Tensor) -> Tensor:
        return 2 * torch.sinh(0.5 * self.integral_beta(t))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.t_from_integral_beta(2 * torch.asinh(0.5 * sigma))

