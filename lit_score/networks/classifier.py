"""A noise-conditional classifier p_sigma(y | x_hat) for classifier guidance (Song et al. 2021, appendix I;
Dhariwal & Nichol 2021, section 4): the encoder half of the NCSN++ / DDPM++ U-Net (input conv, down path, middle
block) followed by GroupNorm, the nonlinearity, global average pooling and a linear layer to the class logits.

It is trained as a ``ScoreModel`` whose loss is ``lit_score.diffusion.losses.ClassifierLoss`` (cross-entropy of the
labels of noisy images), so checkpoints, resume, EMA, DDP and export work as for the score networks; the model's
preconditioning gives its input scaling c_in and noise label c_noise (``lit_score.diffusion.losses.classifier_logits``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch
from torch import Tensor, nn

from .cond import Cond, augment_labels
from .fir import Downsample
from .layers import AttnBlockpp, GaussianFourierProjection, conv3x3, dense, get_act, group_norm, timestep_embedding
from .ncsnpp import _EMBEDDINGS, _RESBLOCKS, _choice, unet_resolutions
from .resblocks import ResnetBlockBigGANpp, ResnetBlockDDPMpp


class NoiseClassifierNet(nn.Module):
    """Noise-conditional image classifier: ``forward(x, c_noise) -> (B, num_classes)`` logits.

    The layers are NCSN++'s (``lit_score.networks.ncsnpp.NCSNpp``, options of the same names and meanings) up to the
    bottleneck: input conv, ``num_res_blocks`` residual blocks per resolution of ``ch_mult`` (self-attention at
    ``attn_resolutions``), a downsampling between resolutions, then resblock-attention-resblock; then GroupNorm,
    the nonlinearity, the mean over pixels and a linear head to ``num_classes`` logits. The noise label c_noise is
    embedded as in NCSN++ (``embedding_type`` 'positional', as DDPM++, or 'fourier'). ``centered=False`` maps
    inputs in [0, 1] to [-1, 1] first, as NCSN++. ``augment_dim`` > 0 takes EDM's augmentation labels
    (``cond["augment"]``) into the noise embedding, as NCSN++. It predicts class labels and takes none.

    ``output = "logits"`` tells other code (guidance, export) that the network is a classifier, not a score network.
    """

    output = "logits"

    def __init__(
        self,
        num_classes: int,
        num_channels: int = 3,
        image_size: int = 32,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        nonlinearity: str = "swish",
        centered: bool = True,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes (the classes the classifier tells apart) must be an integer >= 2, "
                             f"got {num_classes!r}")
        resblock_type = _choice("resblock_type", resblock_type, _RESBLOCKS)
        embedding_type = _choice("embedding_type", embedding_type, _EMBEDDINGS)
        ch_mult, attn_resolutions, fir_kernel = tuple(ch_mult), tuple(attn_resolutions), tuple(fir_kernel)
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be >= 0, got {augment_dim}")
        resolutions = unet_resolutions(num_channels, image_size, nf, ch_mult, num_res_blocks, attn_resolutions)
        num_resolutions = len(resolutions)

        self.num_classes, self.num_channels, self.image_size, self.nf = int(num_classes), num_channels, image_size, nf
        self.num_resolutions, self.num_res_blocks = num_resolutions, num_res_blocks
        self.attn_at = [r in attn_resolutions for r in resolutions]
        self.resblock_type, self.embedding_type, self.centered = resblock_type, embedding_type, centered
        self.act = act = get_act(nonlinearity)
        temb_dim = 4 * nf

        def resblock(in_ch: int, out_ch: int | None = None, down: bool = False) -> nn.Module:
            if resblock_type == "ddpm":
                return ResnetBlockDDPMpp(act, in_ch, out_ch, temb_dim, dropout=dropout,
                                         skip_rescale=skip_rescale, init_scale=init_scale)
            return ResnetBlockBigGANpp(act, in_ch, out_ch, temb_dim, down=down, dropout=dropout, fir=fir,
                                       fir_kernel=fir_kernel, skip_rescale=skip_rescale, init_scale=init_scale)

        # noise-level embedding
        if embedding_type == "fourier":
            self.fourier = GaussianFourierProjection(embedding_size=nf, scale=fourier_scale)
            embed_dim = 2 * nf
        else:
            self.fourier = None
            embed_dim = nf
        self.temb = nn.Sequential(dense(embed_dim, temb_dim), act, dense(temb_dim, temb_dim))
        self.augment_dim = int(augment_dim)
        self.map_augment = nn.Linear(augment_dim, embed_dim, bias=False) if augment_dim else None
        if self.map_augment is not None:
            nn.init.xavier_uniform_(self.map_augment.weight)

        # input conv and downsampling path: (module, takes temb) in order
        self.conv_in = conv3x3(num_channels, nf)
        blocks: list[nn.Module] = []
        self._takes_temb: list[bool] = []
        in_ch = nf
        for level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[level]
                blocks.append(resblock(in_ch, out_ch))
                self._takes_temb.append(True)
                in_ch = out_ch
                if self.attn_at[level]:
                    blocks.append(AttnBlockpp(in_ch, skip_rescale=skip_rescale, init_scale=init_scale))
                    self._takes_temb.append(False)
            if level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    blocks.append(Downsample(in_ch=in_ch, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                    self._takes_temb.append(False)
                else:
                    blocks.append(resblock(in_ch, down=True))
                    self._takes_temb.append(True)
        # middle block
        blocks += [resblock(in_ch), AttnBlockpp(in_ch, skip_rescale=skip_rescale, init_scale=init_scale),
                   resblock(in_ch)]
        self._takes_temb += [True, False, True]
        self.blocks = nn.ModuleList(blocks)

        # head: GroupNorm, nonlinearity, global average pooling, linear
        self.norm_out = group_norm(in_ch)
        self.head = dense(in_ch, num_classes)
        self.feature_dim = in_ch

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """Shape of one sample: (C, H, W)."""
        return (self.num_channels, self.image_size, self.image_size)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B,) -> logits (B, num_classes); ``cond``: {"augment": (B, augment_dim)} labels of
        a network with ``augment_dim``, never class labels (the classifier predicts them)."""
        if isinstance(cond, Mapping) and cond.get("class_labels") is not None:
            raise ValueError(f"{type(self).__name__} predicts class labels and takes none: call it without "
                             "cond['class_labels']")
        expected = self.data_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        if tuple(c_noise.shape) != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},) (one per sample), got {tuple(c_noise.shape)}")
        augment = augment_labels(self, cond, x.shape[0])

        temb = self.fourier(c_noise) if self.fourier is not None else timestep_embedding(c_noise, self.nf)
        if augment is not None:
            temb = temb + self.map_augment(augment.to(self.map_augment.weight.dtype))
        first = self.temb[0]
        temb = self.temb(temb.to(first.weight.dtype))

        if not self.centered:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        for block, takes_temb in zip(self.blocks, self._takes_temb, strict=True):
            h = block(h, temb) if takes_temb else block(h)
        h = self.act(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


__all__ = ["NoiseClassifierNet"]
