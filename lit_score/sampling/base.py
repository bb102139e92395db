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


def seeded_normal(seeds: Sequence[int] | Tensor, shape: tuple[int, ...], step: int = 0,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise (B, *shape) where row i depends only on (seeds[i], step).

    The same seed gives the same image whatever the batch or the number of processes it is drawn in.
    """
    rows = []
    for seed in (seeds.tolist() if isinstance(seeds, Tensor) else seeds):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + step) % (2**63 - 1))
        rows.append(torch.randn(shape, generator=g, dtype=dtype))
    return torch.stack(rows).to(device)


class Sampler(abc.ABC):
    """Base class of samplers; register subclasses in ``SAMPLERS`` so YAMLs name them."""

    @abc.abstractmethod
    def sample(self, score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu") -> SampleResult:
        """Draw len(seeds) samples of per-image ``shape``."""
