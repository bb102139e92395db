"""NCSN++ and DDPM++ score networks (Song et al. 2021, appendix H), in pure PyTorch.

Both are the same U-Net family, switched by configuration exactly as in the official
``yang-song/score_sde_pytorch`` ``models/ncsnpp.py`` (option names and meanings kept):
``resblock_type`` ('biggan' | 'ddpm'), ``progressive`` ('none' | 'output_skip' | 'residual'),
``progressive_input`` ('none' | 'input_skip' | 'residual'), ``progressive_combine`` ('sum' | 'cat'),
``embedding_type`` ('fourier' | 'positional'), ``fir``, ``skip_rescale``, ``init_scale``, ...

Checkpoint compatibility: every learnable layer lives, in the official construction order, in one
flat ``self.all_modules`` ``nn.ModuleList`` with the official submodule and parameter names, so the
official ``state_dict`` keys (``all_modules.0.W``, ``all_modules.1.weight``, ...) line up one-to-one
with ours, with the same shapes and the same ``parameters()`` order (so an official EMA
``shadow_params`` list also maps in order). The only differences: the official model also stores
a ``sigmas`` buffer (unused by the continuous-time models; we do not keep it) and official checkpoints
are saved from ``nn.DataParallel`` (``module.`` prefix); ``lit_score.interop.score_sde`` handles both.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .cond import ClassEmbedding, Cond, augment_labels, check_class_options, class_labels
from .fir import Downsample, Upsample
from .layers import (
    AttnBlockpp,
    Combine,
    GaussianFourierProjection,
    conv3x3,
    dense,
    get_act,
    group_norm,
    timestep_embedding,
)
from .resblocks import ResnetBlockBigGANpp, ResnetBlockDDPMpp

_SQRT2 = math.sqrt(2.0)
_RESBLOCKS = ("biggan", "ddpm")
_PROGRESSIVE = ("none", "output_skip", "residual")
_PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
_COMBINE = ("sum", "cat")
_EMBEDDINGS = ("fourier", "positional")


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    value = value.lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def unet_resolutions(num_channels: int, image_size: int, nf: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                     attn_resolutions: tuple[int, ...]) -> list[int]:
    """The resolutions of the U-Net's levels (image_size, image_size / 2, ...), or a one-line error naming the
    option that does not fit."""
    if num_channels < 1 or nf < 1 or num_res_blocks < 0 or not ch_mult or min(ch_mult) < 1:
        raise ValueError(
            f"need num_channels >= 1, nf >= 1, num_res_blocks >= 0 and a non-empty positive ch_mult; got "
            f"num_channels={num_channels}, nf={nf}, num_res_blocks={num_res_blocks}, ch_mult={ch_mult}"
        )
    num_resolutions = len(ch_mult)
    factor = 2 ** (num_resolutions - 1)
    if image_size < factor or image_size % factor != 0:
        raise ValueError(
            f"image_size {image_size} must be divisible by 2**(len(ch_mult) - 1) = {factor} "
            f"(ch_mult={ch_mult} halves the resolution {num_resolutions - 1} times)"
        )
    resolutions = [image_size // 2**i for i in range(num_resolutions)]
    unknown = [r for r in attn_resolutions if r not in resolutions]
    if unknown:
        raise ValueError(
            f"attn_resolutions {attn_resolutions} names resolution(s) {unknown} that never occur; "
            f"the resolutions of this network are {resolutions}"
        )
    return resolutions


class NCSNpp(nn.Module):
    """NCSN++ U-Net score network; defaults are the official NCSN++ cont. (VE) CIFAR-10 architecture.

    ``forward(x, c_noise)``: x (B, num_channels, image_size, image_size), c_noise (B,), the noise label the
    model's preconditioning gives (``lit_score.diffusion.denoiser``), embedded as it is: Gaussian Fourier features
    (``embedding_type='fourier'``; score_sde's VE networks see log sigma) or sinusoidal positions ('positional';
    its VP networks see 999 t). ``centered=False`` maps inputs in [0, 1] to [-1, 1] (2x - 1) first; unlike the
    official VE config (data.centered=False) it defaults to True: set it explicitly. ``augment_dim`` > 0 adds EDM's
    ``map_augment`` (a bias-free linear map of the augmentation labels ``cond["augment"]`` into the noise embedding;
    Karras et al. 2022, appendix B.4); without labels it computes what the network without it computes.
    ``num_classes`` > 0 makes it class-conditional: EDM's ``map_label`` adds the labels ``cond["class_labels"]``
    to the noise embedding, each dropped to the null class with probability ``label_dropout`` in training.
    """

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 32,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        fir: bool = True,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        nonlinearity: str = "swish",
        centered: bool = True,
        augment_dim: int = 0,
        num_classes: int = 0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_class_options(num_classes, label_dropout)
        if num_classes and not conditional:
            raise ValueError("num_classes needs conditional=True (class labels join the noise embedding)")
        resblock_type = _choice("resblock_type", resblock_type, _RESBLOCKS)
        progressive = _choice("progressive", progressive, _PROGRESSIVE)
        progressive_input = _choice("progressive_input", progressive_input, _PROGRESSIVE_INPUT)
        combine = _choice("progressive_combine", progressive_combine, _COMBINE)
        embedding_type = _choice("embedding_type", embedding_type, _EMBEDDINGS)
        ch_mult, attn_resolutions, fir_kernel = tuple(ch_mult), tuple(attn_resolutions), tuple(fir_kernel)
        if augment_dim < 0 or (augment_dim and not conditional):
            raise ValueError(f"augment_dim must be >= 0 and needs conditional=True (augmentation labels join the noise "
                             f"embedding), got augment_dim={augment_dim}, conditional={conditional}")
        resolutions = unet_resolutions(num_channels, image_size, nf, ch_mult, num_res_blocks, attn_resolutions)
        num_resolutions = len(resolutions)

        self.num_channels, self.image_size, self.nf = num_channels, image_size, nf
        self.num_resolutions, self.num_res_blocks = num_resolutions, num_res_blocks
        self.all_resolutions, self.attn_resolutions = resolutions, attn_resolutions
        self.attn_at = [r in attn_resolutions for r in resolutions]
        self.conditional, self.skip_rescale = conditional, skip_rescale
        self.resblock_type, self.progressive, self.progressive_input = resblock_type, progressive, progressive_input
        self.embedding_type, self.centered = embedding_type, centered
        self.act = act = get_act(nonlinearity)
        temb_dim = 4 * nf

        def resblock(in_ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> nn.Module:
            if resblock_type == "ddpm":
                return ResnetBlockDDPMpp(act, in_ch, out_ch, temb_dim, dropout=dropout,
                                         skip_rescale=skip_rescale, init_scale=init_scale)
            return ResnetBlockBigGANpp(act, in_ch, out_ch, temb_dim, up=up, down=down, dropout=dropout, fir=fir,
                                       fir_kernel=fir_kernel, skip_rescale=skip_rescale, init_scale=init_scale)

        def attn(ch: int) -> nn.Module:
            return AttnBlockpp(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        # Parameter-free resamplers of the image pyramids (outside all_modules, as in the official code).
        if progressive == "output_skip":
            self.pyramid_upsample = Upsample(fir=fir, fir_kernel=fir_kernel, with_conv=False)
        if progressive_input == "input_skip":
            self.pyramid_downsample = Downsample(fir=fir, fir_kernel=fir_kernel, with_conv=False)

        modules: list[nn.Module] = []
        # noise-level embedding
        if embedding_type == "fourier":
            modules.append(GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if conditional:
            modules += [dense(embed_dim, temb_dim), dense(temb_dim, temb_dim)]

        # downsampling path
        modules.append(conv3x3(num_channels, nf))
        hs_c = [nf]
        in_ch, pyramid_in_ch = nf, num_channels
        for level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[level]
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if self.attn_at[level]:
                    modules.append(attn(in_ch))
                hs_c.append(in_ch)
            if level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    modules.append(Downsample(in_ch=in_ch, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                else:
                    modules.append(resblock(in_ch, down=True))
                if progressive_input == "input_skip":
                    modules.append(Combine(pyramid_in_ch, in_ch, method=combine))
                    if combine == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    modules.append(Downsample(in_ch=pyramid_in_ch, out_ch=in_ch, with_conv=True, fir=fir,
                                              fir_kernel=fir_kernel))
                    pyramid_in_ch = in_ch
                hs_c.append(in_ch)

        # bottleneck
        modules += [resblock(in_ch), attn(in_ch), resblock(in_ch)]

        # upsampling path
        pyramid_ch = 0
        for level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[level]
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if self.attn_at[level]:
                modules.append(attn(in_ch))
            if progressive == "output_skip":
                # the same layers at every level: an output image at this resolution
                modules += [group_norm(in_ch), conv3x3(in_ch, num_channels, init_scale=init_scale)]
                pyramid_ch = num_channels
            elif progressive == "residual":
                if level == num_resolutions - 1:
                    modules += [group_norm(in_ch), conv3x3(in_ch, in_ch)]
                else:
                    modules.append(Upsample(in_ch=pyramid_ch, out_ch=in_ch, with_conv=True, fir=fir,
                                            fir_kernel=fir_kernel))
                pyramid_ch = in_ch
            if level != 0:
                if resblock_type == "ddpm":
                    modules.append(Upsample(in_ch=in_ch, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                else:
                    modules.append(resblock(in_ch, up=True))
        assert not hs_c, "internal error: unmatched skip connections"

        if progressive != "output_skip":
            modules += [group_norm(in_ch), conv3x3(in_ch, num_channels, init_scale=init_scale)]
        self.all_modules = nn.ModuleList(modules)
        # EDM's map_augment: augmentation labels join the noise embedding (outside all_modules: the official layout)
        self.augment_dim = int(augment_dim)
        self.map_augment = nn.Linear(augment_dim, embed_dim, bias=False) if augment_dim else None
        if self.map_augment is not None:
            nn.init.xavier_uniform_(self.map_augment.weight)
        self.num_classes = int(num_classes)
        self.map_label = ClassEmbedding(num_classes, embed_dim, label_dropout) if num_classes else None

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: Tensor, c_noise: Tensor) -> Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}"
            )
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        if tuple(c_noise.shape) != (x.shape[0],):
            raise ValueError(
                f"c_noise must have shape ({x.shape[0]},) (one per sample), got {tuple(c_noise.shape)}"
            )
        return c_noise

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """Shape of one sample: (C, H, W)."""
        return (self.num_channels, self.image_size, self.image_size)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B,) -> (B, C, H, W); ``cond``: {"augment": (B, augment_dim)} labels of a network
        with ``augment_dim`` (absent or None: zero labels, the un-augmented images sampling draws), and
        {"class_labels": (B,)} of a class-conditional one (required; -1 is the null class)."""
        c_noise = self._check_inputs(x, c_noise)
        augment = augment_labels(self, cond, x.shape[0])
        labels = class_labels(self, cond, x.shape[0])
        it = iter(self.all_modules)
        act = self.act

        if self.embedding_type == "fourier":
            temb = next(it)(c_noise)
        else:
            temb = timestep_embedding(c_noise, self.nf)
        if labels is not None:
            temb = temb + self.map_label(labels).to(temb.dtype)
        if augment is not None:
            temb = temb + self.map_augment(augment.to(self.map_augment.weight.dtype))
        if self.conditional:
            dense_0, dense_1 = next(it), next(it)
            temb = dense_1(act(dense_0(temb.to(dense_0.weight.dtype))))
        else:
            temb = None

        if not self.centered:
            x = 2 * x - 1.0

        # downsampling path
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [next(it)(x)]
        for level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(it)(hs[-1], temb)
                if self.attn_at[level]:
                    h = next(it)(h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                down = next(it)
                h = down(hs[-1]) if self.resblock_type == "ddpm" else down(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(it)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = next(it)(input_pyramid)
                    input_pyramid = (input_pyramid + h) / _SQRT2 if self.skip_rescale else input_pyramid + h
                    h = input_pyramid
                hs.append(h)

        # bottleneck
        h = next(it)(hs[-1], temb)
        h = next(it)(h)
        h = next(it)(h, temb)

        # upsampling path
        pyramid = None
        for level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(it)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_at[level]:
                h = next(it)(h)
            if self.progressive == "output_skip":
                norm, conv = next(it), next(it)
                out = conv(act(norm(h)))
                pyramid = out if pyramid is None else self.pyramid_upsample(pyramid) + out
            elif self.progressive == "residual":
                if level == self.num_resolutions - 1:
                    norm, conv = next(it), next(it)
                    pyramid = conv(act(norm(h)))
                else:
                    pyramid = next(it)(pyramid)
                    pyramid = (pyramid + h) / _SQRT2 if self.skip_rescale else pyramid + h
                    h = pyramid
            if level != 0:
                up = next(it)
                h = up(h) if self.resblock_type == "ddpm" else up(h, temb)

        if self.progressive == "output_skip":
            h = pyramid
        else:
            norm, conv = next(it), next(it)
            h = conv(act(norm(h)))
        assert next(it, None) is None, "internal error: not all modules were used"

        return h


class DDPMpp(NCSNpp):
    """DDPM++ score network: NCSN++ with the official DDPM++ cont. (VP) CIFAR-10 defaults
    (BigGAN blocks, no FIR, no progressive paths, positional embedding)."""

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 32,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "none",
        progressive_combine: str = "sum",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        nonlinearity: str = "swish",
        centered: bool = True,
        augment_dim: int = 0,
        num_classes: int = 0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            num_channels=num_channels, image_size=image_size, nf=nf, ch_mult=ch_mult,
            num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions, dropout=dropout,
            resamp_with_conv=resamp_with_conv, conditional=conditional, fir=fir, fir_kernel=fir_kernel,
            skip_rescale=skip_rescale, resblock_type=resblock_type, progressive=progressive,
            progressive_input=progressive_input, progressive_combine=progressive_combine,
            embedding_type=embedding_type, fourier_scale=fourier_scale, init_scale=init_scale,
            nonlinearity=nonlinearity, centered=centered, augment_dim=augment_dim,
            num_classes=num_classes, label_dropout=label_dropout,
        )

