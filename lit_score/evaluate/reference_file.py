"""FID reference statistics read from a file: a ``.npz`` with ``mu`` and ``sigma`` (EDM, pytorch-fid, torch-fidelity
caches) or with raw ``pool_3`` activations (score_sde's ``cifar10_stats.npz``), or a lit-score ``.pt`` cache entry."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from lit_score.metrics.frechet import FeatureStatistics
from lit_score.metrics.reference import ReferenceStatistics


def load_reference(path: str | Path) -> ReferenceStatistics:
    """Mean and covariance (float64) of the reference set stored at ``path``; never unpickles objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    key = f"file:{path.name}:{digest}"
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if {"mu", "sigma"} <= names:
                mean = torch.from_numpy(data["mu"].astype(np.float64))
                cov = torch.from_numpy(data["sigma"].astype(np.float64))
                return ReferenceStatistics(mean, cov, -1, key)
            if "pool_3" in names:
                pool = torch.from_numpy(data["pool_3"].astype(np.float64)).flatten(1)
                stats = FeatureStatistics(pool.shape[1], sync_on_compute=False)
                stats.update(pool)
                mean, cov = stats.compute()
                return ReferenceStatistics(mean, cov, pool.shape[0], key)
        raise ValueError(f"{path} holds {sorted(names)}; expected 'mu' and 'sigma', or 'pool_3' activations")
    if path.suffix == ".pt":
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not {"mean", "cov"} <= set(saved):
            raise ValueError(f"{path} is not a lit-score reference statistics file (a dict with 'mean' and 'cov')")
        return ReferenceStatistics(saved["mean"].double(), saved["cov"].double(), int(saved.get("count", -1)),
                                   str(saved.get("key", key)))
    raise ValueError(f"reference statistics must be a .npz (mu, sigma or pool_3) or a lit-score .pt file, got {path}")
