"""Samples of the 2-D toy densities of ``lit_score.diffusion.densities`` (batches (B, 2))."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_score.errors import DataError
from lit_score.data.base import ScoreDataModule
from lit_score.data_space import DataSpace
from lit_score.diffusion.densities import TOY_DENSITIES
from lit_score.callbacks.resume import ResumableDataLoader


class Toy2DDataModule(ScoreDataModule):
    """Samples of a named 2-D density (``TOY_DENSITIES``); num_channels = 2, image_size = 1, batches (B, 2).

    Data are not images: ``centered`` is None, and the prediction writer saves the raw float samples.
    """

    num_channels = 2
    image_size = 1
    centered = None

    @property
    def data_space(self) -> DataSpace:
        """Continuous 2-D vectors: no quantisation, so bits/dim without dequantisation or offset."""
        return DataSpace((2,), centered=False, num_levels=None)

    def __init__(self, density: str = "two_gaussians", num_train: int = 20000, num_val: int = 2000,
                 batch_size: int = 512, seed: int = 0, num_samples: int = 1000, sample_batch_size: int = 1000,
                 first_seed: int = 0, class_label: int | None = None) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed, class_label)
        if density not in TOY_DENSITIES:
            raise DataError(f"density must be one of {', '.join(TOY_DENSITIES)}, got {density!r}")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"{name} must be >= 1, got {value}")
        self.mixture = TOY_DENSITIES[density]()
        self.density, self.num_train, self.num_val, self.batch_size, self.seed = (
            density, num_train, num_val, batch_size, seed)
        self.check_class_label()  # unlabelled: a class_label is an error

    def setup(self, stage: str | None = None) -> None:
        data = self.mixture.sample(self.num_train + self.num_val, torch.Generator().manual_seed(self.seed))
        self.train_set, self.val_set = TensorDataset(data[: self.num_train]), TensorDataset(data[self.num_train:])

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                   drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
