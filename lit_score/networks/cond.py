"""What a network is conditioned on besides the noise level: ``cond``, a dict of per-sample labels.

Key ``"augment"``: the (B, augment_dim) parameters of the augmentation each training image went through
(``lit_score.diffusion.augment``; Karras et al. 2022, appendix B.4), absent or None at sampling, which the networks
read as zero labels: the un-augmented images.

Key ``"class_labels"``: (B,) int64 class indices 0 .. num_classes - 1, or ``NULL_CLASS`` (-1) for the null class of
classifier-free guidance (the unconditional model), for networks with ``num_classes`` > 0 (EDM's ``map_label``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

Cond = Mapping[str, Tensor | None]
COND_KEYS = ("augment", "class_labels")
NULL_CLASS = -1


def _checked(net: nn.Module, cond: Cond | None) -> Cond | None:
    if cond is None:
        return None
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond must be a dict of per-sample labels such as {{'augment': labels}}, got "
                         f"{type(cond).__name__}")
    unknown = sorted(set(cond) - set(COND_KEYS))
    if unknown:
        raise ValueError(f"{type(net).__name__} takes cond keys {list(COND_KEYS)}, got {unknown}")
    return cond


def augment_labels(net: nn.Module, cond: Cond | None, batch: int) -> Tensor | None:
    """``cond["augment"]`` checked against ``net.augment_dim``; None when there are none."""
    cond = _checked(net, cond)
    labels = None if cond is None else cond.get("augment")
    if labels is None:
        return None
    dim = int(getattr(net, "augment_dim", 0) or 0)
    if not dim:
        raise ValueError(f"{type(net).__name__} takes no augmentation labels (augment_dim 0) but was given "
                         f"{labels.shape[-1]}: set model.net.init_args.augment_dim to {labels.shape[-1]}")
    if tuple(labels.shape) != (batch, dim):
        raise ValueError(f"augmentation labels must have shape ({batch}, {dim}), got {tuple(labels.shape)}")
    return labels


def class_labels(net: nn.Module, cond: Cond | None, batch: int) -> Tensor | None:
    """``cond["class_labels"]`` checked against ``net.num_classes``; None when there are none. A conditional
    network given no labels is an error: give NULL_CLASS labels for its unconditional output."""
    cond = _checked(net, cond)
    labels = None if cond is None else cond.get("class_labels")
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    if labels is None:
        if num_classes:
            raise ValueError(f"{type(net).__name__} is class-conditional ({num_classes} classes) and needs "
                             "cond['class_labels'] (use NULL_CLASS, -1, for its unconditional output)")
        return None
    if not num_classes:
        raise ValueError(f"{type(net).__name__} takes no class labels (num_classes 0): set "
                         "model.net.init_args.num_classes to the data's number of classes to train a conditional model")
    if tuple(labels.shape) != (batch,) or labels.dtype.is_floating_point:
        raise ValueError(f"class labels must be integers of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
    if bool(((labels < NULL_CLASS) | (labels >= num_classes)).any()):
        raise ValueError(f"class labels must be in 0..{num_classes - 1} (or -1, the null class), got "
                         f"{sorted(set(labels.tolist()))[:5]}")
    return labels


class ClassEmbedding(nn.Module):
    """EDM's ``map_label``: a linear map of one-hot labels (scaled by sqrt(num_classes)) added to the noise
    embedding; the null class is the zero vector. In training, each label becomes the null class with probability
    ``dropout`` (classifier-free guidance; Ho & Salimans 2022), drawn from torch's generator as dropout is."""

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {dropout}")
        self.num_classes, self.dropout = int(num_classes), float(dropout)
        self.linear = nn.Linear(num_classes, dim)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, labels: Tensor) -> Tensor:
        known = labels >= 0
        one_hot = nn.functional.one_hot(labels.clamp(min=0), self.num_classes).to(self.linear.weight.dtype)
        one_hot = one_hot * known[:, None]
        if self.training and self.dropout:
            one_hot = one_hot * (torch.rand(len(labels), 1, device=labels.device) >= self.dropout)
        return self.linear(one_hot * math.sqrt(self.num_classes))


def check_class_options(num_classes: int, label_dropout: float) -> None:
    """The networks' num_classes and label_dropout, or a one-line error."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if not 0 <= label_dropout < 1 or (label_dropout and not num_classes):
        raise ValueError(f"label_dropout must be in [0, 1) and needs num_classes > 0, got label_dropout="
                         f"{label_dropout}, num_classes={num_classes}")
