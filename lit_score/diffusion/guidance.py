"""Guidance: one denoiser built from a class-conditional model and a guide, which every sampler then uses as it
uses D (the sigma-view solvers call it, the score-view ones and the likelihood call its ``score``).

With D(x_hat; sigma, y) the conditional denoiser and scale w (w = 1: the plain conditional model):

- classifier-free (Ho & Salimans 2022; EDM2's and k-diffusion's convention): D_w = D(.; null) + w (D(.; y) - D(.; null)),
  the two passes in one batched call;
- autoguidance (Karras et al. 2024): D_w = D_g(.; y) + w (D(.; y) - D_g(.; y)) with a weaker model D_g as the guide;
- classifier guidance (Song et al. 2021, appendix I; Dhariwal & Nichol 2021): the score plus w grad log p_sigma(y | x),
  i.e. D_w = D(.; y) + w sigma^2 grad_x_hat log p_sigma(y | x_hat), for a conditional or unconditional D.

An optional interval (Kynkäänniemi et al. 2024) guides only at sigma_lo < sigma <= sigma_hi; elsewhere D_w = D(.; y).
Every combination is written on residuals D - x_hat, so the score keeps its precision at small sigma.
"""
from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.sdes import bcast
from lit_score.networks.cond import NULL_CLASS, Cond

Logits = Callable[[Tensor, Tensor], Tensor]  # (x_hat, sigma) -> (B, K) log p_sigma(y | x_hat) up to a constant


def with_labels(cond: Cond | None, labels: Tensor | None) -> dict | None:
    """``cond`` with its class labels set to ``labels`` (None: without them)."""
    out = dict(cond or {})
    if labels is None:
        out.pop("class_labels", None)
    else:
        out["class_labels"] = labels
    return out or None


class Conditioned(Denoiser):
    """D(x_hat; sigma, cond) with the batch's ``cond`` bound (its class labels): what samplers, which pass no cond,
    call. ``evaluations`` counts the network passes per image (the NFE guidance implies). Class-conditional
    denoisers say so by a ``num_classes`` attribute > 0."""

    def __init__(self, inner: Denoiser, cond: Cond | None) -> None:
        self.inner, self.cond, self.sde, self.evaluations = inner, cond, inner.sde, 0
        self._root = self

    def __call__(self, x_hat, sigma, cond=None):
        return self.residual(x_hat, sigma) + x_hat

    def residual(self, x_hat, sigma, cond=None):
        self._root.evaluations += 1
        return self.inner.residual(x_hat, sigma, self.cond)

    def rows(self, index):
        view = copy.copy(self)
        view.cond = _rows(self.cond, index)
        return view


def _rows(cond: Cond | None, index: Tensor) -> dict | None:
    return None if cond is None else {k: None if v is None else v[index] for k, v in cond.items()}


