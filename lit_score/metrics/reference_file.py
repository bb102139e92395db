"""FID reference statistics in the files other code bases publish, read and written:

- ``edm``: a ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D) in float64, as EDM's ``fid.py ref`` writes
  (pytorch-fid and torch-fidelity caches use the same two keys);
- ``score_sde``: a ``.npz`` with raw ``pool_3`` activations (N, D), as score_sde's ``cifar10_stats.npz``; its mean
  and unbiased covariance are taken here, and its first rows serve KID;
- a lit-score ``.pt`` cache entry (``lit_score.metrics.reference``).
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lit_score.metrics.frechet import FeatureStatistics
from lit_score.metrics.reference import ReferenceStatistics

ReferenceFormat = Literal["edm", "score_sde"]
FORMATS = ("edm", "score_sde")


def _file_key(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return f"file:{path.name}:{digest.hexdigest()[:16]}"


def _check(path: Path, mean: Tensor, cov: Tensor, num_features: int | None) -> None:
    d = mean.shape[0] if mean.dim() == 1 else None
    if d is None or cov.shape != (d, d):
        raise ValueError(f"{path}: mu must be a vector (D,) and sigma a matrix (D, D); got {tuple(mean.shape)} and "
                         f"{tuple(cov.shape)}")
    if num_features is not None and d != num_features:
        raise ValueError(f"{path} holds {d}-dimensional statistics but the feature network gives {num_features} "
                         f"(InceptionV3's pool3: 2048); use a reference made with the same network")
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise ValueError(f"{path} holds non-finite mu or sigma values")


def _from_activations(path: Path, pool: np.ndarray, keep_features: int) -> tuple[Tensor, Tensor, int, Tensor | None]:
    if pool.ndim == 4 and pool.shape[1:3] == (1, 1):
        pool = pool.reshape(pool.shape[0], -1)
    if pool.ndim != 2 or pool.shape[0] < 2:
        raise ValueError(f"{path}: pool_3 must hold activations (N >= 2, D), got shape {pool.shape}")
    stats = FeatureStatistics(pool.shape[1], sync_on_compute=False)
    for start in range(0, pool.shape[0], 5000):
        stats.update(torch.from_numpy(np.asarray(pool[start:start + 5000], dtype=np.float64)))
    mean, cov, count = stats.compute()
    kept = torch.from_numpy(np.array(pool[:keep_features], dtype=np.float32)) if keep_features else None
    return mean, cov, count, kept


def load_reference(path: str | Path, num_features: int | None = None, keep_features: int = 0) -> ReferenceStatistics:
    """Mean and covariance (float64) of the reference set stored at ``path`` (never unpickles objects), checked to
    be ``num_features``-dimensional when given; with raw activations, the first ``keep_features`` rows for KID."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    key = _file_key(path)
    if path.suffix == ".npz":
        try:
            data = np.load(path, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            raise ValueError(f"cannot read {path} as a .npz archive: {err}") from None
        with data:
            names = set(data.files)
            if {"mu", "sigma"} <= names:
                mean = torch.from_numpy(np.asarray(data["mu"], dtype=np.float64))
                cov = torch.from_numpy(np.asarray(data["sigma"], dtype=np.float64))
                count, kept = -1, None
                if "pool_3" in names:
                    _, _, count, kept = _from_activations(path, data["pool_3"], keep_features)
            elif "pool_3" in names:
                mean, cov, count, kept = _from_activations(path, data["pool_3"], keep_features)
            else:
                raise ValueError(f"{path} holds {sorted(names)}; expected 'mu' and 'sigma' (EDM's fid-refs) or "
                                 f"'pool_3' activations (score_sde's stats files)")
        _check(path, mean, cov, num_features)
        return ReferenceStatistics(mean, cov, count, key, kept)
    if path.suffix == ".pt":
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not {"mean", "cov"} <= set(saved):
            raise ValueError(f"{path} is not a lit-score reference statistics file (a dict with 'mean' and 'cov')")
        mean, cov = saved["mean"].double(), saved["cov"].double()
        _check(path, mean, cov, num_features)
        kept = saved.get("features")
        kept = kept[:keep_features] if keep_features and kept is not None else None
        return ReferenceStatistics(mean, cov, int(saved.get("count", -1)), str(saved.get("key", key)), kept)
    raise ValueError(f"reference statistics must be a .npz (EDM's mu/sigma or score_sde's pool_3) or a lit-score "
                     f".pt file, got {path}")


def save_reference(path: str | Path, mean: Tensor, cov: Tensor, reference_format: ReferenceFormat = "edm",
                   features: Tensor | None = None) -> Path:
    """Write statistics that EDM's ``fid.py calc --ref`` (``edm``: mu, sigma in float64) or score_sde's
    evaluation (``score_sde``: every feature vector as float32 ``pool_3``; needs ``features``) read."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference files are .npz archives; got {path}")
    if reference_format not in FORMATS:
        raise ValueError(f"reference_format must be one of {FORMATS}, got {reference_format!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if reference_format == "edm":
        np.savez(path, mu=mean.detach().cpu().double().numpy(), sigma=cov.detach().cpu().double().numpy())
    else:
        if features is None:
            raise ValueError("the score_sde format stores every feature vector (pool_3); none were given")
        np.savez_compressed(path, pool_3=features.detach().cpu().float().numpy())
    return path
