"""Writes what ``lit-score predict`` samples: uint8 images gathered from every process to rank 0, one per seed,
ordered by seed."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lit_score.distributed import gather_to_zero


def image_grid(images: np.ndarray, padding: int = 2) -> np.ndarray:
    """uint8 NHWC images tiled in a near-square grid (H', W', C) with black padding."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


class PredictionWriter(BasePredictionWriter):
    """Saves ``samples.png`` (a grid) and ``samples.npz`` (``samples``: uint8 NHWC, ``seeds``, ``nfe``: the
    network evaluations per image the sampler ran, the largest over all batches and processes) after predict;
    for a class-conditional model also ``labels``, and for a conditional or guided one ``network_evaluations``
    (network passes per image, guides included: guidance takes up to two per nfe).

    Each process quantises its images to uint8 in the model's data space as they come (``pl_module.data_space``)
    and keeps only those; at the end they are gathered to rank 0 alone, which de-duplicates them by seed (DDP pads
    the last batch with repeats), sorts them by seed and writes. Vector data (B, D), e.g. the 2-D toys, are saved
    as float32 with a scatter plot instead. Does nothing during fit.

    ``written`` lists the files of the last predict (rank 0).

    Args:
        output_dir: where to write (default: the trainer's log_dir: with ``lit-score predict``, the new output folder
            of that launch, never the training run's folder).
        filename: stem of the two files.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "samples") -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.filename = output_dir, filename
        self._seeds: list[Tensor] = []
        self._samples: list[Tensor] = []
        self._nfe = 0
        self._labels: list[Tensor] = []
        self._evaluations = 0
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seeds, self._samples, self._nfe, self.written = [], [], 0, []
        self._labels, self._evaluations = [], 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if not isinstance(prediction, dict) or "seeds" not in prediction or "samples" not in prediction:
            raise TypeError("PredictionWriter needs predict_step to return a dict with 'seeds' and 'samples'")
        samples = prediction["samples"].detach()
        space = pl_module.data_space
        self._seeds.append(prediction["seeds"].detach().cpu().long().reshape(-1))
        self._samples.append(space.to_uint8(samples).cpu() if space.is_image else samples.float().cpu())
        self._nfe = max(self._nfe, int(prediction.get("nfe", 0)))
        if prediction.get("labels") is not None:
            self._labels.append(prediction["labels"].detach().cpu().long().reshape(-1))
        self._evaluations = max(self._evaluations, int(prediction.get("network_evaluations") or 0))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective call
        labels = torch.cat(self._labels) if self._labels else None
        local = (torch.cat(self._seeds), torch.cat(self._samples), self._nfe, labels, self._evaluations) \
            if self._seeds else None
        self._seeds, self._samples, self._labels = [], [], []
        parts = gather_to_zero(local)
        if parts is None:
            return
        by_seed: dict[int, Tensor] = {}
        label_of: dict[int, int] = {}
        for part in parts:
            if part is not None:
                for seed, sample in zip(part[0].tolist(), part[1]):
                    by_seed.setdefault(seed, sample)
                if part[3] is not None:
                    for seed, label in zip(part[0].tolist(), part[3].tolist()):
                        label_of.setdefault(seed, label)
        if not by_seed:
            return
        self._nfe = max(part[2] for part in parts if part is not None)  # the most any image took
        seeds = sorted(by_seed)
        samples = torch.stack([by_seed[s] for s in seeds])
        extra = {}
        if label_of:
            extra["labels"] = np.asarray([label_of[s] for s in seeds], dtype=np.int64)
        evaluations = max(part[4] for part in parts if part is not None)
        if evaluations:
            extra["network_evaluations"] = evaluations
        out.mkdir(parents=True, exist_ok=True)
        if samples.dtype == torch.uint8:
            images = samples.permute(0, 2, 3, 1).numpy()
            np.savez(out / f"{self.filename}.npz", samples=images, seeds=np.asarray(seeds), nfe=self._nfe, **extra)
            from PIL import Image

            grid = image_grid(images)
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out / f"{self.filename}.png")
            self.written = [out / f"{self.filename}.png", out / f"{self.filename}.npz"]
        else:
            flat = samples.reshape(len(seeds), -1).numpy()
            np.savez(out / f"{self.filename}.npz", samples=flat, seeds=np.asarray(seeds), nfe=self._nfe, **extra)
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 5))
            ax.scatter(flat[:, 0], flat[:, 1 if flat.shape[1] > 1 else 0], s=2, alpha=0.5)
            ax.set_title(f"{len(seeds)} samples, NFE {self._nfe}")
            fig.savefig(out / f"{self.filename}.png", dpi=100)
            plt.close(fig)
            self.written = [out / f"{self.filename}.png", out / f"{self.filename}.npz"]
