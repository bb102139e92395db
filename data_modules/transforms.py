"""Image preprocessing: PIL image -> float tensor (C, H, W) in the model's data space.

The order is that of the official score_sde input pipeline: optional center crop of a fixed side (CelebA: 140),
resize so the shorter side is ``image_size`` (antialiased bilinear), center crop to a square, optional random
horizontal flip, then scaling to [0, 1] (``x / 255``) or, with uniform dequantisation, ``(x + u) / 256`` with
``u ~ U[0, 1)``, and with ``centered`` the map ``2x - 1`` to [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_score.errors import DataError

GRAYSCALE_MODES = ("1", "L", "LA", "I", "F")


def channels_of(mode: str) -> int:
    """1 for a grayscale PIL mode, 3 for anything with colour (palette images included)."""
    return 1 if mode in GRAYSCALE_MODES or mode.startswith("I;") else 3


def to_channels(image: Image.Image, num_channels: int) -> Image.Image:
    """The image as grayscale ("L") for 1 channel or "RGB" for 3."""
    if num_channels not in (1, 3):
        raise DataError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
    mode = "L" if num_channels == 1 else "RGB"
    if image.mode == mode:
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert(mode)


def center_crop(image: Image.Image, width: int, height: int | None = None) -> Image.Image:
    """The central ``width`` x ``height`` (default: square) window; the image must be at least that large."""
    height = width if height is None else height
    w, h = image.size
    if w < width or h < height:
        raise DataError(f"cannot center-crop {width}x{height} from a {w}x{h} image")
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (antialiased bilinear) keeping the aspect ratio so that the shorter side is ``size``."""
    w, h = image.size
    if min(w, h) == size:
        return image
    if w <= h:
        new = (size, max(size, round(h * size / w)))
    else:
        new = (max(size, round(w * size / h)), size)
    return image.resize(new, Image.BILINEAR)


def to_uint8_tensor(image: Image.Image) -> Tensor:
    """(C, H, W) uint8 tensor of an "L" or "RGB" image."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def scale(x: Tensor, centered: bool = False, dequantize: bool = False,
          generator: torch.Generator | None = None) -> Tensor:
    """uint8 pixels -> floats: x / 255, or (x + u) / 256 with u ~ U[0, 1) when dequantising; then 2x - 1 if centered."""
    x = x.float()
    if dequantize:
        x = (x + torch.rand(x.shape, generator=generator)) / 256.0
    else:
        x = x / 255.0
    return x * 2.0 - 1.0 if centered else x


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (num_channels, image_size, image_size) float tensor.

    ``center_crop``: side of the central square cut before resizing (None: none). ``random_flip`` flips
    horizontally with probability 1/2, drawing from torch's global generator (which PyTorch seeds per
    DataLoader worker).
    """

    image_size: int
    num_channels: int
    center_crop: int | None = None
    random_flip: bool = False
    centered: bool = False
    dequantize: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise DataError(f"image_size must be positive, got {self.image_size}")
        if self.num_channels not in (1, 3):
            raise DataError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {self.num_channels}")
        if self.center_crop is not None and self.center_crop < 1:
            raise DataError(f"center_crop must be a positive side length or None, got {self.center_crop}")

    def pixels(self, image: Image.Image) -> Tensor:
        """The deterministic part: (C, S, S) uint8 after channel conversion, crops and resize."""
        image = to_channels(image, self.num_channels)
        if self.center_crop is not None:
            image = center_crop(image, self.center_crop)
        image = center_crop(resize_short_side(image, self.image_size), self.image_size)
        return to_uint8_tensor(image)

    def __call__(self, image: Image.Image) -> Tensor:
        x = self.pixels(image)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return scale(x, self.centered, self.dequantize)
