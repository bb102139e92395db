"""EDM's non-leaky augmentation (Karras et al. 2022, appendix B.4 and Table 7): its geometric operations, x-flip,
y-flip, isotropic scaling, rotation, anisotropic scaling and translation, each applied to an image with probability
p times its multiplier. The parameters drawn for an image are its augmentation labels (9 for the whole set), given
to the network as ``cond["augment"]``; sampling gives none (zero labels), so the model draws un-augmented images.

An image's draws are a function of (seed, index, epoch) only (``lit_score.rng``, stream ``AUGMENT_STREAM``), so a
resumed run augments exactly as an uninterrupted one. A batch's transforms are one batched affine warp (bicubic,
reflected at the border; EDM resamples through a 2x wavelet-filtered image instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_score.rng import AUGMENT_STREAM, seeded_normal

OPERATIONS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")
LABELS = {"xflip": 1, "yflip": 1, "scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2}
DRAWS = 16  # standard normals per image and epoch; u = Phi(z) where a uniform is needed


def rotation(theta: Tensor) -> Tensor:
    """(B, 3, 3) rotations by theta in homogeneous pixel coordinates."""
    c, s, zero, one = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).view(-1, 3, 3)


def scaling(sx: Tensor, sy: Tensor) -> Tensor:
    """(B, 3, 3) scalings of x by sx and y by sy."""
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, zero, zero, zero, sy, zero, zero, zero, one], -1).view(-1, 3, 3)


def translation(tx: Tensor, ty: Tensor) -> Tensor:
    """(B, 3, 3) translations by (tx, ty) pixels."""
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([one, zero, tx, zero, one, ty, zero, zero, one], -1).view(-1, 3, 3)


@dataclass
class Augmentation:
    """One batch's draws: ``labels`` (B, dim) for the network, and ``matrix`` (B, 3, 3), the map from an output
    pixel to the input position it reads, in pixel coordinates centred on the image (x right, y down)."""

    labels: Tensor
    matrix: Tensor


def warp(images: Tensor, matrix: Tensor) -> Tensor:
    """out(q) = images(matrix q) for every pixel q of (B, C, H, W) images, bicubic, reflected at the border."""
    H, W = images.shape[-2:]
    to_unit = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], device=matrix.device, dtype=matrix.dtype))
    from_unit = torch.diag(torch.tensor([W / 2, H / 2, 1.0], device=matrix.device, dtype=matrix.dtype))
    theta = (to_unit @ matrix @ from_unit)[:, :2]  # in affine_grid's units: pixel edges at -1 and 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return out.to(images.dtype)


class AugmentPipe:
    """EDM's geometric augmentation pipeline; the defaults are its CIFAR-10 setting (``--augment 0.12``: every
    operation, x-flips always drawn).

    Args:
        p: probability of each operation (times its multiplier, at most 1); 0 turns the pipeline off.
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: each operation's multiplier; 0 leaves it out (and
            its labels: ``dim`` counts those of the operations in use).
        scale_std: log2 std of isotropic scaling; rotate_frac_max: largest rotation, as a fraction of a half turn
            either way; aniso_std: log2 std of anisotropic scaling, along an axis rotated with probability
            aniso_rotate_prob; translate_frac_std: std of translation, as a fraction of the image size.
        seed: the seed of every image's draws.
    """

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0, scale_std: float = 0.2,
                 rotate_frac_max: float = 1.0, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
                 translate_frac_std: float = 0.125, seed: int = 0) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"the augmentation probability p must be in [0, 1], got {p}")
        multipliers = dict(xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                           translate_frac=translate_frac)
        negative = [k for k, v in multipliers.items() if not v >= 0]
        if negative:
            raise ValueError(f"augmentation multipliers must be >= 0 (0 leaves an operation out): {negative}")
        if not any(multipliers.values()):
            raise ValueError(f"the augmentation pipeline needs at least one of {list(OPERATIONS)} > 0")
        if not 0 <= aniso_rotate_prob <= 1:
            raise ValueError(f"aniso_rotate_prob must be in [0, 1], got {aniso_rotate_prob}")
        self.p, self.seed = float(p), int(seed)
        for k, v in multipliers.items():
            setattr(self, k, float(v))
        self.scale_std, self.rotate_frac_max, self.aniso_std = float(scale_std), float(rotate_frac_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_frac_std = float(aniso_rotate_prob), float(translate_frac_std)

    @property
    def operations(self) -> tuple[str, ...]:
        """The operations in use, in the order of their labels."""
        return tuple(op for op in OPERATIONS if getattr(self, op) > 0)

    @property
    def dim(self) -> int:
        """Number of augmentation labels per image (the network's ``augment_dim``)."""
        return sum(LABELS[op] for op in self.operations)

    def rate(self, op: str) -> float:
        """Probability that ``op`` is applied to an image."""
        return min(1.0, getattr(self, op) * self.p)

    def draw(self, index: Tensor, epoch: int, height: int, width: int) -> Augmentation:
        """The augmentation of images ``index`` (B,) in ``epoch`` for images of height x width pixels."""
        keys = index.to(torch.long) + (self.seed << 32)
        z = seeded_normal(keys, (DRAWS,), step=int(epoch), device=index.device, stream=AUGMENT_STREAM).double()
        u = torch.special.ndtr(z)
        zero = torch.zeros_like(u[:, 0])

        def applied(col: int, op: str) -> Tensor:
            return u[:, col] < self.rate(op)

        labels: list[Tensor] = []
        flip = torch.ones_like(u[:, :2])
        G_inv = torch.eye(3, dtype=u.dtype, device=u.device).expand(len(u), 3, 3)
        if self.xflip > 0:
            w = (applied(0, "xflip") & (u[:, 1] < 0.5)).to(u.dtype)
            flip[:, 0], labels = 1 - 2 * w, labels + [w]
        if self.yflip > 0:
            w = (applied(2, "yflip") & (u[:, 3] < 0.5)).to(u.dtype)
            flip[:, 1], labels = 1 - 2 * w, labels + [w]
        if self.scale > 0:
            w = torch.where(applied(4, "scale"), z[:, 5], zero)
            s = torch.exp2(w * self.scale_std)
            G_inv, labels = G_inv @ scaling(1 / s, 1 / s), labels + [w]
        if self.rotate_frac > 0:
            w = torch.where(applied(6, "rotate_frac"), (2 * u[:, 7] - 1) * math.pi * self.rotate_frac_max, zero)
            G_inv, labels = G_inv @ rotation(w), labels + [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.where(applied(8, "aniso"), z[:, 9], zero)
            r = torch.where(u[:, 11] < self.aniso_rotate_prob, (2 * u[:, 10] - 1) * math.pi, zero)
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ rotation(-r) @ scaling(1 / s, s) @ rotation(r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            on = applied(12, "translate_frac")
            tx, ty = torch.where(on, z[:, 13], zero), torch.where(on, z[:, 14], zero)
            G_inv = G_inv @ translation(-tx * width * self.translate_frac_std, -ty * height * self.translate_frac_std)
            labels += [tx, ty]
        matrix = scaling(flip[:, 0], flip[:, 1]) @ G_inv  # flips act on the input, before the warp
        return Augmentation(torch.stack(labels, 1).float(), matrix.float())

    def __call__(self, images: Tensor, index: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Augmented images (B, C, H, W) and their labels (B, dim) for images ``index`` in ``epoch``."""
        if images.dim() != 4:
            raise ValueError(f"augmentation needs images (B, C, H, W), got shape {tuple(images.shape)}")
        if self.p == 0:
            return images, images.new_zeros(len(images), self.dim, dtype=torch.float32)
        aug = self.draw(index.to(images.device), epoch, *images.shape[-2:])
        return warp(images, aug.matrix), aug.labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
