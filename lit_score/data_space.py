"""Where a model's data live: the shape of one sample, the value range ([0, 1], or [-1, 1] when centered) and the
quantisation of the stored data (256 levels for 8-bit images). The DataModule declares it, the model and its
checkpoint carry it, and samples, FID, sample grids and bits/dim read it from the model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lit_score.rng import seeded_normal

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
    """

    shape: tuple[int, ...]
    centered: bool = False
    num_levels: int | None = UINT8_LEVELS

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"a data space needs a shape of positive sizes, got {self.shape!r}")
        if self.num_levels is not None and int(self.num_levels) < 2:
            raise ValueError(f"num_levels must be >= 2, or None for continuous data; got {self.num_levels}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "centered", bool(self.centered))

    @classmethod
    def image(cls, num_channels: int, image_size: int, centered: bool = False,
              num_levels: int | None = UINT8_LEVELS) -> "DataSpace":
        """Square images (C, image_size, image_size)."""
        return cls((num_channels, image_size, image_size), centered, num_levels)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSpace":
        return cls(tuple(d["shape"]), bool(d["centered"]), d.get("num_levels", UINT8_LEVELS))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as hyperparameters, checkpoints and config.json hold them."""
        return {"shape": list(self.shape), "centered": self.centered, "num_levels": self.num_levels}

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
