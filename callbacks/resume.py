"""Exact resume: what Lightning checkpoints leave out, the random state of every rank and the position of the
training data within an epoch.

A run stopped after optimizer step k and resumed from its checkpoint draws the same noise and the same batches
for step k + 1 onwards as an uninterrupted run, provided its DataModule serves the training set through
:class:`ResumableDataLoader` and the Trainer has a :class:`RandomState` callback (``lit-score`` adds one).
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
import random
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_score.distributed import gather_to_all, rank_and_world


def _collect_rng_states() -> dict[str, Any]:
    """This process's random states, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RandomState(L.Callback):
    """Makes the torch, CUDA, numpy and Python random states part of the checkpoint, one per rank.

    Validation and the end of an epoch leave the random state as the last training batch left it, so the noise
    of the next training step does not depend on whether validation ran in between; a resumed run's first step
    starts from the state saved after the last one. Not covered: random numbers drawn while loading a batch
    (random augmentations), and callbacks that draw from the global generators between training steps.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._state_batch: int | None = None
        self._loaded = False

    @staticmethod
    def _batches_done(trainer: L.Trainer) -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _restore(self) -> None:
        if self._state is not None:
            _set_rng_states(self._state)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Lightning's restart bookkeeping may draw random numbers before the first step; restore right before it.
        if self._loaded:
            self._restore()
            self._loaded = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._state, self._state_batch = _collect_rng_states(), self._batches_done(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._restore()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._state, self._state_batch, self._loaded = None, None, False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        current = self._state_batch is not None and self._state_batch == self._batches_done(trainer)
        state = self._state if current else _collect_rng_states()
        checkpoint["random_state"] = gather_to_all(state)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("random_state")
        if states is None:
            rank_zero_warn("the checkpoint has no random state: the resumed run draws different noise")
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random state of {len(states)} processes, this run has "
                           f"{trainer.world_size}: the resumed run draws different noise")
            return
        self._state, self._state_batch, self._loaded = states[trainer.global_rank], None, True


class ResumableSampler(DistributedSampler):
    """The indices of one epoch for this rank, a seeded permutation per epoch (as ``DistributedSampler``), that
    can start part-way through the epoch: ``start`` indices of this rank are skipped, until the next epoch.

    Works without a process group too (one replica). Lightning leaves it in place under DDP.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        global_rank, world_size = rank_and_world()
        super().__init__(dataset, num_replicas=world_size if num_replicas is None else num_replicas,
                         rank=global_rank if rank is None else rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a map-style dataset whose place in the epoch is saved in Lightning checkpoints.

    Lightning stores :meth:`state_dict` with the fit loop and calls :meth:`load_state_dict` before iterating
    again, so a run resumed mid-epoch gets the rest of that epoch, in the same order, and then the same later
    epochs. Under DDP the position is kept as samples seen by all ranks, so a run may resume on a different
    number of processes. Takes the ``DataLoader`` arguments except ``sampler`` and ``batch_sampler``;
    ``seed`` fixes the per-epoch permutations (and the seeds of the worker processes).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, **kwargs: Any) -> None:
        for key in ("sampler", "batch_sampler", "generator"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ResumableDataLoader chooses its own {key}; pass shuffle and seed instead")
            kwargs.pop(key, None)
        if not isinstance(dataset, Sized):
            raise TypeError(f"ResumableDataLoader needs a map-style dataset with a length, got {type(dataset)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        super().__init__(dataset, batch_size=batch_size, sampler=ResumableSampler(dataset, shuffle, seed),
                         drop_last=drop_last, generator=torch.Generator(), **kwargs)
        self.seed = seed
        self._epoch, self._seen = 0, 0

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        self.generator.manual_seed(self.seed + 7919 * sampler.epoch)
        self._epoch, self._seen = sampler.epoch, sampler.start
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._seen += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler
        if sampler.epoch == self._epoch:
            seen = min(self._seen, len(sampler))
        else:
            seen = sampler.start
        return {"epoch": sampler.epoch, "samples_seen": seen * sampler.num_replicas}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        try:
            epoch, seen = int(state_dict["epoch"]), int(state_dict["samples_seen"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not a ResumableDataLoader state: {state_dict!r}") from None
        sampler: ResumableSampler = self.sampler
        start = seen // sampler.num_replicas
        if start >= len(sampler) - (self.batch_size - 1 if self.drop_last else 0):
            epoch, start = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.start = start
        self._epoch, self._seen = epoch, start


# Top-level options that a saved config.yaml has already resolved into the trainer and its callbacks.
RESOLVED_IN_CONFIG = ("--ema_rate", "--sample_every", "--val_every", "--checkpoint_every", "--fid_every")


def resume_args(argv: list[str]) -> list[str]:
    """``lit-score fit --resume RUN_DIR [overrides]``: the arguments that continue the run in ``RUN_DIR`` in place,
    its saved ``config.yaml``, the same logger directory and version (so the same TensorBoard run and
    ``checkpoints/last.ckpt``), ``--ckpt_path last``, then the overrides."""
    for i, arg in enumerate(argv):
        if arg == "--resume" or arg.startswith("--resume="):
            break
    else:
        return list(argv)
    if arg == "--resume":
        if i + 1 >= len(argv):
            raise ValueError("--resume needs a run directory, e.g. --resume runs/quickstart/version_0")
        value, rest = argv[i + 1], argv[i + 2:]
    else:
        value, rest = arg.split("=", 1)[1], argv[i + 1:]
    run_dir = Path(value).absolute()
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--resume {value}: no config.yaml in {run_dir}; pass the run directory that holds "
                         f"config.yaml and checkpoints/, e.g. runs/quickstart/version_0")
    resolved = [a.split("=", 1)[0] for a in rest if a.split("=", 1)[0] in RESOLVED_IN_CONFIG]
    if resolved:
        raise ValueError(f"--resume {value}: {', '.join(resolved)} would be ignored: the run's config.yaml holds its "
                         "value already written into the callbacks; edit it there (or, for --val_every, pass "
                         "--trainer.val_check_interval), or start a new run with --init_weights")
    logger = "--trainer.logger.init_args."
    return [*argv[:i], "--config", str(run_dir / "config.yaml"), f"{logger}save_dir={run_dir.parent.parent}",
            f"{logger}name={run_dir.parent.name}", f"{logger}version={version_of(run_dir)}", "--ckpt_path=last", *rest]


def version_of(run_dir: Path) -> str:
    """The logger version that names ``run_dir``: N for ``version_N`` (shown as ``v_num=N``), else the folder name."""
    match = re.fullmatch(r"version_(\d+)", run_dir.name)
    return match[1] if match else run_dir.name
