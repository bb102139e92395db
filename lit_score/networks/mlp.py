"""A small noise-conditional MLP score network for low-dimensional (toy, e.g. 2-D) data."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .cond import ClassEmbedding, Cond, augment_labels, check_class_options, class_labels
from .layers import GaussianFourierProjection, timestep_embedding


class ScoreMLP(nn.Module):
    """SiLU MLP F(x, c_noise) for vector data x of shape (B, D), D = ``num_channels``.

    The noise label c_noise (the preconditioning's) is embedded with Gaussian Fourier features ('fourier') or
    sinusoidal positions ('positional'); the embedding passes through a small MLP and is added to every hidden
    layer's pre-activation.
    ``image_size`` and ``centered`` are ignored: vector data is used as given (they are accepted so every
    network takes the DataModule's ``num_channels``, ``image_size`` and ``centered``).
    ``num_classes`` > 0 adds a class embedding (``cond["class_labels"]``) to the noise embedding, dropped to the
    null class with probability ``label_dropout`` in training.
    """

    def __init__(
        self,
        num_channels: int = 2,
        image_size: int = 1,
        hidden: int = 128,
        depth: int = 3,
        fourier_scale: float = 16.0,
        embedding_type: str = "fourier",
        centered: bool = True,
        num_classes: int = 0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_class_options(num_classes, label_dropout)
        embedding_type = embedding_type.lower()
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if num_channels < 1 or hidden < 2 or depth < 1:
            raise ValueError(f"need num_channels >= 1, hidden >= 2, depth >= 1; got {num_channels}, {hidden}, {depth}")
        self.num_channels, self.hidden, self.embedding_type = num_channels, hidden, embedding_type
        emb_dim = 2 * (hidden // 2)
        self.fourier = GaussianFourierProjection(hidden // 2, fourier_scale) if embedding_type == "fourier" else None
        self.emb_dim = emb_dim
        self.temb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(num_channels, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.temb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, num_channels)
        self.act = nn.SiLU()
        self.num_classes = int(num_classes)
        self.map_label = ClassEmbedding(num_classes, emb_dim, label_dropout) if num_classes else None

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (D,)."""
        return (self.num_channels,)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        """x (B, D), c_noise (B,) -> (B, D); takes no augmentation labels; ``cond["class_labels"]`` (B,) when
        class-conditional (-1: the null class)."""
        augment_labels(self, cond, x.shape[0])
        labels = class_labels(self, cond, x.shape[0])
        if x.ndim != 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"ScoreMLP expects input of shape (B, {self.num_channels}), got {tuple(x.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        if tuple(c_noise.shape) != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
        if self.fourier is not None:
            emb = self.fourier(c_noise)
        else:
            emb = timestep_embedding(c_noise, self.emb_dim)
        if labels is not None:
            emb = emb + self.map_label(labels).to(emb.dtype)
        temb = self.act(self.temb(emb.to(self.inp.weight.dtype)))
        h = self.inp(x)
        for layer, proj in zip(self.layers, self.temb_proj, strict=True):
            h = self.act(layer(h) + proj(temb))
        return self.out(h)
