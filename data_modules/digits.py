"""scikit-learn's 8x8 handwritten digits, upsampled: the embedded dataset of the quickstart."""
from __future__ import annotations

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_score.errors import DataError
from lit_score.data.base import ScoreDataModule
from lit_score.data.plugins import DATASETS, DatasetPlugin, SourceOptions
from lit_score.callbacks.resume import ResumableDataLoader


class _TensorImages(Dataset):
    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def load_digits_images(image_size: int = 16) -> Tensor:
    """All 1797 digits as (N, 1, image_size, image_size) floats in [0, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0)


def load_digits_table(options: SourceOptions) -> datasets.Dataset:
    """The 1797 digits as an Arrow table of 8x8 grayscale PNGs (column ``image``); only the split 'train' exists."""
    from sklearn.datasets import load_digits

    if options.split != "train":
        raise DataError(f"the digits dataset has only the split 'train', not {options.split!r}")
    pixels = (load_digits().images * (255.0 / 16.0)).round().astype(np.uint8)
    features = datasets.Features({"image": datasets.Image()})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels]}, features=features)


DIGITS = DATASETS.register("digits")(DatasetPlugin(
    load=load_digits_table, image_size=16, num_channels=1, random_flip=False,
    description="scikit-learn's 8x8 handwritten digits (embedded), upsampled to 16x16"))


class DigitsDataModule(ScoreDataModule):
    """Grayscale digits at ``image_size``, in [0, 1] or, with ``centered``, in [-1, 1]; a seeded train/val split."""

    num_channels = 1

    def __init__(self, image_size: int = 16, batch_size: int = 64, val_fraction: float = 0.1, centered: bool = False,
                 seed: int = 0, num_workers: int = 0, num_samples: int = 64, sample_batch_size: int = 64,
                 first_seed: int = 0) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed)
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        self.image_size, self.batch_size, self.val_fraction = image_size, batch_size, val_fraction
        self.centered, self.seed, self.num_workers = centered, seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        images = load_digits_images(self.image_size)
        if self.centered:
            images = images * 2 - 1
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(images) * self.val_fraction))
        self.val_set, self.train_set = _TensorImages(images[order[:n_val]]), _TensorImages(images[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                   drop_last=True, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def cache_key(self) -> str:
        return f"digits-{self.image_size}px-gray"
