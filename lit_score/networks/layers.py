"""Basic building blocks of the score networks: initialisers, 1x1/3x3 convolutions,
noise-level embeddings, the NIN (per-pixel dense) layer, self-attention and skip combination.

Parameter names (``W``/``b`` of :class:`NIN`, ``W`` of :class:`GaussianFourierProjection`,
``GroupNorm_0`` / ``NIN_0..NIN_3`` of :class:`AttnBlockpp`, ``Conv_0`` of :class:`Combine`)
follow the official score_sde code so that its checkpoints load by key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- initialisation
def _fans(shape: tuple[int, ...], in_axis: int = 1, out_axis: int = 0) -> tuple[float, float]:
    """Fan-in and fan-out of a weight of ``shape`` (receptive field = all other axes)."""
    receptive = math.prod(shape) / shape[in_axis] / shape[out_axis]
    return shape[in_axis] * receptive, shape[out_axis] * receptive


def variance_scaling_(
    tensor: Tensor, scale: float = 1.0, mode: str = "fan_avg", distribution: str = "uniform"
) -> Tensor:
    """Fill ``tensor`` in place with a variance-scaling init (JAX/TF ``variance_scaling``); returns it."""
    fan_in, fan_out = _fans(tuple(tensor.shape))
    denominators = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    if mode not in denominators:
        raise ValueError(f"unknown variance-scaling mode {mode!r}; expected one of {sorted(denominators)}")
    variance = scale / denominators[mode]
    with torch.no_grad():
        if distribution == "uniform":
            bound = math.sqrt(3.0 * variance)
            return tensor.uniform_(-bound, bound)
        if distribution == "normal":
            return tensor.normal_(0.0, math.sqrt(variance))
    raise ValueError(f"unknown variance-scaling distribution {distribution!r}; expected 'uniform' or 'normal'")


def default_init_(tensor: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM initialisation: variance scaling, fan_avg, uniform; ``scale=0`` means 1e-10 (a near-zero init)."""
    return variance_scaling_(tensor, 1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def conv3x3(
    in_ch: int, out_ch: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0, padding: int = 1
) -> nn.Conv2d:
    """3x3 convolution with the DDPM init (weight: variance scaling times ``init_scale``, bias: 0)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution with the DDPM init."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, padding=0, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def dense(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with the DDPM init (variance-scaling weight, zero bias)."""
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(channels // 4, 32) groups and eps 1e-6, as in NCSN++."""
    if channels < 4:
        raise ValueError(f"GroupNorm needs at least 4 channels (groups = channels // 4), got {channels}")
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def get_act(name: str) -> nn.Module:
    """Activation module by name: 'swish' (= 'silu'), 'elu', 'relu' or 'lrelu'."""
    name = name.lower()
    if name in ("swish", "silu"):
        return nn.SiLU()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    raise ValueError(f"unknown nonlinearity {name!r}; expected 'swish', 'elu', 'relu' or 'lrelu'")


# --------------------------------------------------------------------------- embeddings
class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W s), cos(2 pi W s)] of a scalar s, with fixed W ~ N(0, scale^2)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        # A frozen Parameter (not a buffer) so the state_dict key is "W" as in the official code.
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, s: Tensor) -> Tensor:
        """(B,) -> (B, 2 * embedding_size)."""
        dtype = torch.promote_types(torch.promote_types(s.dtype, self.W.dtype), torch.float32)
        proj = s.to(dtype)[:, None] * self.W.to(dtype)[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def timestep_embedding(timesteps: Tensor, embedding_dim: int, max_positions: int = 10000) -> Tensor:
    """Transformer-style sinusoidal embedding of (B,) timesteps -> (B, embedding_dim), as in DDPM."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    step = math.log(max_positions) / max(half - 1, 1)
    freqs = torch.exp(-step * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------- per-pixel layers
class NIN(nn.Module):
    """Network-in-network: a dense layer applied at every pixel, y[:, o] = sum_c x[:, c] W[c, o] + b[o].

    ``W`` has shape (in_dim, num_units) as in the official code (not the Conv2d layout).
    """

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim, H, W) -> (B, num_units, H, W)."""
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all pixels with a residual connection (DDPM attention block)."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0) -> None:
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)  # query
        self.NIN_1 = NIN(channels, channels)  # key
        self.NIN_2 = NIN(channels, channels)  # value
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)  # output projection
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.GroupNorm_0(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1)

        q, k, v = tokens(self.NIN_0(h)), tokens(self.NIN_1(h)), tokens(self.NIN_2(h))
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))  # scale 1/sqrt(C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        h = self.NIN_3(out)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class Combine(nn.Module):
    """Merge a (projected) input-pyramid tensor x into features y by sum or channel concatenation."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat") -> None:
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"unknown combine method {method!r}; expected 'cat' or 'sum'")
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x: (B, dim1, H, W), y: (B, dim2, H, W) -> (B, dim2 or 2*dim2, H, W)."""
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y

