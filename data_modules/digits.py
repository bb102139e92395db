"""scikit-learn's 8x8 handwritten digits, upsampled: the embedded dataset of the quickstart, labelled 0 .. 9."""
from __future__ import annotations

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_score.errors import DataError
from lit_score.data.base import Classes, ScoreDataModule, collate
from lit_score.data.plugins import DATASETS, DatasetPlugin, SourceOptions
from lit_score.callbacks.resume import ResumableDataLoader


DIGIT_NAMES = tuple(str(d) for d in range(10))


class _TensorImages(Dataset):
    """Images, or (image, label) pairs when ``labels`` are given."""

    def __init__(self, images: Tensor, labels: Tensor | None = None) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


def load_digits_labels() -> Tensor:
    """The digit (0 .. 9) of each of the 1797 images, (N,) int64, in the order of ``load_digits_images``."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().target).long()


def load_digits_images(image_size: int = 16) -> Tensor:
    """All 1797 digits as (N, 1, image_size, image_size) floats in [0, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0)


def load_digits_table(options: SourceOptions) -> datasets.Dataset:
    """The 1797 digits as an Arrow table of 8x8 grayscale PNGs (column ``image``) and their digits (column ``label``,
    a ClassLabel with names "0" .. "9"); only the split 'train' exists."""
    from sklearn.datasets import load_digits

    if options.split != "train":
        raise DataError(f"the digits dataset has only the split 'train', not {options.split!r}")
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_NAMES))})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels],
                                       "label": digits.target.astype(np.int64).tolist()}, features=features)


DIGITS = DATASETS.register("digits")(DatasetPlugin(
    load=load_digits_table, image_size=16, num_channels=1, random_flip=False,
    description="scikit-learn's 8x8 handwritten digits (embedded), upsampled to 16x16"))


class DigitsDataModule(ScoreDataModule):
    """Grayscale digits at ``image_size``, in [0, 1] or, with ``centered``, in [-1, 1]; a seeded train/val split.

    Batches are ``(x, y)``, y the digits (B,) int64 (the data space's classes "0" .. "9", counted on the training
    split); with ``labels: false``, x alone. ``class_label``: the digit every predicted sample is drawn for.
    """

    num_channels = 1

    def __init__(self, image_size: int = 16, batch_size: int = 64, val_fraction: float = 0.1, centered: bool = False,
                 seed: int = 0, num_workers: int = 0, num_samples: int = 64, sample_batch_size: int = 64,
                 first_seed: int = 0, class_label: int | None = None, labels: bool = True) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed, class_label)
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
        self.labels = bool(labels)
        self._classes: Classes | None = None
        self.check_class_label()

    def split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """(validation, training) indices into the ``n`` digits: a permutation seeded by ``seed``."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(n * self.val_fraction))
        return order[:n_val], order[n_val:]

    def classes(self) -> Classes | None:
        """The digits "0" .. "9" and how many training images show each; None with ``labels: false``."""
        if not self.labels:
            return None
        if self._classes is None:
            targets = load_digits_labels()
            _, train = self.split_indices(len(targets))
            counts = torch.bincount(targets[train], minlength=len(DIGIT_NAMES))
            self._classes = DIGIT_NAMES, tuple(int(c) for c in counts)
        return self._classes

    def setup(self, stage: str | None = None) -> None:
        images = load_digits_images(self.image_size)
        if self.centered:
            images = images * 2 - 1
        labels = load_digits_labels() if self.labels else None
        val, train = self.split_indices(len(images))
        self.val_set = _TensorImages(images[val], None if labels is None else labels[val])
        self.train_set = _TensorImages(images[train], None if labels is None else labels[train])

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                   drop_last=True, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def cache_key(self) -> str:
        return f"digits-{self.image_size}px-gray"