class Guidance(abc.ABC):
    """How a class-conditional model is guided; chosen by class in YAML or on the command line
    (``--model.guidance ClassifierFreeGuidance --model.guidance.scale 2``).

    Args:
        scale: the guidance weight w (1: the conditional model itself, > 1 guides harder; 0 gives the guide).
        interval: [sigma_lo, sigma_hi]: guide only where sigma_lo < sigma <= sigma_hi (Kynkäänniemi et al. 2024);
            None: at every noise level.
    """

    def __init__(self, scale: float = 1.0, interval: Sequence[float] | None = None) -> None:
        scale = float(scale)
        if not scale == scale or abs(scale) == float("inf"):
            raise ValueError(f"guidance scale must be a finite number, got {scale}")
        if interval is not None:
            interval = tuple(float(s) for s in interval)
            if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
                raise ValueError(f"guidance interval must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi, got "
                                 f"{list(interval)}")
        self.scale, self.interval = scale, interval

    def active(self, sigma: Tensor) -> Tensor:
        """(B,) bool: where guidance applies."""
        if self.interval is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    @abc.abstractmethod
    def guided(self, D: Denoiser, labels: Tensor, cond: Cond | None = None) -> "Conditioned":
        """The guided denoiser of ``D`` for images with class ``labels`` (B,) and any other ``cond``."""

    def describe(self) -> dict:
        return {"method": type(self).__name__, "scale": self.scale,
                "interval": None if self.interval is None else list(self.interval)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class _Guided(Conditioned):
    """D_w on residuals: ``term(x_hat, sigma, active, cond, labels)`` where guidance is active, D(.; y) elsewhere;
    ``labels`` are the images' classes (also when D itself, unconditional, is not given them)."""

    def __init__(self, inner: Denoiser, cond: Cond | None, labels: Tensor | None, guidance: Guidance,
                 term: Callable[..., tuple[Tensor, int]]) -> None:
        super().__init__(inner, cond)
        self.labels, self.guidance, self.term = labels, guidance, term

    def residual(self, x_hat, sigma, cond=None):
        active = self.guidance.active(sigma)
        if not bool(active.any()):
            return super().residual(x_hat, sigma)
        residual, passes = self.term(x_hat, sigma, active, self.cond, self.labels)
        self._root.evaluations += passes
        return residual

    def rows(self, index):
        view = super().rows(index)
        view.labels = None if self.labels is None else self.labels[index]
        return view


class ClassifierFreeGuidance(Guidance):
    """D_w = D(.; null) + w (D(.; y) - D(.; null)) (Ho & Salimans 2022), for a model trained with label dropout;
    both passes in one batched call."""

    def guided(self, D, labels, cond=None):
        w = self.scale

        def term(x_hat, sigma, active, cond, labels):
            both = {k: torch.cat([v, v]) for k, v in cond.items() if v is not None}
            both["class_labels"] = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
            r = D.residual(torch.cat([x_hat, x_hat]), torch.cat([sigma, sigma]), both)
            r_u, r_c = r.chunk(2)
            return torch.where(bcast(active, x_hat), r_u + w * (r_c - r_u), r_c), 2

        return _Guided(D, with_labels(cond, labels), labels, self, term)


class AutoGuidance(Guidance):
    """D_w = D_g(.; y) + w (D(.; y) - D_g(.; y)) (Karras et al. 2024): a weaker version of the model (an earlier
    checkpoint, a smaller network), trained on the same data and conditioning, as the guide; unconditional models
    too (labels None).

    Args:
        guide: the guide's checkpoint (``.ckpt``) or ``lit-score export`` folder (its sampling weights are used).
        scale, interval: as ``Guidance`` (Karras et al. use w of about 2).
    """

    def __init__(self, guide: str | Denoiser, scale: float = 2.0, interval: Sequence[float] | None = None) -> None:
        super().__init__(scale, interval)
        self.guide = guide

    def guided(self, D, labels=None, cond=None, guide: Denoiser | None = None):
        G = guide if guide is not None else self.guide
        if not isinstance(G, Denoiser):
            raise ValueError(f"AutoGuidance's guide {G!r} is not loaded: sample through ScoreModel, which loads it")
        guide_takes_labels = bool(getattr(G, "num_classes", 0))
        w = self.scale

        def term(x_hat, sigma, active, cond, labels):
            r_c = D.residual(x_hat, sigma, cond)
            r_g = G.residual(x_hat, sigma, cond if guide_takes_labels else with_labels(cond, None))
            return torch.where(bcast(active, x_hat), r_g + w * (r_c - r_g), r_c), 2

        return _Guided(D, with_labels(cond, labels), labels, self, term)


class ClassifierGuidance(Guidance):
    """D_w = D(.; y) + w sigma^2 grad_x_hat log p_sigma(y | x_hat): the score plus w grad log p_t(y | x) (Song et al.
    2021, appendix I; Dhariwal & Nichol 2021) with a noise-conditional classifier; D may be unconditional.

    Args:
        classifier: the classifier's checkpoint or export folder (a model trained with
            ``lit_score.diffusion.losses.ClassifierLoss``, e.g. ``experiments/quickstart_classifier.yaml``).
        scale, interval: as ``Guidance``.
    """

    def __init__(self, classifier: str | Logits, scale: float = 1.0, interval: Sequence[float] | None = None) -> None:
        super().__init__(scale, interval)
        self.classifier = classifier

    def guided(self, D, labels, cond=None, classifier: Logits | None = None):
        logits_fn = classifier if classifier is not None else self.classifier
        if not callable(logits_fn):
            raise ValueError(f"ClassifierGuidance's classifier {logits_fn!r} is not loaded: sample through "
                             "ScoreModel, which loads it")
        conditional = bool(getattr(D, "num_classes", 0))
        w = self.scale

        def term(x_hat, sigma, active, cond, labels):
            r = D.residual(x_hat, sigma, cond)
            # differentiable itself when the caller differentiates (the likelihood); out of predict's inference mode
            with torch.inference_mode(False), torch.enable_grad():
                outer = x_hat.requires_grad
                x = x_hat if outer else x_hat.detach().clone().requires_grad_(True)
                s = sigma if outer else sigma.clone()
                log_p = torch.log_softmax(logits_fn(x, s).double(), dim=-1)
                chosen = log_p.gather(1, labels.long().clone()[:, None]).sum()
                grad, = torch.autograd.grad(chosen, x, create_graph=outer)
            push = bcast(sigma**2 * active.to(sigma.dtype), x_hat) * grad.to(x_hat.dtype)
            return r + w * push, 2

        return _Guided(D, with_labels(cond, labels if conditional else None), labels, self, term)
