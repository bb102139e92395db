"""What every sampler is: draws images from a model's denoiser, each image's randomness from its own seed."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.sdes import SDE, bcast


@dataclass
class SampleResult:
    samples: Tensor  # (B, *shape)
    nfe: int  # network evaluations per image (the largest, where images differ)
    nfe_mean: float | None = None  # the mean over images, where images differ (adaptive solvers)


class Sampler(abc.ABC):
    """Base class of samplers; YAMLs choose a subclass by ``class_path``."""

    @abc.abstractmethod
    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu") -> SampleResult:
        """Draw len(seeds) samples of per-image ``shape`` from the model whose denoiser is ``D``."""

    def planned_nfe(self, sde: SDE) -> int | None:
        """Network evaluations per image ``sample`` will take under ``sde``; None when not known in advance."""
        return None


def time_vector(t: float | Tensor, x: Tensor) -> Tensor:
    """t as one value per sample of x, on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def denoise(D: Denoiser, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """E[x_0 | x_t] = D(x_t / s(t); sigma(t)), the last step of samplers that end at t > 0."""
    return D(x / bcast(sde.scale(t), x), sde.sigma(t))
