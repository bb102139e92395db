"""Feature statistics of a DataModule's training images, computed once and cached on disk.

The cache key is ``datamodule.cache_key()`` (dataset and preprocessing) plus the feature network's identity.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lit_score.distributed import barrier, broadcast, rank_and_world
from lit_score.metrics.features import FeatureExtractor, to_uint8
from lit_score.metrics.frechet import FeatureStatistics


@dataclass
class ReferenceStatistics:
    mean: Tensor  # (D,) float64
    cov: Tensor  # (D, D) float64
    count: int
    key: str


def default_cache_dir() -> Path:
    """``$LIT_SCORE_CACHE/fid`` or ``~/.cache/lit-score/fid``."""
    return Path(os.environ.get("LIT_SCORE_CACHE", "~/.cache/lit-score")).expanduser() / "fid"


def reference_key(datamodule: L.LightningDataModule, features: FeatureExtractor) -> str:
    """What the reference statistics depend on: the data with their preprocessing, and the feature network."""
    if not callable(getattr(datamodule, "cache_key", None)):
        raise TypeError(f"{type(datamodule).__name__} has no cache_key() naming its dataset and preprocessing; "
                        "FID reference statistics need one to be cached")
    return f"{datamodule.cache_key()}__{features.identity}"


def data_centered(datamodule: L.LightningDataModule) -> bool:
    """Whether the DataModule's images are in [-1, 1] (else [0, 1])."""
    centered = getattr(datamodule, "centered", None)
    if not isinstance(centered, bool):
        raise TypeError(f"{type(datamodule).__name__} must say where its images lie with a boolean `centered` "
                        f"attribute (True: [-1, 1], False: [0, 1]); got {centered!r}")
    return centered


def cache_path(key: str, cache_dir: str | Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:100]
    return Path(cache_dir or default_cache_dir()) / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


@torch.no_grad()
def reference_statistics(datamodule: L.LightningDataModule, features: FeatureExtractor,
                         cache_dir: str | Path | None = None, batch_size: int = 250,
                         device: torch.device | str = "cpu") -> ReferenceStatistics:
    """Statistics of every training image, un-augmented (``datamodule.full_dataset()`` where the DataModule has it,
    else ``train_dataloader().dataset``), quantised to uint8.

    Loaded from the cache when there; otherwise computed (sharded over the processes of a distributed run, every
    rank must call this) and written by rank 0.
    """
    key = reference_key(datamodule, features)
    path = cache_path(key, cache_dir)
    if broadcast(path.is_file()):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] != key:
            raise ValueError(f"{path} holds statistics for {saved['key']!r}, not {key!r}; delete it")
        return ReferenceStatistics(saved["mean"], saved["cov"], int(saved["count"]), key)

    centered = data_centered(datamodule)
    full = getattr(datamodule, "full_dataset", None)
    dataset = full() if callable(full) else datamodule.train_dataloader().dataset
    rank, world = rank_and_world()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size)
    features = features.to(device).eval()
    stats = FeatureStatistics(features.num_features).to(device)
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        stats.update(features(to_uint8(images.to(device), centered)))
    mean, cov = (t.cpu() for t in stats.compute())
    count = int(stats.count)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"mean": mean, "cov": cov, "count": count, "key": key}, tmp)
        tmp.replace(path)
    barrier()
    return ReferenceStatistics(mean, cov, count, key)
