"""Pre-emption: a signal asks the run to checkpoint at the next step boundary, stop, and (on SLURM) requeue."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use a name such as SIGUSR1 or SIGTERM") from None


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job (``<array job>_<task>`` in an array), or None off SLURM."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    """On one of ``requeue_signals`` or ``stop_signals`` the run finishes its current training step, saves
    ``last.ckpt`` through the Trainer's ``ModelCheckpoint`` and stops; after a ``requeue_signal``, inside a SLURM
    job, rank 0 then requeues the job with ``scontrol requeue``. The signal handler only records the signal;
    every rank learns at each step boundary whether any rank received one, so all stop at the same step.

    Args:
        requeue_signals: signals that mean "save, stop and requeue" (SLURM's ``--signal=USR1@90`` warning).
        stop_signals: signals that mean "save and stop" (SLURM's SIGTERM at the time limit or on ``scancel``;
            a job pre-empted with ``PreemptMode=REQUEUE`` is requeued by SLURM itself).
        requeue: run ``scontrol requeue`` after a requeue signal (only inside a SLURM job).
    """

    def __init__(self, requeue_signals: list[str] | None = None, stop_signals: list[str] | None = None,
                 requeue: bool = True) -> None:
        self.requeue_signals = [_signal(s) for s in (["SIGUSR1"] if requeue_signals is None else requeue_signals)]
        self.stop_signals = [_signal(s) for s in (["SIGTERM"] if stop_signals is None else stop_signals)]
        both = set(self.requeue_signals) & set(self.stop_signals)
        if both:
            raise ValueError(f"{', '.join(s.name for s in both)} is both a requeue and a stop signal")
        if signal.SIGKILL in self.requeue_signals + self.stop_signals:
            raise ValueError("SIGKILL cannot be caught; pre-emption needs a warning signal such as SIGUSR1")
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.checkpoint_path: str | None = None
        self._requeue_pending = False
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def signals(self) -> list[signal.Signals]:
        return self.requeue_signals + self.stop_signals

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            if signal.getsignal(sig) != self._handler:
                self._previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._handler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.received, self.checkpoint_path, self._requeue_pending = None, None, False
        if self._checkpoint_callback(trainer) is None:
            rank_zero_warn("Preemption: the Trainer has no ModelCheckpoint, so a signal stops the run without a "
                           "checkpoint to resume from. Add ModelCheckpoint(save_last=True).")
        # This callback requeues, after its checkpoint; Lightning's SLURM handler would save inside the handler.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False
        # Installed before Lightning's signal connector, which then leaves SIGUSR1 alone.
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's connector wraps SIGTERM in handlers of its own; take it back for the training loop.
        self._install()

    @staticmethod
    def _checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        return next((cb for cb in callbacks if cb.save_last), callbacks[0] if callbacks else None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.should_stop and self.checkpoint_path is not None:
            return
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and (batch_idx + 1) % accumulate and batch_idx + 1 != trainer.num_training_batches:
            return  # not an optimizer-step boundary
        received = self.received
        code = 0 if received is None else (2 if received in self.requeue_signals else 1)
        # Any rank's signal stops every rank; a requeue signal wins over a stop signal.
        code = int(trainer.strategy.reduce(torch.tensor(code, device=pl_module.device), reduce_op="max").item()) \
            if trainer.world_size > 1 else code
        if code == 0:
            return
        self._requeue_pending = code == 2 and self.requeue
        rank_zero_info(f"Pre-emption signal: saving a checkpoint at step {trainer.global_step} and stopping.")
        checkpoint = self._checkpoint_callback(trainer)
        if checkpoint is not None and checkpoint.dirpath is not None:
            metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                       "step": torch.tensor(trainer.global_step)}
            self.checkpoint_path = checkpoint.format_checkpoint_name(metrics, checkpoint.CHECKPOINT_NAME_LAST)
            checkpoint.last_model_path = self.checkpoint_path
            trainer.save_checkpoint(self.checkpoint_path)
        else:
            self._requeue_pending = False
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous = {}
        if self._requeue_pending and trainer.is_global_zero:
            self._requeue()
        self._requeue_pending = False

    @staticmethod
    def _requeue() -> None:
        job_id = slurm_job_id()
        if job_id is None:
            rank_zero_info("Pre-emption: not a SLURM job, nothing to requeue.")
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode == 0:
            rank_zero_info(f"Pre-emption: requeued SLURM job {job_id}.")
        else:
            rank_zero_warn(f"Pre-emption: `scontrol requeue {job_id}` failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
