"""2-D toy densities (batches (B, 2)), all Gaussian mixtures so that their perturbed scores are exact."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_score.errors import DataError
from lit_score.data.base import ScoreDataModule
from lit_score.mixtures import GaussianMixture
from lit_score.resume import ResumableDataLoader
from lit_score.registry import Registry

TOY_DENSITIES: Registry[Callable[[], GaussianMixture]] = Registry("toy density")


def _on_curve(points: torch.Tensor, std: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(len(points)), points, torch.full((len(points),), std))


@TOY_DENSITIES.register("two_gaussians")
def two_gaussians() -> GaussianMixture:
    """The talk's mixture: weights 0.2 / 0.8 at (-2, -2) and (2, 2), std 0.6 (unequal weights Langevin misses)."""
    return GaussianMixture([0.2, 0.8], [[-2.0, -2.0], [2.0, 2.0]], [0.6, 0.6])


@TOY_DENSITIES.register("eight_gaussians")
def eight_gaussians() -> GaussianMixture:
    a = torch.arange(8) * 2 * math.pi / 8
    return _on_curve(3 * torch.stack([a.cos(), a.sin()], 1), 0.25)


@TOY_DENSITIES.register("rings")
def rings() -> GaussianMixture:
    """Two concentric rings of radii 1.5 and 3, each a chain of 48 small Gaussians."""
    a = torch.arange(48) * 2 * math.pi / 48
    circle = torch.stack([a.cos(), a.sin()], 1)
    return _on_curve(torch.cat([1.5 * circle, 3.0 * circle]), 0.12)


@TOY_DENSITIES.register("moons")
def moons() -> GaussianMixture:
    """Two interleaved half circles (scikit-learn's make_moons shape, scaled by 2), 32 Gaussians each."""
    a = torch.linspace(0, math.pi, 32)
    upper = torch.stack([a.cos(), a.sin()], 1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
    return _on_curve(2 * (torch.cat([upper, lower]) - torch.tensor([0.5, 0.25])), 0.1)


@TOY_DENSITIES.register("checkerboard")
def checkerboard() -> GaussianMixture:
    """The black squares of a 4 x 4 board on [-4, 4]^2, each filled by 4 x 4 Gaussians."""
    centres = []
    for i in range(4):
        for j in range(4):
            if (i + j) % 2 == 0:
                for u in range(4):
                    for v in range(4):
                        centres.append([-4 + 2 * i + 0.25 + 0.5 * u, -4 + 2 * j + 0.25 + 0.5 * v])
    return _on_curve(torch.tensor(centres), 0.2)


class Toy2DDataModule(ScoreDataModule):
    """Samples of a named 2-D density (``TOY_DENSITIES``); num_channels = 2, image_size = 1, batches (B, 2).

    Data are not images: ``centered`` is None, and the prediction writer saves the raw float samples.
    """

    num_channels = 2
    image_size = 1
    centered = None

    def __init__(self, density: str = "two_gaussians", num_train: int = 20000, num_val: int = 2000,
                 batch_size: int = 512, seed: int = 0, num_samples: int = 1000, sample_batch_size: int = 1000,
                 first_seed: int = 0) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed)
        self.mixture = TOY_DENSITIES[density]()
        if num_train < 1 or num_val < 1 or batch_size < 1:
            raise DataError(f"num_train, num_val and batch_size must be >= 1, got {num_train}, {num_val}, {batch_size}")
        self.density, self.num_train, self.num_val, self.batch_size, self.seed = (
            density, num_train, num_val, batch_size, seed)

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
