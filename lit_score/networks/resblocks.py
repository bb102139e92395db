"""Residual blocks of NCSN++ / DDPM++: the DDPM-style block and the BigGAN-style block
(which can itself up- or down-sample). Both add a per-channel bias from the noise-level
embedding, and their last conv starts near zero (``init_scale=0`` -> 1e-10) so each block
is close to the identity at initialisation.

Submodule names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``GroupNorm_1``, ``Dropout_0``,
``Conv_1``, ``Conv_2``, ``NIN_0``) follow the official score_sde code.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from .fir import downsample_2d, naive_downsample_2d, naive_upsample_2d, setup_kernel, upsample_2d
from .layers import NIN, conv1x1, conv3x3, dense, group_norm

_SQRT2 = math.sqrt(2.0)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block: GN-act-conv, + Dense(temb), GN-act-dropout-conv; NIN (or 3x3) shortcut if widths differ."""

    def __init__(
        self,
        act: nn.Module,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.1,
        skip_rescale: bool = False,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.act, self.in_ch, self.out_ch = act, in_ch, out_ch
        self.conv_shortcut, self.skip_rescale = conv_shortcut, skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """(B, in_ch, H, W), temb (B, temb_dim) or None -> (B, out_ch, H, W)."""
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block, optionally resampling by 2 (FIR or nearest/avg-pool) inside; 1x1 shortcut ``Conv_2``."""

    def __init__(
        self,
        act: nn.Module,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResnetBlockBigGANpp cannot both upsample and downsample")
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.act, self.in_ch, self.out_ch = act, in_ch, out_ch
        self.up, self.down, self.fir, self.skip_rescale = up, down, fir, skip_rescale
        self.register_buffer("fir_kernel", setup_kernel(fir_kernel), persistent=False)

    def _resample(self, t: Tensor) -> Tensor:
        if self.up:
            return upsample_2d(t, self.fir_kernel, factor=2) if self.fir else naive_upsample_2d(t, 2)
        if self.down:
            return downsample_2d(t, self.fir_kernel, factor=2) if self.fir else naive_downsample_2d(t, 2)
        return t

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """(B, in_ch, H, W), temb (B, temb_dim) or None -> (B, out_ch, H', W'), H' = 2H / H/2 / H."""
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h
