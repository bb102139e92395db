"""Denoising score-matching objectives: continuous (Song et al. 2021, eq. 7), the discrete SMLD / DDPM ones and
EDM's (Karras et al. 2022), as functions and as the ``Loss`` objects a YAML names by class_path."""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import (ConsistencyPrecond, DDPMSteps, EDMPrecond, NetworkDenoiser, NoisePrediction,
                                          Preconditioning, ScorePrediction, SMLDLevels, edm_weighting,
                                          lognormal_sigma)
from lit_score.diffusion.sdes import SDE, VESDE, VPSDE, ScoreFn, bcast
from lit_score.networks.cond import Cond

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
             likelihood_weighting: bool = False, generator: torch.Generator | None = None,
             cond: Cond | None = None) -> Tensor:
    """Continuous denoising score matching with t ~ U(eps, T) (Song et al. 2021, eq. 7).

    lambda(t) = std(t)^2 by default, or g(t)^2 with likelihood_weighting (Song et al. 2021b, "Maximum likelihood
    training of score-based diffusion models"). ``cond``: the network's conditioning, as given.
    """
    t = _rand(x.shape[0], x, generator) * (sde.T - eps) + eps
    z = _randn(x, generator)
    mean, std = sde.marginal_prob(x, t)
    score = score_fn(mean + bcast(std, x) * z, t) if cond is None else score_fn(mean + bcast(std, x) * z, t, cond)
    if likelihood_weighting:
        g2 = sde.diffusion(t) ** 2
        losses = _reduce(torch.square(score + z / bcast(std, x)), reduce_mean) * g2
    else:
        losses = _reduce(torch.square(score * bcast(std, x) + z), reduce_mean)
    return losses.mean()


