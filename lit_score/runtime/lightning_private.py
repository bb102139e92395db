"""Every use of Lightning's private API in lit-score (its command line and callbacks), one function each, with the reason no public
API does it. ``tests/test_lightning_private.py`` pins each one, so an upgrade of Lightning that renames or changes
it fails there, by name, rather than somewhere in a run.

Done through public API instead: the Trainer is made by ``LightningCLI.instantiate_trainer`` (with a Trainer
subclass whose limit options are typed int-or-float), a failed fit's empty run folder is removed by that
subclass's ``fit``, and the outputs are reported in the ``after_<subcommand>`` hooks.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.progress import _BatchProgress
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

# LightningCLI.__init__ calls this between parsing and instantiation; it puts every hyper-parameter of
# ``--ckpt_path`` over the parsed config.
CLI_CHECKPOINT_HPARAMS = "_parse_ckpt_path"


def _keep_parsed_config(self: LightningCLI) -> None:
    """The config stays as parsed: the CLI has already taken what the checkpoint fixes."""


def without_checkpoint_hyperparameters(cli_class: type[LightningCLI]) -> type[LightningCLI]:
    """``cli_class`` with LightningCLI's rule "every hyper-parameter of ``--ckpt_path`` overrides the config and
    the command line" turned off (reason: no public option turns it off; lit-score decides which options a
    checkpoint fixes and refuses, rather than drops, a config that asks for others)."""
    setattr(cli_class, CLI_CHECKPOINT_HPARAMS, _keep_parsed_config)
    return cli_class


def save_last_checkpoint(checkpoint: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Have ``checkpoint`` write its ``last.ckpt`` now (reason: the public ``trainer.save_checkpoint`` to its
    ``last`` path leaves the ModelCheckpoint unaware of the save: its ``on_train_end`` writes last.ckpt again with
    the end-of-fit loop state, which resumes differently, and the loggers' ``after_save_checkpoint`` is skipped)."""
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


def saved_at_this_step(checkpoint: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """Whether ``checkpoint`` saved at the current step (reason: no public attribute says at which step;
    ``last_model_path`` names the file only)."""
    return checkpoint._last_global_step_saved == trainer.global_step


def replace_last_in_place(checkpoint: ModelCheckpoint) -> None:
    """``last.ckpt`` is overwritten on resume, never ``last-v1.ckpt`` (reason: the public
    ``enable_version_counter=False`` would have to be in every user's YAML)."""
    checkpoint._enable_version_counter = False


def mark_validation_cut_short(trainer: L.Trainer) -> None:
    """Count the validation batch in progress (or about to be fetched) as started and not finished, so that a
    checkpoint saved now reads as saved inside a validation step: a validation cut short, which Lightning runs
    again, whole, on resume (reason: the loops' progress has no public API; a checkpoint saved without this
    between validation batches makes the resumed run skip that validation)."""
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    if progress.total.ready == progress.total.processed:
        progress.increment_ready()
    if progress.total.started == progress.total.processed:
        progress.increment_started()


def validation_follows(trainer: L.Trainer) -> bool:
    """In ``on_train_batch_end``: whether Lightning validates before the next training batch (reason: no public
    API says; the fit loop decides it with this method, on the state this hook sees)."""
    return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def open_event_writer(logger: TensorBoardLogger) -> tuple[Any, str | None]:
    """The SummaryWriter Lightning's setup opened (None if none yet) and its event file (reason: reading
    ``logger.experiment`` would open one, and the writer's file name has no public accessor)."""
    writer = logger._experiment
    file_writer = getattr(writer, "file_writer", None)
    return writer, getattr(getattr(file_writer, "event_writer", None), "_file_name", None)


def reopen_with_purge_step(logger: TensorBoardLogger, step: int) -> None:
    """Close the logger's writer; the next one it opens drops every point at or after ``step`` (reason:
    TensorBoardLogger takes ``purge_step`` only in its constructor, which the CLI has already called)."""
    writer, logger._experiment = logger._experiment, None
    if writer is not None:
        writer.close()
    logger._kwargs["purge_step"] = step


def private_uses() -> dict[str, Any]:
    """Each private name used, by the function above that uses it (for the tests that pin them)."""
    return {"without_checkpoint_hyperparameters": (LightningCLI, CLI_CHECKPOINT_HPARAMS),
            "save_last_checkpoint": (ModelCheckpoint, "_save_last_checkpoint"),
            "save_last_checkpoint (file-name metrics)": (ModelCheckpoint, "_monitor_candidates"),
            "saved_at_this_step": (ModelCheckpoint, "_last_global_step_saved"),
            "replace_last_in_place": (ModelCheckpoint, "_enable_version_counter"),
            "mark_validation_cut_short": (_BatchProgress, "increment_started"),
            "validation_follows": (_TrainingEpochLoop, "_should_check_val_fx"),
            "validation_follows (data fetcher)": (_FitLoop, "_data_fetcher"),
            "open_event_writer": (TensorBoardLogger, "_experiment"),
            "reopen_with_purge_step": (TensorBoardLogger, "_kwargs")}
