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


class ClassConditionalMixture:
    """K classes with prior probabilities pi_y, class y a Gaussian mixture p_0(x | y) = sum_k w_yk N(mu_yk,
    diag(s_yk^2)): an exact oracle for class-conditional models, their class posteriors and guidance.

    Every quantity is exact under any SDE, since the perturbed class densities p_t(x | y) and the marginal
    p_t(x) = sum_y pi_y p_t(x | y) are Gaussian mixtures too (``GaussianMixture._perturbed`` of ``joint``, the mixture of
    all components with weights pi_y w_yk); the class posterior is Bayes' rule, log p_t(y | x) = log pi_y +
    log p_t(x | y) - log p_t(x). Labels are (B,) integers 0 .. K-1, or -1 (``NULL_CLASS``): the marginal.

    Args:
        class_probs: (K,) positive class prior probabilities (normalised here).
        weights: per class, its (M_y,) non-negative component weights (a (K, M) tensor works too).
        means: per class, its (M_y, D) component means.
        stds: per class, its (M_y,) isotropic or (M_y, D) diagonal component standard deviations, all > 0.
    """

    def __init__(self, class_probs: Sequence[float] | Tensor, weights: Sequence, means: Sequence,
                 stds: Sequence) -> None:
        pi = torch.as_tensor(class_probs, dtype=torch.float64)
        if pi.dim() != 1 or len(pi) < 1 or not bool(torch.isfinite(pi).all()) or bool((pi <= 0).any()):
            raise ValueError(f"class_probs must be K >= 1 positive numbers, got {pi.tolist()}")
        K = len(pi)
        if not len(weights) == len(means) == len(stds) == K:
            raise ValueError(f"weights, means and stds need one entry per class ({K}), got {len(weights)}, "
                             f"{len(means)} and {len(stds)}")
        self.classes = [GaussianMixture(w, m, s) for w, m, s in zip(weights, means, stds)]
        dims = {c.dim for c in self.classes}
        if len(dims) != 1:
            raise ValueError(f"all classes must live in the same R^D, got dimensions {sorted(dims)}")
        self.class_probs = pi / pi.sum()
        self.class_of = torch.cat([torch.full((len(c.weights),), y, dtype=torch.long)
                                   for y, c in enumerate(self.classes)])
        self._within = torch.cat([c.weights for c in self.classes])
        self.joint = GaussianMixture(self._within * self.class_probs[self.class_of],
                                     torch.cat([c.means for c in self.classes]),
                                     torch.cat([c.stds for c in self.classes]))

    @classmethod
    def from_mixtures(cls, class_probs: Sequence[float] | Tensor,
                      mixtures: Sequence[GaussianMixture]) -> "ClassConditionalMixture":
        """The classes given as ``GaussianMixture`` objects."""
        return cls(class_probs, [m.weights for m in mixtures], [m.means for m in mixtures],
                   [m.stds for m in mixtures])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return self.joint.dim

    @property
    def marginal(self) -> GaussianMixture:
        """p_0(x) = sum_y pi_y p_0(x | y) as one mixture."""
        return self.joint

    # sampling

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """n joint samples: x (n, D) in ``dtype`` and their labels y (n,) int64."""
        k = torch.multinomial(self.joint.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.joint.means[k] + self.joint.stds[k] * z).to(dtype), self.class_of[k]

    def sample_class(self, y: int | Tensor, n: int | None = None, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """Samples of p_0(x | y): n of class ``y`` (an int; -1: the marginal), or, for a (B,) label tensor ``y``
        (n None or B), one per label. (n, D) or (B, D) in ``dtype``."""
        if isinstance(y, Tensor) and y.dim() == 1:
            if n is not None and n != len(y):
                raise ValueError(f"n ({n}) must be None or the number of labels ({len(y)})")
            labels = self._labels(y, len(y), torch.device("cpu"))
            probs = self._component_weights(labels)
            k = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            if n is None:
                raise ValueError("sample_class(y, n): give n, the number of samples of class y")
            label = int(y)
            self._labels(torch.tensor([label]), 1, torch.device("cpu"))
            probs = self.joint.weights if label < 0 else torch.where(self.class_of == label, self._within, 0.0)
            k = torch.multinomial(probs, n, replacement=True, generator=generator)
        z = torch.randn(len(k), self.dim, generator=generator, dtype=torch.float64)
        return (self.joint.means[k] + self.joint.stds[k] * z).to(dtype)

    # the pieces

    def _labels(self, y: Tensor | int | None, batch: int, device: torch.device) -> Tensor | None:
        """(B,) int64 labels on ``device`` (an int is broadcast), checked; None stays None (the marginal)."""
        if y is None:
            return None
        y = torch.as_tensor(y, device=device)
        if y.dim() == 0:
            y = y.expand(batch)
        if tuple(y.shape) != (batch,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"class labels must be integers of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
        if bool(((y < -1) | (y >= self.num_classes)).any()):
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1} (or -1, the marginal), got "
                             f"{sorted(set(y.tolist()))[:5]}")
        return y.long()

    def _component_weights(self, y: Tensor) -> Tensor:
        """(B, M) component probabilities given each label: w_yk within class y, pi_y w_yk for -1."""
        inclass = self.class_of[None, :] == y[:, None]
        own = torch.where(inclass, self._within[None, :], torch.zeros((), dtype=torch.float64))
        return torch.where((y < 0)[:, None], self.joint.weights[None, :], own)

    def _flat(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).double()
        if flat.shape[1] != self.dim:
            raise ValueError(f"this mixture lives in R^{self.dim}, got samples with {flat.shape[1]} elements")
        return flat

    def _moments(self, flat: Tensor, sde: SDE | None, t, sigma) -> tuple[Tensor, Tensor]:
        """Component means and variances (B, M, D): of p_t under ``sde`` (``GaussianMixture._perturbed``), or of the
        sigma view x0 + sigma n when ``sigma`` is given."""
        if sigma is None:
            return self.joint._perturbed(sde, t, flat)
        s2 = self._sigma2(flat, sigma)
        mu, var = self.joint.means.to(flat.device), self.joint.stds.to(flat.device) ** 2
        return mu.expand(flat.shape[0], -1, -1), var + s2

    @staticmethod
    def _sigma2(flat: Tensor, sigma: Tensor | float) -> Tensor:
        """sigma^2 per sample, (B, 1, 1) float64."""
        return torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).expand(flat.shape[0])[:, None, None] ** 2

    def _parts(self, flat: Tensor, sde: SDE | None, t, sigma) -> tuple[Tensor, Tensor, Tensor]:
        """log N(x; m_k, v_k) (B, M), x - m_k and v_k (B, M, D)."""
        m, v = self._moments(flat, sde, t, sigma)
        diff = flat[:, None, :] - m
        return -0.5 * (diff**2 / v + torch.log(2 * math.pi * v)).sum(-1), diff, v

    def _logits(self, logn: Tensor, y: Tensor | None) -> Tensor:
        """log w_k N_k (B, M) with the weights of p(x | y): masked to class y's components (-inf elsewhere), or
        pi_y w_yk for the marginal; their logsumexp is log p(x | y) or log p(x)."""
        device = logn.device
        marginal = logn + torch.log(self.joint.weights.to(device))
        if y is None:
            return marginal
        inclass = self.class_of.to(device)[None, :] == y[:, None]
        own = torch.where(inclass, logn + torch.log(self._within.to(device)),
                          torch.full((), -math.inf, dtype=logn.dtype, device=device))
        return torch.where((y < 0)[:, None], marginal, own)

    def _class_log_prob(self, logn: Tensor) -> Tensor:
        """log p(y | x) (B, K) by Bayes' rule."""
        device = logn.device
        members = self.class_of.to(device)[None, :] == torch.arange(self.num_classes, device=device)[:, None]
        within = (logn + torch.log(self._within.to(device)))[:, None, :]  # (B, 1, M)
        per_class = torch.where(members[None], within,
                                torch.full((), -math.inf, dtype=logn.dtype, device=device)).logsumexp(-1)
        joint = per_class + torch.log(self.class_probs.to(device))
        return joint - joint.logsumexp(1, keepdim=True)

    # densities, scores, class posteriors (t view)

    def log_prob(self, x: Tensor, sde: SDE | None = None, t: Tensor | float | None = None,
                 y: Tensor | int | None = None) -> Tensor:
        """log p_t(x | y) per sample (float64), log p_t(x) where y is None or -1; p_0 when ``sde`` is None."""
        flat = self._flat(x)
        logn, _, _ = self._parts(flat, sde, t, None)
        return self._logits(logn, self._labels(y, flat.shape[0], flat.device)).logsumexp(1)

    def score(self, x: Tensor, sde: SDE | None = None, t: Tensor | float | None = None,
              y: Tensor | int | None = None) -> Tensor:
        """grad_x log p_t(x | y) (grad_x log p_t(x) where y is None or -1) = sum_k r_k (m_k - x) / v_k, in x's shape
        and dtype."""
        flat = self._flat(x)
        logn, diff, v = self._parts(flat, sde, t, None)
        r = torch.softmax(self._logits(logn, self._labels(y, flat.shape[0], flat.device)), dim=1)[..., None]
        return (-(r * diff / v).sum(1)).reshape(x.shape).to(x.dtype)

    def class_log_prob(self, x: Tensor, sde: SDE | None = None, t: Tensor | float | None = None) -> Tensor:
        """log p_t(y | x) for every class, (B, K) float64, each row's logsumexp 0."""
        logn, _, _ = self._parts(self._flat(x), sde, t, None)
        return self._class_log_prob(logn)

    # the sigma view: x_hat = x_0 + sigma n

    def posterior_mean(self, x_hat: Tensor, sigma: Tensor | float, y: Tensor | int | None = None) -> Tensor:
        """E[x_0 | x_0 + sigma n = x_hat, y] (the marginal's where y is None or -1) = sum_k r_k (mu_k + s_k^2 /
        (s_k^2 + sigma^2) (x_hat - mu_k)), in x_hat's shape and dtype."""
        flat = self._flat(x_hat)
        logn, diff, v = self._parts(flat, None, None, sigma)
        r = torch.softmax(self._logits(logn, self._labels(y, flat.shape[0], flat.device)), dim=1)[..., None]
        mu, var = self.joint.means.to(flat.device), self.joint.stds.to(flat.device) ** 2
        return (r * (mu + var / v * diff)).sum(1).reshape(x_hat.shape).to(x_hat.dtype)

    def posterior_residual(self, x_hat: Tensor, sigma: Tensor | float, y: Tensor | int | None = None) -> Tensor:
        """E[x_0 | x_hat, y] - x_hat = -sigma^2 sum_k r_k (x_hat - mu_k) / (s_k^2 + sigma^2), without the
        cancellation of the difference."""
        flat = self._flat(x_hat)
        logn, diff, v = self._parts(flat, None, None, sigma)
        r = torch.softmax(self._logits(logn, self._labels(y, flat.shape[0], flat.device)), dim=1)[..., None]
        return (-(r * self._sigma2(flat, sigma) * diff / v).sum(1)).reshape(x_hat.shape).to(x_hat.dtype)

    def class_log_prob_sigma(self, x_hat: Tensor, sigma: Tensor | float) -> Tensor:
        """log p_sigma(y | x_hat) for every class in the sigma view, (B, K) float64."""
        logn, _, _ = self._parts(self._flat(x_hat), None, None, sigma)
        return self._class_log_prob(logn)

    def denoiser(self, sde: SDE) -> "ClassMixtureDenoiser":
        """The exact class-conditional denoiser (and score) under ``sde``, reading ``cond["class_labels"]``."""
        return ClassMixtureDenoiser(self, sde)

    def classifier(self, sde: SDE) -> "MixtureClassifier":
        """The exact noisy classifier p(y | x_hat) (sigma view) and p_t(y | x) (t view) under ``sde``."""
        return MixtureClassifier(self, sde)


