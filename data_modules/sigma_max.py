"""sigma_max for a VE SDE from the data: the largest pairwise Euclidean distance between training images
(Song & Ermon 2020, "Improved techniques for training score-based generative models", technique 1).

From the shell, on the data section of an experiment YAML (overrides as in ``lit-score``)::

    lit-score sigma-max --config experiments/imagefolder_example.yaml --data.init_args.path DIR
    lit-score sigma-max --data.class_path lit_score.data.ImageDataModule --data.init_args.path DIR

Distances are measured in the model's data space (after scaling to [0, 1], or [-1, 1] when centered), without
flips or dequantisation noise. ``--max_images`` (default 10000) bounds the O(N^2) search by a random subset
chosen by ``--seed``, which gives a lower bound; ``--max_images null`` uses every image.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lit_score.data.image import ImageDataModule


def max_pairwise_distance(x: Tensor, chunk_size: int = 1024) -> float:
    """max over i < j of ||x_i - x_j||_2 for the rows x_i of x (N, ...), N >= 2."""
    if len(x) < 2:
        raise ValueError(f"need at least 2 samples for a pairwise distance, got {len(x)}")
    flat = x.reshape(len(x), -1).float()
    sq = flat.square().sum(1)
    best, pair = -1.0, (0, 1)
    for start in range(0, len(flat), chunk_size):
        block = flat[start:start + chunk_size]
        d2 = sq[start:start + chunk_size, None] + sq[None, start:] - 2.0 * block @ flat[start:].T
        d2 = torch.triu(d2, diagonal=1)
        value, index = d2.flatten().max(0)
        if value.item() > best:
            best = value.item()
            row, col = divmod(index.item(), d2.shape[1])
            pair = (start + row, start + col)
    i, j = pair
    return (flat[i].double() - flat[j].double()).norm().item()


def _images(datamodule: L.LightningDataModule) -> Dataset:
    if isinstance(datamodule, ImageDataModule):
        return datamodule.full_dataset(augment=False)
    datamodule.setup("fit")
    return datamodule.train_dataloader().dataset


def collect_images(datamodule: L.LightningDataModule, max_images: int | None = 10_000, seed: int = 0,
                   batch_size: int = 256) -> tuple[Tensor, int | None]:
    """Up to ``max_images`` images of the training data (a random subset by ``seed``), and how many there are."""
    data = _images(datamodule)
    total = None if isinstance(data, IterableDataset) else len(data)
    if total is not None and max_images is not None and total > max_images:
        data = Subset(data, torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_images].tolist())
    workers = getattr(datamodule, "num_workers", 0)
    batches, count = [], 0
    for batch in DataLoader(data, batch_size=batch_size, num_workers=workers):
        batch = batch[0] if isinstance(batch, (list, tuple)) else batch
        batches.append(batch)
        count += len(batch)
        if max_images is not None and count >= max_images:
            break
    images = torch.cat(batches)
    return (images[:max_images] if max_images is not None else images), total


def estimate_sigma_max(datamodule: L.LightningDataModule, max_images: int | None = 10_000, seed: int = 0) -> float:
    """The largest pairwise distance between (up to ``max_images``) training images of ``datamodule``."""
    images, _ = collect_images(datamodule, max_images, seed)
    return max_pairwise_distance(images)
