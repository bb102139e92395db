"""What every sampler is: draws images from a score model, each image's randomness from its own seed."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lit_score.registry import Registry
from lit_score.sdes import SDE, ScoreFn

SAMPLERS: Registry[type["Sampler"]] = Registry("sampler")


@dataclass
class SampleResult:
    samples: Tensor  # (B, *shape)
    nfe: int  # score-network evaluations per image


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    return v - 2**64 if v >= 2**63 else v


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """The SplitMix64 generator's output for state z (Steele, Lea & Flood 2014), in wrapping int64 arithmetic."""
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def _unit_uniform(z: Tensor) -> Tensor:
    """The top 53 bits of z as a float64 in (0, 1)."""
    return (_srl(z, 11).double() + 0.5) * 2.0**-53


def seeded_normal(seeds: Sequence[int] | Tensor, shape: tuple[int, ...], step: int = 0,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise (B, *shape) where row i depends only on (seeds[i], step).

    The same seed gives the same image whatever the batch, the device or the number of processes it is drawn in:
    element j of row i is a counter-based draw, Box-Muller on two SplitMix64 hashes of (seed, step, j).
    """
    seeds = torch.as_tensor(seeds.tolist() if isinstance(seeds, Tensor) else list(seeds), dtype=torch.long)
    seeds = seeds.to(device if device is not None else "cpu")
    numel = 1
    for n in shape:
        numel *= n
    key = splitmix64(splitmix64(seeds) + step)[:, None]
    j = torch.arange(numel, device=seeds.device, dtype=torch.long)[None, :]
    u1 = _unit_uniform(splitmix64(key + 2 * j))
    u2 = _unit_uniform(splitmix64(key + 2 * j + 1))
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)
    return z.reshape(len(seeds), *shape).to(dtype)


class Sampler(abc.ABC):
    """Base class of samplers; register subclasses in ``SAMPLERS`` so YAMLs name them."""

    @abc.abstractmethod
    def sample(self, score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu") -> SampleResult:
        """Draw len(seeds) samples of per-image ``shape``."""


class SeededNoise:
    """Successive draws of per-image seeded normal noise: draw k of image i depends only on (seeds[i], k)."""

    def __init__(self, seeds: Sequence[int] | Tensor, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        if not self.seeds:
            raise ValueError("need at least one seed to sample")
        self.shape, self.device, self.dtype, self.step = tuple(shape), device, dtype, 0

    def __call__(self) -> Tensor:
        z = seeded_normal(self.seeds, self.shape, self.step, self.device, self.dtype)
        self.step += 1
        return z


class CountingScore:
    """Wraps a score function and counts its evaluations (NFE)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


def time_vector(t: float | Tensor, x: Tensor) -> Tensor:
    """t as one value per sample of x, on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def seeded_prior(sde: SDE, seeds: Sequence[int] | Tensor, shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> Tensor:
    """One sample of p_T per seed, each from its own generator (distinct from every seeded_normal draw)."""
    rows = []
    for seed in (seeds.tolist() if isinstance(seeds, Tensor) else seeds):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 2**40) % (2**63 - 1))
        rows.append(sde.prior_sampling((1, *shape), generator=g)[0])
    return torch.stack(rows).to(device)
