"""Base DataModule: declares the data shape and serves the seeds that ``lit-score predict`` samples from."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_score.data_space import DataSpace
from lit_score.errors import DataError


class SeedDataset(Dataset):
    """Seeds first_seed, first_seed + 1, ...: one per image to sample."""

    def __init__(self, num_samples: int, first_seed: int = 0) -> None:
        self.num_samples, self.first_seed = num_samples, first_seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return torch.tensor(self.first_seed + i, dtype=torch.long)


class ScoreDataModule(L.LightningDataModule):
    """A DataModule whose batches are tensors (B, C, H, W) (or (B, D) for vector data).

    Subclasses set ``num_channels``, ``image_size`` and ``centered`` (data in [-1, 1] rather than [0, 1]);
    the CLI passes them to the network, and ``data_space`` (``lit_score.data_space.DataSpace``) to the model.
    ``predict_dataloader`` yields seeds for sampling: ``num_samples`` images from ``first_seed`` on.
    ``cache_key()`` names the dataset and its deterministic preprocessing.
    """

    num_channels: int
    image_size: int
    centered: bool = True

    @property
    def data_space(self) -> DataSpace:
        """Images (num_channels, image_size, image_size) of 256 levels in [0, 1], or [-1, 1] when centered."""
        return DataSpace.image(self.num_channels, self.image_size, bool(self.centered))

    def __init__(self, num_samples: int = 64, sample_batch_size: int = 64, first_seed: int = 0) -> None:
        super().__init__()
        if num_samples < 1:
            raise DataError(f"num_samples must be >= 1, got {num_samples}")
        if sample_batch_size < 1:
            raise DataError(f"sample_batch_size must be >= 1, got {sample_batch_size}")
        self.num_samples, self.sample_batch_size, self.first_seed = num_samples, sample_batch_size, first_seed

    def cache_key(self) -> str:
        """A file-name-safe string naming the dataset and its deterministic preprocessing (resolution, crop,
        channels), e.g. for caching FID reference statistics; flips, scaling and dequantisation are excluded."""
        raise NotImplementedError(f"{type(self).__name__} does not define cache_key()")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(SeedDataset(self.num_samples, self.first_seed), batch_size=self.sample_batch_size)
