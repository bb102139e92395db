"""Small image datasets held once as one uint8 tensor on the training device, augmented there.

``CachedImageDataModule`` decodes and resizes the training split once (``ImageTransform.pixels``: channels, crops,
resize), keeps it as an (N, C, H, W) uint8 tensor, caches that tensor on disk, and moves it to the device at the first
batch (CIFAR-10: 150 MB). The training DataLoader then yields only indices; ``on_after_batch_transfer`` gathers the
images on the device and flips, dequantises and scales them there, so no worker process decodes images during
training. Each image's flip and dequantisation noise are Philox draws keyed by (seed, image index, epoch), so they
do not depend on the batch, the number of processes or a resume.

Labelled data (see ``ImageDataModule``) are served as ``(x, y)``: the labels of the training split are kept beside
the pixels (on the device, and in the cache file, which is decoded again when its labels are not those of the table,
e.g. a cache written before the images were sorted into class folders).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_score.callbacks.resume import ResumableDataLoader
from lit_score.rng import seeded_normal

from .image import ArrowImages, ImageDataModule

FLIP_STEP, DEQUANTIZE_STEP = 0, 2**32  # Philox steps (+ epoch) of the flip and the dequantisation draws


def cache_dir() -> Path:
    """``$LIT_SCORE_CACHE/images`` or ``~/.cache/lit-score/images``."""
    return Path(os.environ.get("LIT_SCORE_CACHE", "~/.cache/lit-score")).expanduser() / "images"


def augment(pixels: Tensor, index: Tensor, epoch: int, seed: int, random_flip: bool, centered: bool,
            dequantize: bool) -> Tensor:
    """uint8 images (B, C, H, W) -> floats on their device: a horizontal flip with probability 1/2, then x / 255 or
    (x + u) / 256 with u ~ U[0, 1), then 2x - 1 if centered; the random draws keyed by (seed, index, epoch)."""
    keys = index.to(torch.long) + (int(seed) << 32)
    x = pixels.float()
    if random_flip:
        flip = seeded_normal(keys, (1,), step=FLIP_STEP + epoch, device=x.device)[:, 0] < 0
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if dequantize:
        u = torch.special.ndtr(seeded_normal(keys, tuple(x.shape[1:]), step=DEQUANTIZE_STEP + epoch, device=x.device))
        x = (x + u.clamp(max=1 - 2**-24)) / 256.0
    else:
        x = x / 255.0
    return x * 2.0 - 1.0 if centered else x


class IndexDataset(Dataset):
    """0 .. n - 1, batched as one tensor (the DataLoader gathers nothing else)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


def keep_batch(batch: Tensor) -> Tensor:
    """The batch as the DataLoader gathered it (``IndexDataset`` batches itself)."""
    return batch


class CachedImageDataModule(ImageDataModule):
    """``ImageDataModule`` whose training split is decoded once and served from a uint8 tensor on the device.

    Args (beside ImageDataModule's):
        max_cache_gb: refuse to cache a training split larger than this (uint8 bytes); use ImageDataModule then.
        cache: keep the decoded tensor in ``$LIT_SCORE_CACHE/images`` for the next run.
    Validation and test batches come from ImageDataModule's loaders, unchanged. Training batches are the augmented
    images, or ``(x, y)`` for labelled data.
    """

    def __init__(self, *args: Any, max_cache_gb: float = 4.0, cache: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.streaming:
            raise ValueError("CachedImageDataModule holds the whole training split in memory; streaming is for "
                             "datasets larger than that: use ImageDataModule with streaming: true")
        self.max_cache_gb, self.cache = max_cache_gb, cache
        self.pixels: Tensor | None = None  # (N, C, H, W) uint8 on the host
        self.train_labels: Tensor | None = None  # (N,) int64 on the host, for labelled data
        self._on_device: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.pixels is None:
            labels = self.train_set.labels
            self.train_labels = None if labels is None else torch.from_numpy(labels)
            self.pixels = self._load_or_decode(self.train_set)

    def _load_or_decode(self, train_set: ArrowImages) -> Tensor:
        """The training split as uint8 (N, C, H, W): from the cache file when it holds these images (their shape
        and, for labelled data, the same labels), else decoded (and cached). A file holds the pixels alone
        (unlabelled data, as files written before labels were read) or {"pixels", "labels"}."""
        n, c, s = len(train_set), self.num_channels, self.image_size
        gb = n * c * s * s / 1e9
        if gb > self.max_cache_gb:
            raise ValueError(f"the training split is {gb:.1f} GB as uint8, over max_cache_gb = {self.max_cache_gb}; "
                             "raise max_cache_gb or use lit_score.data.ImageDataModule")
        digest = hashlib.sha1(np.asarray(train_set.rows, dtype=np.int64).tobytes()).hexdigest()[:12]
        path = cache_dir() / f"{self.cache_key()}-train-{digest}.pt"
        labels = None if train_set.labels is None else torch.from_numpy(train_set.labels)
        if self.cache and path.is_file():
            saved = torch.load(path, weights_only=True)
            pixels, saved_labels = (saved.get("pixels"), saved.get("labels")) if isinstance(saved, dict) else \
                (saved, None)
            fits = isinstance(pixels, Tensor) and pixels.shape == (n, c, s, s) and pixels.dtype == torch.uint8
            if fits and (labels is None or (isinstance(saved_labels, Tensor) and torch.equal(saved_labels, labels))):
                return pixels
        decoded = ArrowImages(train_set.table, train_set.column, train_set.rows, self.transform(augment=False).pixels,
                              train_set.source)
        loader = DataLoader(decoded, batch_size=256, num_workers=self.num_workers, collate_fn=torch.stack)
        pixels = torch.cat(list(loader)) if n else torch.zeros(0, c, s, s, dtype=torch.uint8)
        if self.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(pixels if labels is None else {"pixels": pixels, "labels": labels}, tmp)
            os.replace(tmp, path)
        return pixels

    def train_dataloader(self) -> DataLoader:
        if self.pixels is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return ResumableDataLoader(IndexDataset(len(self.pixels)), batch_size=self.batch_size, shuffle=True,
                                   seed=self.seed, drop_last=True, collate_fn=keep_batch)

    def pixels_on(self, device: torch.device) -> Tensor:
        """The uint8 training images on ``device``, moved there once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.pixels.to(device)
        return self._on_device[key]

    def labels_on(self, device: torch.device) -> Tensor:
        """The int64 training labels on ``device``, moved there once."""
        key = f"labels:{device}"
        if key not in self._on_device:
            self._on_device[key] = self.train_labels.to(device)
        return self._on_device[key]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "_trainer", None)
        if not (isinstance(batch, Tensor) and batch.dtype == torch.long and batch.dim() == 1) or (
                trainer is not None and not trainer.training):
            return batch
        return self.serve(batch, trainer.current_epoch if trainer is not None else 0)

    def serve(self, index: Tensor, epoch: int = 0) -> Tensor | tuple[Tensor, Tensor]:
        """The augmented training images of ``index`` (a batch of the training DataLoader) on its device, with
        their labels, ``(x, y)``, for labelled data."""
        pixels = self.pixels_on(index.device)[index]
        x = augment(pixels, index, epoch, self.seed, bool(self.plugin.random_flip), self.centered, self.dequantize)
        return x if self.train_labels is None else (x, self.labels_on(index.device)[index])
