"""Up- and down-sampling, plain (nearest / average pooling) or with a FIR filter (StyleGAN2-style),
in pure PyTorch.

The core is :func:`upfirdn2d`: zero-insertion upsampling, padding, a 2-D FIR filter applied as a true
convolution (kernel flipped) per channel, then decimation. With the default kernel [1, 3, 3, 1] the
filter is normalised so that a constant image stays constant through :func:`upsample_2d` and
:func:`downsample_2d`.

Module attribute / parameter names (``Conv_0``, ``Conv2d_0.weight``, ``Conv2d_0.bias``) follow the
official score_sde code; the FIR kernels are non-persistent buffers, so they are not in the state_dict.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import conv3x3, default_init_

KernelLike = Union[Sequence[float], Sequence[Sequence[float]], Tensor]


def setup_kernel(k: KernelLike) -> Tensor:
    """FIR taps -> normalised square 2-D float32 kernel (1-D taps give the separable outer product); sums to 1."""
    k = torch.as_tensor(k, dtype=torch.float32) if not isinstance(k, Tensor) else k.float()
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return k / k.sum()


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample; per channel, the same on both axes.

    x: (N, C, H, W); kernel: (kh, kw), applied as a convolution (i.e. flipped, as in StyleGAN2's
    upfirdn2d); pad: (before, after) on both spatial axes, negative values crop.
    Output size per axis: (size * up + before + after - k) // down + 1.
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects (N, C, H, W), got shape {tuple(x.shape)}")
    if kernel.ndim != 2:
        raise ValueError(f"upfirdn2d expects a 2-D kernel, got shape {tuple(kernel.shape)}")
    n, c, h, w = x.shape
    if up > 1:  # put each pixel in the top-left corner of an up x up block of zeros
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    before, after = pad
    if before > 0 or after > 0:
        x = F.pad(x, (max(before, 0), max(after, 0), max(before, 0), max(after, 0)))
    if before < 0 or after < 0:
        lo, hi = max(-before, 0), max(-after, 0)
        x = x[:, :, lo : x.shape[2] - hi, lo : x.shape[3] - hi]
    kh, kw = kernel.shape
    weight = torch.flip(kernel.to(device=x.device, dtype=x.dtype), (0, 1)).expand(c, 1, kh, kw).contiguous()
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: Tensor, k: KernelLike = (1, 1), factor: int = 2, gain: float = 1.0) -> Tensor:
    """FIR upsampling (N, C, H, W) -> (N, C, H*factor, W*factor); the kernel is normalised so constants are kept."""
    kernel = setup_kernel(k) * (gain * factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, k: KernelLike = (1, 1), factor: int = 2, gain: float = 1.0) -> Tensor:
    """FIR downsampling (N, C, H, W) -> (N, C, H//factor, W//factor); kernel normalised so constants are kept."""
    kernel = setup_kernel(k) * gain
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour upsampling by an integer factor."""
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def naive_downsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Average pooling over factor x factor blocks."""
    return F.avg_pool2d(x, factor, stride=factor)


def upsample_conv_2d(x: Tensor, w: Tensor, k: KernelLike = (1, 1), factor: int = 2, gain: float = 1.0) -> Tensor:
    """Fused FIR upsampling followed by a 'same' convolution with w (out, in, kh, kw), StyleGAN2-style.

    Implemented as a strided transposed convolution (with the spatially flipped, in/out-swapped weight)
    and one FIR pass.
    """
    out_ch, in_ch, kh, kw = w.shape
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"upsample_conv_2d needs a square odd conv kernel, got {tuple(w.shape)}")
    kernel = setup_kernel(k) * (gain * factor**2)
    p = (kernel.shape[0] - factor) - (kw - 1)
    w_t = torch.flip(w, (2, 3)).transpose(0, 1)  # (in, out, kh, kw): conv_transpose2d layout
    x = F.conv_transpose2d(x, w_t, stride=factor)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Tensor, w: Tensor, k: KernelLike = (1, 1), factor: int = 2, gain: float = 1.0) -> Tensor:
    """Fused FIR filtering followed by a strided convolution with w (out, in, kh, kw), StyleGAN2-style."""
    _, _, kh, kw = w.shape
    if kh != kw:
        raise ValueError(f"conv_downsample_2d needs a square conv kernel, got {tuple(w.shape)}")
    kernel = setup_kernel(k) * gain
    p = (kernel.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=factor)


class FIRConv2d(nn.Module):
    """Conv layer with optional fused FIR up- or down-sampling by 2 (StyleGAN2 ``Conv2d``); ``weight``, ``bias``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        up: bool = False,
        down: bool = False,
        resample_kernel: Sequence[float] = (1, 3, 3, 1),
        use_bias: bool = True,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d cannot both upsample and downsample")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"FIRConv2d kernel size must be odd and >= 1, got {kernel}")
        self.weight = nn.Parameter(default_init_(torch.empty(out_ch, in_ch, kernel, kernel)))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if use_bias else None
        self.up, self.down, self.kernel = up, down, kernel
        self.register_buffer("resample_kernel", setup_kernel(resample_kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in, H, W) -> (N, out, H', W') with H' = 2H, H/2 or H."""
        if self.up:
            x = upsample_conv_2d(x, self.weight, self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, self.resample_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=self.kernel // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class Upsample(nn.Module):
    """2x upsampling: nearest (+ optional 3x3 conv ``Conv_0``) or FIR (+ optional fused conv ``Conv2d_0``)."""

    def __init__(
        self,
        in_ch: int | None = None,
        out_ch: int | None = None,
        with_conv: bool = False,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and in_ch is None:
            raise ValueError("Upsample with_conv=True needs in_ch")
        if with_conv:
            if fir:
                self.Conv2d_0 = FIRConv2d(in_ch, out_ch, kernel=3, up=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch)
        self.fir, self.with_conv, self.out_ch = fir, with_conv, out_ch
        self.register_buffer("fir_kernel", setup_kernel(fir_kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_ch, 2H, 2W)."""
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else upsample_2d(x, self.fir_kernel, factor=2)
        h = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: average pool / strided 3x3 conv ``Conv_0``, or FIR (+ optional fused conv ``Conv2d_0``)."""

    def __init__(
        self,
        in_ch: int | None = None,
        out_ch: int | None = None,
        with_conv: bool = False,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and in_ch is None:
            raise ValueError("Downsample with_conv=True needs in_ch")
        if with_conv:
            if fir:
                self.Conv2d_0 = FIRConv2d(in_ch, out_ch, kernel=3, down=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.fir, self.with_conv, self.out_ch = fir, with_conv, out_ch
        self.register_buffer("fir_kernel", setup_kernel(fir_kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_ch, H/2, W/2)."""
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.fir_kernel, factor=2)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad + stride 2, as in DDPM
        return naive_downsample_2d(x, 2)
