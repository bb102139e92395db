"""Test-set bits/dim of ``lit-score test`` (``ScoreModel``'s test hooks): every image's value from
``Likelihood.bits_per_dim``, as ``lit-score-eval`` measures it, gathered by test-set index and logged as test/bpd."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler, SequentialSampler

from lit_score.distributed import gather_to_all
from lit_score.progress import Progress

if TYPE_CHECKING:
    import lightning as L

    from lit_score.runtime.module import ScoreModel


def _test_loader(trainer: "L.Trainer"):
    loaders = trainer.test_dataloaders
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


class BitsPerDimRun:
    """One test run's bits/dim (Song et al. 2021, appendix D.2): image i of the test set is dequantised and probed
    with seed i, so every image's value is the same for any number of processes and batch size; ``finish`` logs
    their mean over the test set (each image once) as test/bpd, with the largest NFE and the number of images."""

    def __init__(self) -> None:
        self.batches: list[list[int]] | None = None
        self.values: list[tuple[int, float, int]] = []  # (test-set index, bits/dim, NFE) of this process's images
        self.progress: Progress | None = None

    def step(self, model: "ScoreModel", x: Tensor, batch_idx: int, labels: Tensor | None = None) -> None:
        """The bits/dim of this process's test batch ``batch_idx``, images x (of p(x | labels) when given)."""
        indices = self.indices(model.trainer, batch_idx, x.shape[0])
        if self.progress is None:
            self.progress = self.new_progress(model.trainer, x.shape[0])
        score_fn = model.guided_denoiser(labels).score
        bpd, nfe = model.likelihood.bits_per_dim(score_fn, model.sde, x, indices, model.data_space,
                                                 self.progress)
        self.values += [(i, float(b), int(nfe)) for i, b in zip(indices, bpd.double().tolist())]

    def finish(self, model: "ScoreModel") -> Tensor | None:
        """Log the mean bits/dim over every test image once (DDP's padding repeats dropped), summed in image order,
        on every rank; returns the per-image values in index order (None without test images)."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        by_index: dict[int, tuple[float, int]] = {}
        for part in gather_to_all(self.values):
            for index, bpd, nfe in part:
                by_index.setdefault(index, (bpd, nfe))
        if not by_index:
            return None
        values = torch.tensor([by_index[i][0] for i in sorted(by_index)], dtype=torch.float64)
        for key, value in (("bpd", values.mean()), ("nfe", max(nfe for _, nfe in by_index.values())),
                           ("num_images", len(values))):  # the same on every rank: max keeps it exact
            model.log(f"test/{key}", float(value), sync_dist=True, reduce_fx="max")
        return values

    def indices(self, trainer: "L.Trainer", batch_idx: int, size: int) -> list[int]:
        """The test-set indices of this process's batch ``batch_idx``, from the test dataloader's batch sampler."""
        if self.batches is None:
            loader = _test_loader(trainer)
            sampler = getattr(loader, "sampler", None)
            ordered = isinstance(sampler, SequentialSampler) or (
                isinstance(sampler, DistributedSampler) and not sampler.shuffle)
            if not ordered or getattr(loader, "batch_sampler", None) is None:
                raise ValueError("test-set bits/dim seed each image by its index, so the test dataloader must serve a "
                                 "map-style dataset in order (no shuffle, no IterableDataset); got sampler "
                                 f"{type(sampler).__name__}")
            self.batches = [list(b) for b in loader.batch_sampler]
        indices = self.batches[batch_idx]
        if len(indices) != size:
            raise RuntimeError(f"test batch {batch_idx} has {size} images but its sampler gave {len(indices)} indices")
        return [int(i) for i in indices]

    @staticmethod
    def new_progress(trainer: "L.Trainer", batch_size: int) -> Progress:
        """The bits/dim bar of this test run: images of this process, NFE of the probability-flow ODE per image."""
        total = sum(trainer.num_test_batches) * batch_size
        dataset = getattr(_test_loader(trainer), "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            total = min(total, -(-len(dataset) // trainer.world_size))
        return Progress("test/bpd", total, enabled=trainer.is_global_zero and trainer.progress_bar_callback is not None)