def smld_loss(model_fn: ModelFn, sde: VESDE, x: Tensor, reduce_mean: bool = False,
              generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Discrete NCSN objective over the geometric noise levels of a VE SDE, weighted by sigma^2 (Song & Ermon 2019, eq. 5-6).

    The network is conditioned on sigma and (with scale_by_sigma) outputs the score.
    """
    if not isinstance(sde, VESDE):
        raise TypeError(f"the SMLD loss needs a VESDE, got {type(sde).__name__}")
    idx = (_rand(x.shape[0], x, generator) * sde.N).long().clamp(max=sde.N - 1)
    sigma = sde.discrete_sigmas.to(x.device, x.dtype)[idx]
    noise = _randn(x, generator) * bcast(sigma, x)
    score = model_fn(x + noise, sigma) if cond is None else model_fn(x + noise, sigma, cond)
    target = -noise / bcast(sigma, x) ** 2
    return (_reduce(torch.square(score - target), reduce_mean) * sigma**2).mean()


def ddpm_loss(model_fn: ModelFn, sde: VPSDE, x: Tensor, reduce_mean: bool = True,
              generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Discrete DDPM noise-prediction objective (Ho et al. 2020, eq. 14); the network sees the step index."""
    if not isinstance(sde, VPSDE):
        raise TypeError(f"the DDPM loss needs a VPSDE, got {type(sde).__name__}")
    idx = (_rand(x.shape[0], x, generator) * sde.N).long().clamp(max=sde.N - 1)
    a = sde.sqrt_alphas_cumprod.to(x.device, x.dtype)[idx]
    s = sde.sqrt_1m_alphas_cumprod.to(x.device, x.dtype)[idx]
    noise = _randn(x, generator)
    x_i = bcast(a, x) * x + bcast(s, x) * noise
    out = model_fn(x_i, idx.to(x.dtype)) if cond is None else model_fn(x_i, idx.to(x.dtype), cond)
    return _reduce(torch.square(out - noise), reduce_mean).mean()


def edm_loss(D: Callable[..., Tensor], x: Tensor, P_mean: float = -1.2, P_std: float = 1.2,
             sigma_data: float = 0.5, reduce_mean: bool = True, generator: torch.Generator | None = None,
             cond: Cond | None = None) -> Tensor:
    """E_sigma,n[lambda(sigma) |D(x + sigma n; sigma) - x|^2] with ln sigma ~ N(P_mean, P_std^2) and
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, eq. 2 and Table 1)."""
    sigma = lognormal_sigma(x.shape[0], P_mean, P_std, x, generator)
    n = _randn(x, generator)
    out = D(x + bcast(sigma, x) * n, sigma) if cond is None else D(x + bcast(sigma, x) * n, sigma, cond)
    return (_reduce(torch.square(out - x), reduce_mean) * edm_weighting(sigma, sigma_data)).mean()


def ect_ratio(t: Tensor, step: int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
              stage_iters: int = 25000) -> Tensor:
    """r / t = 1 - q^-(stage + 1) (1 + k sigmoid(-b t)), stage = floor(step / stage_iters): ECT's mapping from t to the
    earlier level r, whose gap t - r shrinks by q every stage towards the differential limit (Geng et al. 2024)."""
    decay = float(q) ** -(step // stage_iters + 1)
    return 1 - decay * (1 + k * torch.sigmoid(-b * t))


def ect_loss(D: Callable[..., Tensor], x: Tensor, step: int, P_mean: float = -1.1, P_std: float = 2.0,
             q: float = 2.0, k: float = 8.0, b: float = 1.0, stage_iters: int = 25000, c: float = 0.0,
             sigma_min: float = 0.002, generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """E[(sqrt(|f(x + t n; t) - sg(f(x + r n; r))|^2 + c^2) - c) / (t - r)] with ln t ~ N(P_mean, P_std^2) and r from
    ``ect_ratio``, floored at sigma_min where f is the identity; one noise n for both, the target f(x + r n; r) by the
    same weights with the same dropout masks and no gradient (ECT's teacher-free consistency tuning). Levels t at or
    below sigma_min have nothing to learn and count 0."""
    t = lognormal_sigma(x.shape[0], P_mean, P_std, x, generator)
    r = (t * ect_ratio(t, step, q, k, b, stage_iters)).clamp(min=sigma_min)
    n = _randn(x, generator)
    args = () if cond is None else (cond,)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        target = D(x + bcast(r, x) * n, r, *args)  # the RNG is rewound after: the same dropout masks below
    out = D(x + bcast(t, x) * n, t, *args)
    dtype = torch.promote_types(out.dtype, torch.float32)  # bf16 outputs are compared in float32
    sq = torch.square(out.to(dtype) - target.to(dtype)).flatten(1).sum(1)
    distance = (sq + c**2).clamp(min=1e-30).sqrt() - c
    valid = t > r
    weight = valid / torch.where(valid, t - r, torch.ones_like(t))  # 1 / (t - r), 0 where nothing is learnt
    return (distance * weight.to(dtype)).mean()


class Loss(abc.ABC):
    """A training objective of the model's denoiser D (``lit_score.diffusion.denoiser``); ``ScoreModel`` calls
    ``loss(D, x, cond=cond, step=step)`` (``cond``: the network's conditioning, e.g. augmentation labels; ``step``:
    the optimizer step, for objectives with a schedule). Each loss names the parametrisation it trains by default
    (``default_precond``)."""

    def __init__(self, reduce_mean: bool = True) -> None:
        self.reduce_mean = bool(reduce_mean)

    def default_precond(self, sde: SDE) -> Preconditioning:
        """The preconditioning a model trained with this loss has when its YAML names none."""
        return ScorePrediction() if isinstance(sde, VESDE) else NoisePrediction()

    def check(self, sde: SDE, precond: Preconditioning) -> None:
        """Raise when the loss cannot train a network parametrised by ``precond`` under ``sde``."""
        precond.check(sde)

    @abc.abstractmethod
    def __call__(self, D: NetworkDenoiser, x: Tensor, generator: torch.Generator | None = None,
                 cond: Cond | None = None, step: int = 0) -> Tensor:
        """The batch's mean loss."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class DSMLoss(Loss):
    """Continuous denoising score matching, t ~ U(eps, T) (Song et al. 2021, eq. 7), of the denoiser's score.
    Default parametrisation: score_sde's (``NoisePrediction`` for VP-type SDEs, ``ScorePrediction`` for VE).

    Args:
        eps: smallest time sampled.
        reduce_mean: average over the data dimensions (else half-sum them, as the official code).
        likelihood_weighting: weight by g(t)^2 instead of std(t)^2.
    """

    def __init__(self, eps: float = 1e-5, reduce_mean: bool = True, likelihood_weighting: bool = False) -> None:
        super().__init__(reduce_mean)
        if not 0 < eps < 1:
            raise ValueError(f"eps (the smallest time sampled) must be in (0, 1), got {eps}")
        self.eps, self.likelihood_weighting = float(eps), bool(likelihood_weighting)

    def __call__(self, D, x, generator=None, cond=None, step=0):
        return dsm_loss(D.score, D.sde, x, self.eps, self.reduce_mean, self.likelihood_weighting, generator, cond)


class _DiscreteLoss(Loss):
    """An objective over an SDE's discrete levels, of a network trained with their preconditioning."""

    sde_type: type[SDE] = SDE
    precond_type: type[Preconditioning] = Preconditioning

    def default_precond(self, sde: SDE) -> Preconditioning:
        return self.precond_type()

    def check(self, sde: SDE, precond: Preconditioning) -> None:
        if not isinstance(sde, self.sde_type) or not isinstance(precond, self.precond_type):
            raise TypeError(f"{type(self).__name__} needs a {self.sde_type.__name__} and the "
                            f"{self.precond_type.__name__} preconditioning, got {type(sde).__name__} and "
                            f"{type(precond).__name__}; use lit_score.diffusion.losses.DSMLoss otherwise")


class SMLDLoss(_DiscreteLoss):
    """The discrete NCSN objective over a VE SDE's N geometric noise levels (Song & Ermon 2019, eq. 5-6), of a
    network parametrised by ``SMLDLevels``."""

    sde_type, precond_type = VESDE, SMLDLevels

    def __init__(self, reduce_mean: bool = False) -> None:
        super().__init__(reduce_mean)

    def __call__(self, D, x, generator=None, cond=None, step=0):
        score = lambda x_t, sigma, *c: D.score(x_t, D.sde.t_from_sigma(sigma), *c)  # noqa: E731
        return smld_loss(score, D.sde, x, self.reduce_mean, generator, cond)


class DDPMLoss(_DiscreteLoss):
    """The discrete DDPM noise-prediction objective over a VP SDE's N steps (Ho et al. 2020, eq. 14), of a network
    parametrised by ``DDPMSteps`` (it sees the step index)."""

    sde_type, precond_type = VPSDE, DDPMSteps

    def __call__(self, D, x, generator=None, cond=None, step=0):
        noise_prediction = lambda x_i, i, *c: D.net(x_i, D.precond.step_label(i), *c)  # noqa: E731
        return ddpm_loss(noise_prediction, D.sde, x, self.reduce_mean, generator, cond)


class EDMLoss(Loss):
    """EDM's objective: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, on the
    denoiser (Karras et al. 2022, section 5, Table 1); default parametrisation ``EDMPrecond(sigma_data)``. The SDE
    plays no part in training; it gives the samplers their time variable, prior and sigma range (EDM's: ``VESDE``
    with sigma 0.002 to 80).

    Args:
        P_mean, P_std: the log-normal distribution of training noise levels.
        sigma_data: the data's standard deviation (0.5 for images in [-1, 1]).
        reduce_mean: average over the data dimensions (else half-sum them).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 reduce_mean: bool = True) -> None:
        super().__init__(reduce_mean)
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def default_precond(self, sde: SDE) -> Preconditioning:
        return EDMPrecond(self.sigma_data)

    def __call__(self, D, x, generator=None, cond=None, step=0):
        return edm_loss(D, x, self.P_mean, self.P_std, self.sigma_data, self.reduce_mean, generator, cond)


class ECTLoss(Loss):
    """Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy"): tunes a diffusion model into a
    consistency model, the model its own target (``ect_loss``); the gap t - r follows ``ect_ratio`` over the optimizer
    steps. Default parametrisation ``ConsistencyPrecond(sigma_data, sigma_min)`` (f(x; sigma_min) = x); start from
    an EDM-trained checkpoint with ``--init_weights``. The defaults are ECT's CIFAR-10 values (its stage of 25,000
    iterations is 250 ticks of 12.8 kimg at batch 128).

    Args:
        P_mean, P_std: ln t ~ N(P_mean, P_std^2).
        q, k, b, stage_iters: the mapping r / t = 1 - q^-(stage + 1) (1 + k sigmoid(-b t)), stage = step // stage_iters.
        c: the pseudo-Huber constant of the metric sqrt(d^2 + c^2) - c over the whole sample (ECT: 0, the L2 norm).
        sigma_data: the data's standard deviation; sigma_min: where f is the identity.
    """

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 stage_iters: int = 25000, c: float = 0.0, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if not q > 1:
            raise ValueError(f"q (how much t - r shrinks per stage) must be > 1, got {q}")
        if not k >= 0 or not b >= 0 or not c >= 0:
            raise ValueError(f"k, b and c must be >= 0, got {k}, {b}, {c}")
        if isinstance(stage_iters, bool) or not isinstance(stage_iters, int) or stage_iters < 1:
            raise ValueError(f"stage_iters (optimizer steps per stage) must be an integer >= 1, got {stage_iters!r}")
        if not sigma_data > 0 or not sigma_min > 0:
            raise ValueError(f"sigma_data and sigma_min must be > 0, got {sigma_data}, {sigma_min}")
        self.P_mean, self.P_std, self.q, self.k, self.b = float(P_mean), float(P_std), float(q), float(k), float(b)
        self.stage_iters, self.c = stage_iters, float(c)
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)

    def default_precond(self, sde: SDE) -> Preconditioning:
        return ConsistencyPrecond(self.sigma_data, self.sigma_min)

    def check(self, sde: SDE, precond: Preconditioning) -> None:
        if not isinstance(precond, ConsistencyPrecond) or precond.sigma_min != self.sigma_min:
            raise TypeError(f"ECTLoss trains a consistency function: it needs ConsistencyPrecond(sigma_min="
                            f"{self.sigma_min:g}), got {precond!r}; leave model.precond unset or set both sigma_min")

    def __call__(self, D, x, generator=None, cond=None, step=0):
        return ect_loss(D, x, step, self.P_mean, self.P_std, self.q, self.k, self.b, self.stage_iters, self.c,
                        self.sigma_min, generator, cond)


def classifier_logits(net: torch.nn.Module, precond: Preconditioning, sde: SDE, x_hat: Tensor, sigma: Tensor | float,
                      cond: Cond | None = None) -> Tensor:
    """(B, K) logits of the noise-conditional classifier ``net`` (e.g. ``lit_score.networks.NoiseClassifierNet``)
    at x_hat in the sigma view: net(c_in(sigma) x_hat, c_noise(sigma)) with the model's preconditioning; sigma (B,)
    or a scalar. Differentiable in x_hat, for classifier guidance's grad log p_sigma(y | x_hat). ``cond``: the
    network's other conditioning (augmentation labels), never class labels."""
    sigma = torch.as_tensor(sigma, device=x_hat.device, dtype=x_hat.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x_hat.shape[0])
    _, _, c_in, c_noise = precond.coefficients(sigma, sde)
    x_in = bcast(c_in, x_hat) * x_hat
    return net(x_in, c_noise) if cond is None else net(x_in, c_noise, cond)


class ClassifierLoss(Loss):
    """Cross-entropy of a noise-conditional classifier p_sigma(y | x_hat) on noisy labelled data, for classifier
    guidance (Song et al. 2021, appendix I; Dhariwal & Nichol 2021): t ~ U(eps, T) per sample as ``DSMLoss``, sigma =
    sigma(t), x_hat = x + sigma n, logits from ``classifier_logits`` (the model's c_in and c_noise; c_skip and c_out
    play no part). Needs labelled data: ``cond["class_labels"]`` (B,) in 0 .. K - 1 (``needs_labels``). Default
    parametrisation ``EDMPrecond()`` (unit-variance input); any other works.

    Args:
        eps: smallest time sampled.
    """

    needs_labels = True

    def __init__(self, eps: float = 1e-5) -> None:
        if not 0 < eps < 1:
            raise ValueError(f"eps (the smallest time sampled) must be in (0, 1), got {eps}")
        self.eps = float(eps)

    def default_precond(self, sde: SDE) -> Preconditioning:
        return EDMPrecond()

    def __call__(self, D, x, generator=None, cond=None, step=0):
        labels = None if cond is None else cond.get("class_labels")
        if labels is None:
            raise ValueError("ClassifierLoss trains a classifier and needs labelled data: a DataModule whose batches "
                             "are (images, labels), passed as cond['class_labels']")
        t = _rand(x.shape[0], x, generator) * (D.sde.T - self.eps) + self.eps
        n = _randn(x, generator)
        sigma = D.sde.sigma(t)
        rest = {k: v for k, v in cond.items() if k != "class_labels" and v is not None}
        logits = classifier_logits(D.net, D.precond, D.sde, x + bcast(sigma, x) * n, sigma, rest or None)
        if logits.ndim != 2 or tuple(labels.shape) != (x.shape[0],) or labels.dtype.is_floating_point:
            raise ValueError(f"ClassifierLoss needs (B, K) logits and integer labels of shape ({x.shape[0]},), got "
                             f"logits {tuple(logits.shape)} and labels {labels.dtype} {tuple(labels.shape)}")
        if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
            raise ValueError(f"class labels must be in 0..{logits.shape[1] - 1} (the classifier's classes), got "
                             f"{sorted(set(labels.tolist()))[:5]}")
        return torch.nn.functional.cross_entropy(logits.float(), labels.to(logits.device, torch.long))
