"""Base DataModule: declares the data shape (and classes) and serves the seeds that ``lit-score predict`` samples
from."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from lit_score.data_space import DataSpace
from lit_score.errors import DataError

Classes = tuple[tuple[str, ...], tuple[int, ...] | None]  # (class names, training images per class or None)


def collate(samples: Sequence[Any]) -> Any:
    """``default_collate``, with (image, label) samples batched as a tuple ``(x, y)``, y int64 of shape (B,)."""
    batch = default_collate(samples)
    return tuple(batch) if isinstance(batch, list) else batch


class SeedDataset(Dataset):
    """Seeds first_seed, first_seed + 1, ...: one per image to sample. With a labelled ``space`` (num_classes > 0),
    (seed, label) pairs: label ``space.labels_for(seeds, class_label)``, all ``class_label`` when given, else drawn
    per seed with the training set's class frequencies (the same for any batch size or number of processes)."""

    def __init__(self, num_samples: int, first_seed: int = 0, space: DataSpace | None = None,
                 class_label: int | None = None) -> None:
        self.num_samples, self.first_seed = num_samples, first_seed
        self.space = space if space is not None and space.num_classes else None
        self.class_label = class_label

    def __len__(self) -> int:
        return self.num_samples

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        for i in indices:
            if not 0 <= i < self.num_samples:
                raise IndexError(i)
        seeds = torch.tensor([self.first_seed + i for i in indices], dtype=torch.long)
        if self.space is None:
            return list(seeds)
        return list(zip(seeds, self.space.labels_for(seeds, self.class_label)))

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]


class ScoreDataModule(L.LightningDataModule):
    """A DataModule whose batches are tensors (B, C, H, W) (or (B, D) for vector data), or, for labelled data,
    tuples ``(x, y)`` with y the (B,) int64 class labels 0 .. num_classes - 1.

    Subclasses set ``num_channels``, ``image_size`` and ``centered`` (data in [-1, 1] rather than [0, 1]), and
    labelled data return their class names and training counts from ``classes()``; the CLI passes them to the
    network, and ``data_space`` (``lit_score.data_space.DataSpace``, with the classes) to the model.
    ``predict_dataloader`` yields seeds for sampling: ``num_samples`` images from ``first_seed`` on; for labelled
    data ``(seeds, labels)``, every label ``class_label`` when given, else drawn per seed
    (``DataSpace.labels_for``). ``cache_key()`` names the dataset and its deterministic preprocessing.
    """

    num_channels: int
    image_size: int
    centered: bool = True

    @property
    def data_space(self) -> DataSpace:
        """Images (num_channels, image_size, image_size) of 256 levels in [0, 1], or [-1, 1] when centered, with
        the classes of ``classes()``."""
        return self.with_classes(DataSpace.image(self.num_channels, self.image_size, bool(self.centered)))

    def classes(self) -> Classes | None:
        """(class names, training images per class or None when unknown) of labelled data; None: unlabelled."""
        return None

    def with_classes(self, space: DataSpace) -> DataSpace:
        """``space`` with the classes of ``classes()``."""
        classes = self.classes()
        if classes is None:
            return space
        names, counts = classes
        return replace(space, num_classes=len(names), class_names=tuple(names),
                       class_counts=None if counts is None else tuple(counts))

    def __init__(self, num_samples: int = 64, sample_batch_size: int = 64, first_seed: int = 0,
                 class_label: int | None = None) -> None:
        super().__init__()
        if num_samples < 1:
            raise DataError(f"num_samples must be >= 1, got {num_samples}")
        if sample_batch_size < 1:
            raise DataError(f"sample_batch_size must be >= 1, got {sample_batch_size}")
        if class_label is not None and (isinstance(class_label, bool) or not isinstance(class_label, int)
                                        or class_label < 0):
            raise DataError(f"class_label must be a class index >= 0 (or null: labels drawn with the training "
                            f"set's class frequencies), got {class_label!r}")
        self.num_samples, self.sample_batch_size, self.first_seed = num_samples, sample_batch_size, first_seed
        self.class_label = class_label

    def check_class_label(self) -> None:
        """A one-line DataError when ``class_label`` is given but names no class of the data."""
        if self.class_label is None:
            return
        space = self.data_space
        if not space.num_classes:
            raise DataError(f"class_label {self.class_label} was given, but the data of {type(self).__name__} are "
                            "unlabelled (no classes): leave class_label out")
        if self.class_label >= space.num_classes:
            names = space.class_names or ()
            listed = f": {', '.join(names)}" if names and len(names) <= 12 else ""
            raise DataError(f"class_label must be in 0..{space.num_classes - 1} (the data have {space.num_classes} "
                            f"classes{listed}), got {self.class_label}")

    def cache_key(self) -> str:
        """A file-name-safe string naming the dataset and its deterministic preprocessing (resolution, crop,
        channels), e.g. for caching FID reference statistics; flips, scaling and dequantisation are excluded."""
        raise NotImplementedError(f"{type(self).__name__} does not define cache_key()")

    def predict_dataloader(self) -> DataLoader:
        """Batches of seeds (B,) int64, or ``(seeds, labels)`` for labelled data."""
        self.check_class_label()
        space = self.data_space
        return DataLoader(SeedDataset(self.num_samples, self.first_seed, space, self.class_label),
                          batch_size=self.sample_batch_size, collate_fn=collate)
