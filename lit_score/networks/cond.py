"""What a network is conditioned on besides the noise level: ``cond``, a dict of per-sample labels.

Key ``"augment"``: the (B, augment_dim) parameters of the augmentation each training image went through
(``lit_score.diffusion.augment``; Karras et al. 2022, appendix B.4), absent or None at sampling, which the networks
read as zero labels: the un-augmented images.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

Cond = Mapping[str, Tensor | None]
COND_KEYS = ("augment",)


def augment_labels(net: nn.Module, cond: Cond | None, batch: int) -> Tensor | None:
    """``cond["augment"]`` checked against ``net.augment_dim``; None when there are none."""
    if cond is None:
        return None
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond must be a dict of per-sample labels such as {{'augment': labels}}, got "
                         f"{type(cond).__name__}")
    unknown = sorted(set(cond) - set(COND_KEYS))
    if unknown:
        raise ValueError(f"{type(net).__name__} takes cond keys {list(COND_KEYS)}, got {unknown}")
    labels = cond.get("augment")
    if labels is None:
        return None
    dim = int(getattr(net, "augment_dim", 0) or 0)
    if not dim:
        raise ValueError(f"{type(net).__name__} takes no augmentation labels (augment_dim 0) but was given "
                         f"{labels.shape[-1]}: set model.net.init_args.augment_dim to {labels.shape[-1]}")
    if tuple(labels.shape) != (batch, dim):
        raise ValueError(f"augmentation labels must have shape ({batch}, {dim}), got {tuple(labels.shape)}")
    return labels
