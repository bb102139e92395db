"""Writes what ``lit-score predict`` samples: gathered from every process, one image per seed, ordered by seed."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor


def to_uint8(x: Tensor, centered: bool) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] (centered) or [0, 1] to uint8 NHWC, rounding to the nearest of 256 levels."""
    x01 = (x.float() + 1) / 2 if centered else x.float()
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
    network evaluations per image the sampler ran, the largest over all batches and processes) after predict.

    Predictions from all processes are gathered, de-duplicated by seed (DDP pads the last batch with repeats)
    and sorted by seed; rank 0 writes. Vector data (B, D), e.g. the 2-D toys, are saved as float32 with a
    scatter plot instead. Does nothing during fit.

    Args:
        output_dir: where to write (default: the trainer's log_dir, i.e. the run directory).
        centered: data in [-1, 1] rather than [0, 1]; None reads the DataModule's ``centered`` attribute.
        filename: stem of the two files.
    """

    def __init__(self, output_dir: str | None = None, centered: bool | None = None, filename: str = "samples") -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.centered, self.filename = output_dir, centered, filename
        self._seeds: list[Tensor] = []
        self._samples: list[Tensor] = []
        self._nfe = 0

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seeds, self._samples, self._nfe = [], [], 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if not isinstance(prediction, dict) or "seeds" not in prediction or "samples" not in prediction:
            raise TypeError("PredictionWriter needs predict_step to return a dict with 'seeds' and 'samples'")
        self._seeds.append(prediction["seeds"].detach().cpu().long().reshape(-1))
        self._samples.append(prediction["samples"].detach().cpu())
        self._nfe = max(self._nfe, int(prediction.get("nfe", 0)))

    def _is_centered(self, trainer: L.Trainer) -> bool | None:
        if self.centered is not None:
            return self.centered
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "centered"):
            raise ValueError("PredictionWriter cannot tell the data space: give it centered=true/false "
                             "or use a DataModule with a 'centered' attribute")
        return datamodule.centered

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective call
        local = (torch.cat(self._seeds), torch.cat(self._samples), self._nfe) if self._seeds else None
        parts = [local]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, local)
        if trainer.global_rank != 0:
            return
        by_seed: dict[int, Tensor] = {}
        for part in parts:
            if part is not None:
                for seed, sample in zip(part[0].tolist(), part[1]):
                    by_seed.setdefault(seed, sample)
        if not by_seed:
            return
        self._nfe = max(part[2] for part in parts if part is not None)  # the most any image took
        seeds = sorted(by_seed)
        samples = torch.stack([by_seed[s] for s in seeds])
        out.mkdir(parents=True, exist_ok=True)
        if samples.dim() == 4:
            images = to_uint8(samples, bool(self._is_centered(trainer)))
            np.savez(out / f"{self.filename}.npz", samples=images, seeds=np.asarray(seeds), nfe=self._nfe)
            from PIL import Image

            grid = image_grid(images)
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out / f"{self.filename}.png")
        else:
            flat = samples.reshape(len(seeds), -1).float().numpy()
            np.savez(out / f"{self.filename}.npz", samples=flat, seeds=np.asarray(seeds), nfe=self._nfe)
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 5))
            ax.scatter(flat[:, 0], flat[:, 1 if flat.shape[1] > 1 else 0], s=2, alpha=0.5)
            ax.set_title(f"{len(seeds)} samples, NFE {self._nfe}")
            fig.savefig(out / f"{self.filename}.png", dpi=100)
            plt.close(fig)
