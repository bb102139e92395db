"""Feature statistics of a DataModule's training images, computed once and cached on disk.

The cache key is ``datamodule.cache_key()`` (dataset and preprocessing) plus the feature network's identity.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor
from torch.utils.data import default_collate

from lit_score.distributed import barrier, broadcast, rank_and_world
from lit_score.data_space import DataSpace, data_space_of
from lit_score.metrics.features import FeatureExtractor
from lit_score.metrics.frechet import ordered_statistics
from lit_score.progress import Progress

if TYPE_CHECKING:
    import lightning as L


@dataclass
class ReferenceStatistics:
    mean: Tensor  # (D,) float64
    cov: Tensor  # (D, D) float64
    count: int  # images over every process (-1: not known, e.g. a mu/sigma file)
    key: str
    features: Tensor | None = None  # (K, D) the first K images' features, for KID; None if none were kept


def default_cache_dir() -> Path:
    """``$LIT_SCORE_CACHE/fid`` or ``~/.cache/lit-score/fid``."""
    return Path(os.environ.get("LIT_SCORE_CACHE", "~/.cache/lit-score")).expanduser() / "fid"


def reference_key(datamodule: L.LightningDataModule, features: FeatureExtractor) -> str:
    """What the reference statistics depend on: the data with their preprocessing, and the feature network."""
    if not callable(getattr(datamodule, "cache_key", None)):
        raise TypeError(f"{type(datamodule).__name__} has no cache_key() naming its dataset and preprocessing; "
                        "FID reference statistics need one to be cached")
    return f"{datamodule.cache_key()}__{features.identity}"


def cache_path(key: str, cache_dir: str | Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:100]
    return Path(cache_dir or default_cache_dir()) / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


@torch.no_grad()
def reference_statistics(datamodule: L.LightningDataModule, features: FeatureExtractor,
                         cache_dir: str | Path | None = None, batch_size: int = 250,
                         device: torch.device | str = "cpu", keep_features: int = 0,
                         space: DataSpace | None = None,
                         interrupt: Callable[[], None] | None = None) -> ReferenceStatistics:
    """Statistics of every training image, un-augmented (``datamodule.full_dataset()`` where the DataModule has it,
    else ``train_dataloader().dataset``), quantised to uint8 from ``space`` (default: the DataModule's
    ``data_space``; the model's, when a model is there), with the features of the first ``keep_features`` images
    (dataset order) for KID.

    Loaded from the cache when there (and holding enough features); otherwise computed (sharded over the processes
    of a distributed run, every rank must call this; the count is the global one) and written by rank 0.
    ``interrupt`` (see ``Progress``) may end the computation after any batch.
    """
    if keep_features < 0:
        raise ValueError(f"keep_features must be >= 0, got {keep_features}")
    key = reference_key(datamodule, features)
    path = cache_path(key, cache_dir)
    if broadcast(path.is_file()):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] != key:
            raise ValueError(f"{path} holds statistics for {saved['key']!r}, not {key!r}; delete it")
        kept = saved.get("features")
        enough = kept is not None and kept.shape[0] >= min(keep_features, int(saved["count"]))
        if keep_features == 0 or broadcast(enough):
            kept = kept[:keep_features] if keep_features and kept is not None else None
            return ReferenceStatistics(saved["mean"], saved["cov"], int(saved["count"]), key, kept)

    space = space if space is not None else data_space_of(datamodule)
    full = getattr(datamodule, "full_dataset", None)
    dataset = full() if callable(full) else datamodule.train_dataloader().dataset
    features = features.to(device).eval()
    num_chunks = -(-len(dataset) // batch_size)
    rank, world = rank_and_world()
    mine = sum(min(batch_size, len(dataset) - k * batch_size) for k in range(rank, num_chunks, world))
    progress = Progress(f"FID reference statistics of {len(dataset)} training images", mine, interrupt=interrupt)

    def features_of(k: int) -> Tensor:
        rows = range(k * batch_size, min((k + 1) * batch_size, len(dataset)))
        images = default_collate([dataset[i] for i in rows])  # no DataLoader: its iterator draws a global seed
        images = images[0] if isinstance(images, (list, tuple)) else images
        out = features(space.to_uint8(images.to(device)))
        progress.advance(len(rows))
        return out

    kept: list[Tensor] = []

    def keep(k: int, f: Tensor) -> None:
        if k * batch_size < keep_features:
            kept.append(f[:keep_features - k * batch_size])

    with progress:
        stats = ordered_statistics(num_chunks, features_of, features.num_features, device, keep)
    mean, cov, count = stats.compute()
    mean, cov = mean.cpu(), cov.cpu()
    first = torch.cat(kept) if kept else None
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"mean": mean, "cov": cov, "count": count, "key": key, "features": first}, tmp)
        tmp.replace(path)
    barrier()
    return ReferenceStatistics(mean, cov, count, key, first)
