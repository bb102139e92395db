"""Periodic sample grids: fixed per-image seeds, EMA weights, drawn by all ranks, written by rank 0."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from torch import Tensor

from lit_score.callbacks.preemption import stop_check, tensorboard_purge_step
from lit_score.progress import Interrupted, Progress, gather_stops
from lit_score.sampling.base import Sampler


def batched(seeds: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(seeds), batch_size):
        yield list(seeds[i:i + batch_size])


@torch.no_grad()
def draw(pl_module: L.LightningModule, seeds: Sequence[int], sampler: Sampler | None, batch_size: int,
         progress: Progress | None = None, labels: Sequence[int] | None = None) -> Tensor:
    """Samples for ``seeds`` in batches, in eval mode (the module's train/eval mode is restored after), counted
    into ``progress`` if given; a class-conditional model draws image i of class ``labels[i]`` (default: class-
    balanced, ``balanced_labels``)."""
    was_training = pl_module.training
    pl_module.eval()
    if labels is None and pl_module.labelled:
        labels = balanced_labels(seeds, pl_module.label_space.num_classes)
    try:
        chunks = [pl_module.sample(chunk, sampler, progress,
                                   None if labels is None else torch.as_tensor(labels[i:i + batch_size])).samples
                  for i, chunk in zip(range(0, len(seeds), batch_size), batched(seeds, batch_size))]
    finally:
        pl_module.train(was_training)
    if not chunks:
        return torch.empty(0, *pl_module.data_shape, device=pl_module.device)
    return torch.cat(chunks)


def balanced_labels(seeds: Sequence[int], num_classes: int) -> list[int]:
    """Class-balanced labels: seed mod num_classes, the same on any number of processes."""
    return [int(s) % num_classes for s in seeds]


def draw_all(trainer: L.Trainer, pl_module: L.LightningModule, seeds: Sequence[int], sampler: Sampler | None,
             batch_size: int, desc: str = "samples", labels: Sequence[int] | None = None) -> Tensor:
    """Samples for every seed, in order, on every rank: each rank draws a contiguous share, then all gather. A stop
    request (the Preemption callback's) ends the drawing after the sampler step in progress, with
    ``Interrupted`` on every rank."""
    world, rank = trainer.world_size, trainer.global_rank
    share = math.ceil(len(seeds) / world)
    padded = list(seeds) + [seeds[-1] + 1 + i for i in range(share * world - len(seeds))]
    if labels is not None:
        labels = list(labels) + [labels[-1]] * (len(padded) - len(seeds))
        labels = labels[rank * share:(rank + 1) * share]
    local, stopped = None, None
    with pl_module.sampling_progress(desc, share, sampler) as progress:
        progress.interrupt = stop_check(trainer)
        try:
            progress.check()
            local = draw(pl_module, padded[rank * share:(rank + 1) * share], sampler, batch_size, progress, labels)
        except Interrupted as stop:
            stopped = stop
    gather_stops(None, stopped)
    if world == 1:
        return local
    gathered = trainer.strategy.all_gather(local)  # (world, share, ...)
    return gathered.reshape(world * share, *local.shape[1:])[:len(seeds)]


@contextmanager
def redone_after_resume_if_stopped(callback: L.Callback) -> Iterator[None]:
    """Within the block, a stop request (``Interrupted``) ends the callback's evaluation without a result: its
    ``_last_step`` stays as it was, so the resumed run evaluates that step (the Preemption callback saves and
    stops the run)."""
    previous = callback._last_step
    try:
        yield
    except Interrupted:
        callback._last_step = previous


def due(step: int, every_n_steps: int, last_step: int) -> bool:
    return step != last_step and step % every_n_steps == 0


def fast_dev_run(trainer: L.Trainer) -> bool:
    return bool(trainer.fast_dev_run)


def continues_run(trainer: L.Trainer) -> bool:
    """Whether this fit continues the run whose folder holds the checkpoint it starts from (a resume, not a new run
    from another run's checkpoint)."""
    run_dir = Path(trainer.log_dir or trainer.default_root_dir).resolve()
    return trainer.ckpt_path is not None and run_dir in Path(trainer.ckpt_path).resolve().parents


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the start of fit with ``at_start``), draw ``num_samples``
    images for seeds ``first_seed, first_seed + 1, ...`` with the EMA weights; log the grid to TensorBoard as
    ``samples`` and save ``<run dir>/samples/step_<step>.png``.

    A run resumed from a checkpoint in its folder draws no grid at its first step unless one is due there and its
    PNG is missing; where TensorBoard hides what the stopped run logged from that step on, the saved grid of that
    step is logged again.

    Args:
        sampler: a ``lit_score.sampling`` sampler; default: the model's own.
        batch_size: images drawn at once per rank.
        nrow: images per grid row (default: about the square root of num_samples).
    """

    def __init__(self, every_n_steps: int = 5000, num_samples: int = 64, first_seed: int = 0,
                 sampler: Sampler | None = None, batch_size: int = 64, nrow: int | None = None,
                 at_start: bool = True) -> None:
        if every_n_steps < 1 or num_samples < 1 or batch_size < 1:
            raise ValueError("SampleGrid needs every_n_steps, num_samples and batch_size >= 1, got "
                             f"{every_n_steps}, {num_samples}, {batch_size}")
        self.every_n_steps, self.num_samples, self.first_seed = every_n_steps, num_samples, first_seed
        self.sampler, self.batch_size, self.at_start = sampler, batch_size, at_start
        self.nrow = nrow or max(1, math.isqrt(num_samples))
        self._last_step = -1

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.num_samples))

    def layout(self, pl_module: L.LightningModule) -> tuple[list[int], list[int] | None, int]:
        """Seeds, labels and images per row: a class-conditional model's grid has one row per class (about
        num_samples / num_classes images each)."""
        if not pl_module.labelled:
            return self.seeds, None, self.nrow
        k = pl_module.label_space.num_classes
        per_row = max(1, round(self.num_samples / k))
        seeds = list(range(self.first_seed, self.first_seed + k * per_row))
        return seeds, [i // per_row for i in range(len(seeds))], per_row

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if fast_dev_run(trainer):
            return
        step = trainer.global_step
        if not continues_run(trainer):
            if self.at_start:
                self._log_grid_unless_stopped(trainer, pl_module)
            return
        if not due(step, self.every_n_steps, -1):
            return
        path = self._path(trainer, step)  # a collective: every rank asks
        if trainer.strategy.broadcast(path.is_file()):  # drawn before the checkpoint this run resumes from
            self._last_step = step
            self._log_again(trainer, path, step)
        else:
            self._log_grid_unless_stopped(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if due(trainer.global_step, self.every_n_steps, self._last_step) and not fast_dev_run(trainer):
            self._log_grid_unless_stopped(trainer, pl_module)

    def _log_grid_unless_stopped(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with redone_after_resume_if_stopped(self):
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """Draw the grid (every rank), log and save it (rank 0); returns the uint8 grid (C, H, W)."""
        from torchvision.utils import make_grid

        step = self._last_step = trainer.global_step
        seeds, labels, nrow = self.layout(pl_module)
        samples = draw_all(trainer, pl_module, seeds, self.sampler, self.batch_size,
                           f"sample grid at step {step}", labels)  # with the model's weights to sample with (its EMA)
        images = pl_module.data_space.to_uint8(samples).cpu()
        grid = make_grid(images, nrow=nrow, padding=1)
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
        if trainer.is_global_zero:
            self._write(trainer, Path(run_dir) / "samples", grid, step)
        return grid

    @staticmethod
    def _path(trainer: L.Trainer, step: int) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{step:08d}.png"

    def _log_again(self, trainer: L.Trainer, path: Path, step: int) -> None:
        """Log the grid saved at ``path`` to the TensorBoard loggers again (rank 0), where they hide the stopped
        run's events from ``step`` on."""
        import numpy as np
        from PIL import Image

        if not trainer.is_global_zero or tensorboard_purge_step(trainer) != step:
            return
        with Image.open(path) as image:
            image.load()
            array = np.array(image)
            grid = torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    log_image(logger, "samples", grid, image, step)

    def _write(self, trainer: L.Trainer, directory: Path, grid: Tensor, step: int) -> None:
        from PIL import Image

        directory.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy())
        image.save(directory / f"step_{step:08d}.png")
        for logger in trainer.loggers:
            log_image(logger, "samples", grid, image, step)


def log_image(logger: Logger, tag: str, grid: Tensor, image: Any, step: int) -> bool:
    """Give the uint8 ``grid`` (C, H, W), also as a PIL ``image``, to ``logger`` if it takes images: TensorBoard's
    add_image, MLflow's log_image, or a ``log_image(key, images, step)`` method (Weights & Biases, Comet, Neptune,
    ...). Returns whether it took it (CSVLogger does not)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, step)
        return True
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, f"{tag}/step_{step:08d}.png")
        return True
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key=tag, images=[image], step=step)
        return True
    return False
