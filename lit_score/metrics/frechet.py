"""Frechet distance between Gaussians fitted to features (Heusel et al. 2017), with float64 statistics."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_score.distributed import rank_and_world
from lit_score.progress import Interrupted, gather_stops


def sample_count(num_samples: int) -> str:
    """How a metric names its number of samples: ``50k`` for 50000, ``300`` for 300."""
    return f"{num_samples // 1000}k" if num_samples % 1000 == 0 else str(num_samples)


def metric_tag(metric: str, num_samples: int, prefix: str = "val") -> str:
    """``val/fid@50k``: the metric with its sample count, so that FID@10k is never mistaken for a 50k figure."""
    return f"{prefix}/{metric}@{sample_count(num_samples)}"


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    tr((sigma1 sigma2)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    sigma1^(1/2) sigma2 sigma1^(1/2), which has the same spectrum as sigma1 sigma2.
    """
    if mu1.shape != mu2.shape or mu1.dim() != 1:
        raise ValueError(f"means must be vectors of one length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}, got {tuple(sigma1.shape)} and {tuple(sigma2.shape)}")
    mu1, sigma1, mu2, sigma2 = (t.detach().to("cpu", torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def _psd_sqrt(sigma: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


class Moments(NamedTuple):
    mean: Tensor  # (D,) float64
    cov: Tensor  # (D, D) float64, unbiased
    count: int  # feature vectors over every process


class FeatureStatistics(Metric):
    """Mean and (unbiased) covariance of features (B, D), accumulated as float64 sums.

    Memory is constant in the number of features: only n, sum x and sum x x^T are kept. The sums add across
    processes on ``compute``, so the result does not depend on how the features are sharded; ``compute`` returns
    the global count with them (``self.count`` is this process's own again after it).
    """

    full_state_update = False

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (B, {self.num_features}), got {tuple(features.shape)}")
        f = features.detach().to(torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def compute(self) -> Moments:
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {int(n)}")
        mean = self.total / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return Moments(mean, cov, int(n))


def ordered_statistics(num_chunks: int, features_of: Callable[[int], Tensor], num_features: int,
                       device: torch.device | str = "cpu",
                       on_chunk: Callable[[int, Tensor], None] | None = None) -> FeatureStatistics:
    """Float64 sums of the features of chunks 0, ..., num_chunks - 1, the same bits for any number of processes.

    Chunk k is embedded by rank k % world (``features_of(k)``, the same computation whatever the world size); each
    round's features are gathered and every rank adds them in chunk order, so the sums see one order everywhere.
    Memory: one round of features. ``on_chunk(k, features)`` sees every chunk, in order, on every rank. A
    ``features_of`` interrupted by a stop request (``Interrupted``) stops every rank at the end of that round.
    """
    rank, world = rank_and_world()
    stats = FeatureStatistics(num_features, sync_on_compute=False).to(device)
    for first in range(0, num_chunks, world):
        k = first + rank
        local, stopped = None, None
        try:
            local = features_of(k).detach().float().cpu() if k < num_chunks else None
        except Interrupted as stop:
            stopped = stop
        for j, part in enumerate(gather_stops(local, stopped)):
            if part is not None:
                stats.update(part.to(device))
                if on_chunk is not None:
                    on_chunk(first + j, part)
    return stats