class ClassMixtureDenoiser(Denoiser):
    """The ideal class-conditional denoiser D(x_hat; sigma, cond) = E[x_0 | x_hat, y] of a ``ClassConditionalMixture``,
    y = ``cond["class_labels"]``; no cond, no labels or -1 labels: the unconditional E[x_0 | x_hat]. Its score is the
    exact grad log p_t(x | y) (no Tweedie round trip)."""

    def __init__(self, mixture: ClassConditionalMixture, sde: SDE) -> None:
        self.mixture, self.sde = mixture, sde
        self.num_classes = mixture.num_classes

    @staticmethod
    def labels(cond) -> Tensor | None:
        return None if cond is None else cond.get("class_labels")

    def __call__(self, x_hat, sigma, cond=None):
        return self.mixture.posterior_mean(x_hat, sigma, self.labels(cond))

    def residual(self, x_hat, sigma, cond=None):
        return self.mixture.posterior_residual(x_hat, sigma, self.labels(cond))

    def score(self, x, t, cond=None):
        return self.mixture.score(x, self.sde, t, self.labels(cond))


class MixtureClassifier:
    """The exact noise-conditional classifier of a ``ClassConditionalMixture`` under ``sde``, as classifier guidance
    uses it (Dhariwal & Nichol 2021): exact log-probabilities, differentiable in the input."""

    def __init__(self, mixture: ClassConditionalMixture, sde: SDE) -> None:
        self.mixture, self.sde = mixture, sde

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def logits(self, x_hat: Tensor, sigma: Tensor | float) -> Tensor:
        """log p_sigma(y | x_hat) (B, K) in the sigma view x_hat = x_0 + sigma n (normalised: a row's logsumexp
        is 0), in x_hat's dtype. Under a VP-type SDE it is also p_t(y | s(t) x_hat): rescaling keeps the posterior."""
        return self.mixture.class_log_prob_sigma(x_hat, sigma).to(x_hat.dtype)

    __call__ = logits

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(y | x) (B, K) in the t view of ``sde``, float64."""
        return self.mixture.class_log_prob(x, self.sde, t)

    def grad_log_prob(self, x_hat: Tensor, sigma: Tensor | float, y: Tensor | int) -> Tensor:
        """grad_{x_hat} log p_sigma(y | x_hat) in closed form, (D(x_hat | y) - D(x_hat)) / sigma^2 (Bayes' rule
        with Tweedie's formula), in x_hat's shape and dtype."""
        flat = x_hat.reshape(x_hat.shape[0], -1).double()
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).expand(flat.shape[0])[:, None] ** 2
        cond = self.mixture.posterior_residual(flat, sigma, y).double()
        uncond = self.mixture.posterior_residual(flat, sigma, None).double()
        return ((cond - uncond) / s2).reshape(x_hat.shape).to(x_hat.dtype)


def three_class_2d() -> ClassConditionalMixture:
    """A test oracle: 3 overlapping classes in 2-D with priors 0.5 / 0.3 / 0.2, each a 2-component mixture
    (class 1 with diagonal stds)."""
    return ClassConditionalMixture(
        [0.5, 0.3, 0.2],
        weights=[[0.6, 0.4], [0.5, 0.5], [0.3, 0.7]],
        means=[[[-2.0, 0.0], [-1.0, 2.0]], [[2.0, 0.0], [1.0, -2.0]], [[0.0, 1.0], [0.5, -0.5]]],
        stds=[[0.5, 0.7], [[0.6, 0.4], [0.5, 0.5]], [0.8, 0.6]])
