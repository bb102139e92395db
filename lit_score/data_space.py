"""Where a model's data live: the shape of one sample, the value range ([0, 1], or [-1, 1] when centered) and the
quantisation of the stored data (256 levels for 8-bit images). The DataModule declares it, the model and its
checkpoint carry it, and samples, FID, sample grids and bits/dim read it from the model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lit_score.rng import LABEL_STREAM, seeded_normal

UINT8_LEVELS = 256


def to_uint8(x: Tensor, centered: bool) -> Tensor:
    """Images in data space ([-1, 1] if centered, else [0, 1]) rounded to the nearest of 256 levels, as uint8 in
    x's layout (B, C, H, W) and on x's device: how real images are stored."""
    x01 = (x.float() + 1) / 2 if centered else x.float()
    return torch.round(x01.clamp(0, 1) * 255).to(torch.uint8)


def dequantize(x: Tensor, seeds: Sequence[int] | Tensor, centered: bool, num_levels: int = UINT8_LEVELS) -> Tensor:
    """Uniform dequantisation: k = round(x01 (L - 1)) in {0, ..., L-1}, y = (k + u) / L, u ~ U[0, 1)^D per image seed,
    where x01 is x in [0, 1] (x itself, or (x + 1) / 2 for centered data); returned in x's data space."""
    x01 = (x + 1) / 2 if centered else x
    if x01.min() < -1e-6 or x01.max() > 1 + 1e-6:
        raise ValueError(f"data must lie in {'[-1, 1]' if centered else '[0, 1]'} to be dequantised, "
                         f"got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    k = torch.round(x01.clamp(0, 1) * (num_levels - 1))
    u = torch.special.ndtr(seeded_normal(seeds, tuple(x.shape[1:]), step=2**21, device=x.device, dtype=torch.float64))
    y = ((k + u.to(x.dtype)) / num_levels).clamp(max=1 - 1e-7)
    return 2 * y - 1 if centered else y


@dataclass(frozen=True)
class DataSpace:
    """The data of a model.

    Args:
        shape: one sample, (C, H, W) for images or (D,) for vectors.
        centered: values in [-1, 1] rather than [0, 1].
        num_levels: quantisation levels of the stored data (256 for 8-bit images); None for continuous data
            (no dequantisation, no uint8 images, bits/dim without an offset).
        num_classes: classes of labelled data (0: unlabelled); labels are 0 .. num_classes - 1.
        class_names: the name of each class (an image folder's subfolders, a ClassLabel's names).
        class_counts: training images per class: the frequencies labels are drawn with when sampling.
    """

    shape: tuple[int, ...]
    centered: bool = False
    num_levels: int | None = UINT8_LEVELS
    num_classes: int = 0
    class_names: tuple[str, ...] | None = None
    class_counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"a data space needs a shape of positive sizes, got {self.shape!r}")
        if self.num_levels is not None and int(self.num_levels) < 2:
            raise ValueError(f"num_levels must be >= 2, or None for continuous data; got {self.num_levels}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "centered", bool(self.centered))
        n = int(self.num_classes)
        if n < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        object.__setattr__(self, "num_classes", n)
        for name, kind in (("class_names", str), ("class_counts", int)):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(kind(v) for v in value)
            if len(value) != n:
                raise ValueError(f"{name} must have one entry per class ({n}), got {len(value)}")
            object.__setattr__(self, name, value)
        if self.class_counts is not None and (min(self.class_counts, default=0) < 0 or n and not sum(self.class_counts)):
            raise ValueError(f"class_counts must be >= 0 with a positive total, got {list(self.class_counts)}")

    @classmethod
    def image(cls, num_channels: int, image_size: int, centered: bool = False,
              num_levels: int | None = UINT8_LEVELS) -> "DataSpace":
        """Square images (C, image_size, image_size)."""
        return cls((num_channels, image_size, image_size), centered, num_levels)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSpace":
        return cls(tuple(d["shape"]), bool(d["centered"]), d.get("num_levels", UINT8_LEVELS),
                   int(d.get("num_classes", 0) or 0), d.get("class_names"), d.get("class_counts"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as hyperparameters, checkpoints and config.json hold them (the class entries only for
        labelled data, so an unlabelled data space reads as before)."""
        d: dict[str, Any] = {"shape": list(self.shape), "centered": self.centered, "num_levels": self.num_levels}
        if self.num_classes:
            d["num_classes"] = self.num_classes
            d["class_names"] = None if self.class_names is None else list(self.class_names)
            d["class_counts"] = None if self.class_counts is None else list(self.class_counts)
        return d

    def unlabelled(self) -> "DataSpace":
        """The same data without its classes."""
        return DataSpace(self.shape, self.centered, self.num_levels)

    def class_probabilities(self) -> Tensor:
        """(num_classes,) float64: the training set's class frequencies, uniform when the counts are unknown."""
        if not self.num_classes:
            raise ValueError("the data are unlabelled (num_classes 0): they have no class frequencies")
        counts = torch.ones(self.num_classes, dtype=torch.float64) if self.class_counts is None else \
            torch.tensor(self.class_counts, dtype=torch.float64)
        return counts / counts.sum()

    def labels_for(self, seeds: Sequence[int] | Tensor, class_label: int | None = None,
                   device: torch.device | str | None = None) -> Tensor:
        """(B,) int64 class labels of the images drawn with ``seeds``: all ``class_label`` when given, else label i
        drawn from seed i alone (its own stream) with the training set's class frequencies, so a seed's label is the
        same on any number of processes and batch sizes."""
        if not self.num_classes:
            raise ValueError("the data are unlabelled (num_classes 0): a class-conditional model needs labelled "
                             "data (see the README's conditional section)")
        n = len(seeds)
        if class_label is not None:
            if not 0 <= int(class_label) < self.num_classes:
                raise ValueError(f"class_label must be in 0..{self.num_classes - 1}, got {class_label}")
            return torch.full((n,), int(class_label), dtype=torch.long, device=device)
        z = seeded_normal(seeds, (1,), device=device, dtype=torch.float64, stream=LABEL_STREAM)[:, 0]
        u = torch.special.ndtr(z)
        edges = self.class_probabilities().to(u.device).cumsum(0)[:-1]
        return torch.searchsorted(edges, u, right=True).long()

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def num_dims(self) -> int:
        return math.prod(self.shape)

    @property
    def range(self) -> tuple[float, float]:
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    def to_model(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) as floats in this space: k / 255, or 2 k / 255 - 1 when centered."""
        x = images.float() / 255
        return 2 * x - 1 if self.centered else x

    def to_uint8(self, x: Tensor) -> Tensor:
        """Samples (B, C, H, W) in this space quantised to uint8 images (B, C, H, W)."""
        if not self.is_image:
            raise ValueError(f"samples of shape {self.shape} are not images (C, H, W); they have no uint8 form")
        return to_uint8(x, self.centered)

    def dequantize(self, x: Tensor, seeds: Sequence[int] | Tensor) -> Tensor:
        """Uniform dequantisation of quantised data (unchanged for continuous data), noise from each image's seed."""
        return x if self.num_levels is None else dequantize(x, seeds, self.centered, self.num_levels)


def data_space_of(datamodule: Any) -> DataSpace:
    """The data space a DataModule declares (its ``data_space``), or an error that says how to declare one."""
    space = getattr(datamodule, "data_space", None)
    if not isinstance(space, DataSpace):
        raise TypeError(f"{type(datamodule).__name__} must declare its data with a `data_space` attribute "
                        f"(lit_score.data_space.DataSpace: shape, centered, num_levels); got {space!r}")
    return space
