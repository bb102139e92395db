"""Nothing lost: the end of a fit and a signal (Ctrl-C, SIGTERM, SLURM's SIGUSR1) both write ``last.ckpt``
through the Trainer's ``ModelCheckpoint`` at an optimizer-step boundary; after a signal the run stops, exits
non-zero and (on SLURM, after SIGUSR1) requeues itself. Prediction, testing and evaluation stop after the current
batch or shard."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lit_score.errors import DataReadError, user_error
from lit_score.progress import Interrupted, exit_code
from lit_score.runtime.checkpoint_io import AtomicCheckpointIO
from lit_score.runtime.lightning_private import (mark_validation_cut_short, open_event_writer,
                                                 reopen_with_purge_step, replace_last_in_place, save_last_checkpoint,
                                                 saved_at_this_step, validation_follows)


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


_requested: list[signal.Signals] = []


@contextmanager
def stop_at_boundaries(signals: Sequence[str] = ("SIGINT", "SIGTERM", "SIGUSR1")) -> Iterator[None]:
    """Within the block the signals only record a stop request, which :func:`raise_if_stop_requested` acts on;
    a second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()

    def handler(signum: int, frame: FrameType | None) -> None:
        if _requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _requested.append(signal.Signals(signum))

    previous = {s: signal.signal(s, handler) for s in map(_signal, signals)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _requested.clear()


def raise_if_stop_requested(done: str) -> None:
    """Raises :class:`Interrupted` if a signal arrived inside :func:`stop_at_boundaries`; ``done`` names the
    finished unit of work (e.g. ``"shard 3"``)."""
    if _requested:
        sig = _requested[0]
        raise Interrupted(sig, f"stopped by {sig.name} after {done}; run the same command again to go on")


def _notify(message: str) -> None:
    """Write ``message`` to stderr from a signal handler: straight to the file descriptor, since the handler may
    interrupt a write to ``sys.stderr`` (a progress bar), which a second buffered write would fail on."""
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass


def tensorboard_purge_step(trainer: L.Trainer) -> int | None:
    """The step from which this fit's TensorBoard events hide what an interrupted run logged (the resume step of
    :class:`Preemption`, which reopens the writers with ``purge_step``), or None where nothing is hidden."""
    return next((cb.purge_step for cb in trainer.callbacks if isinstance(cb, Preemption)), None)


def stop_check(trainer: L.Trainer) -> Callable[[], None] | None:
    """For long computations inside a fit (sampling, feature passes): a function to call between steps that raises
    :class:`Interrupted` once this process has a stop request (the :class:`Preemption` callback's), or None
    without that callback."""
    return next((cb.check for cb in trainer.callbacks if isinstance(cb, Preemption)), None)


def _continue_checkpoint_state(trainer: L.Trainer, callback: ModelCheckpoint, checkpoint: dict[str, Any]) -> None:
    """Give ``callback``'s saved state the directory it saves to now, so that Lightning restores it without its
    "dirpath has changed" warning: a run resumed in its own checkpoint folder, spelt another way (relative, then
    absolute with ``--resume``), keeps its files (their paths respelt); a new run started from another's
    checkpoint starts with none of them, as Lightning would."""
    state = (checkpoint.get("callbacks") or {}).get(callback.state_key)
    saved, now = (state or {}).get("dirpath"), callback.dirpath
    if not saved or not now or saved == now:
        return
    here = Path(now).resolve()
    resumed = trainer.ckpt_path is not None and Path(trainer.ckpt_path).resolve().parent == here
    if Path(saved).resolve() == here or resumed:
        def respelt(path: Any) -> Any:
            return os.path.join(now, Path(path).name) if isinstance(path, str) and path else path

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = respelt(state[key])
        state["best_k_models"] = {respelt(k): v for k, v in (state.get("best_k_models") or {}).items()}
    else:
        state.update(best_model_score=callback.best_model_score, kth_best_model_path=callback.kth_best_model_path,
                     kth_value=callback.kth_value, best_k_models=dict(callback.best_k_models),
                     last_model_path=callback.last_model_path)
    state["dirpath"] = now


def _encode(received: signal.Signals | None, requeue: bool) -> int:
    return 0 if received is None else int(received) + (64 if requeue else 0)


class Preemption(L.Callback):
    """Every way a fit ends writes ``last.ckpt`` through the Trainer's ``ModelCheckpoint`` (``save_last``) at an
    optimizer-step boundary, with its step, epoch and loop counters: the last step of the run (``max_steps`` or
    ``max_epochs``, whether or not a periodic checkpoint falls on it) and the step during which one of
    ``requeue_signals`` or ``stop_signals`` arrived, after which the run stops (``Trainer.should_stop``, without
    the validation Lightning would add) and the process exits with 128 + the signal number. After a
    ``requeue_signal``, inside a SLURM job, rank 0 requeues the job with ``scontrol requeue``. The handler only
    records the signal; every rank learns at each step boundary whether any rank received one, so all stop at
    the same step. A second Ctrl-C aborts at once (the previous checkpoint stays).

    A stop request is also acted on inside the long parts of a fit: the FID and sample-grid callbacks' sampling
    (after the sampler step in progress, through :func:`stop_check`) and the FID reference statistics (after the
    batch in progress) end early and leave their evaluation to the resumed run; a validation stops before its
    next batch, saving ``last.ckpt`` at the step it follows, and runs again, whole, after the resume.

    Also: checkpoints are written atomically (:class:`lit_score.runtime.checkpoint_io.AtomicCheckpointIO`), ``last.ckpt``
    is replaced in place (the ModelCheckpoint's version counter is off, so no ``last-v1.ckpt``), a resumed run's
    TensorBoard events purge the steps after the checkpoint (``purge_step``), and in ``predict``, ``test`` and
    ``validate`` a signal stops the run after the current batch with :class:`Interrupted`.

    Args:
        requeue_signals: signals that mean "save, stop and requeue" (SLURM's ``--signal=USR1@90`` warning).
        stop_signals: signals that mean "save and stop" (Ctrl-C; SLURM's SIGTERM at the time limit or on
            ``scancel``; a job pre-empted with ``PreemptMode=REQUEUE`` is requeued by SLURM itself).
        requeue: run ``scontrol requeue`` after a requeue signal (only inside a SLURM job).
    """

    def __init__(self, requeue_signals: list[str] | None = None, stop_signals: list[str] | None = None,
                 requeue: bool = True) -> None:
        self.requeue_signals = [_signal(s) for s in (["SIGUSR1"] if requeue_signals is None else requeue_signals)]
        self.stop_signals = [_signal(s) for s in (["SIGTERM", "SIGINT"] if stop_signals is None else stop_signals)]
        both = set(self.requeue_signals) & set(self.stop_signals)
        if both:
            raise ValueError(f"{', '.join(s.name for s in both)} is both a requeue and a stop signal")
        if signal.SIGKILL in self.requeue_signals + self.stop_signals:
            raise ValueError("SIGKILL cannot be caught; pre-emption needs a warning signal such as SIGUSR1")
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.stopped_by: signal.Signals | None = None
        self.checkpoint_path: str | None = None
        self._requeue_pending = False
        self._start_step = 0
        self._resume_step: int | None = None
        self.purge_step: int | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._pid = os.getpid()

    @property
    def signals(self) -> list[signal.Signals]:
        return self.requeue_signals + self.stop_signals

    @property
    def exit_code(self) -> int:
        """0 after a fit that ended by itself, 128 + the signal number after one that a signal stopped."""
        return 0 if self.stopped_by is None else exit_code(self.stopped_by)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a data-loader worker, forked with this handler: Ctrl-C reaches it too, the main process acts
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now, the previous checkpoint stays
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT and rank_zero_only.rank == 0:
            _notify("Interrupted (Ctrl-C): stopping with a checkpoint after this step (Ctrl-C again aborts without "
                    "one).")

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for sig in self.signals:
            if signal.getsignal(sig) != self._handler:
                self._previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._handler)

    def check(self) -> None:
        """Raises :class:`Interrupted` if this process has received one of the signals (see :func:`stop_check`)."""
        if self.received is not None and os.getpid() == self._pid:
            raise Interrupted(self.received, f"stopped by {self.received.name}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received, self.stopped_by, self.checkpoint_path, self._requeue_pending = None, None, None, False
        self.purge_step = None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit":
            checkpoint = self._checkpoint_callback(trainer)
            if checkpoint is None or not checkpoint.save_last:
                rank_zero_warn("Preemption: the Trainer has no ModelCheckpoint(save_last=True), so the end of the run "
                               "and a signal leave no last.ckpt to resume from. Add ModelCheckpoint(save_last=True).")
            else:
                replace_last_in_place(checkpoint)
            # This callback requeues, after its checkpoint; Lightning's SLURM handler would save inside the handler.
            environment = getattr(trainer.strategy, "cluster_environment", None)
            if isinstance(environment, SLURMEnvironment):
                environment.auto_requeue = False
        # Installed before Lightning's signal connector, which then leaves SIGUSR1 alone.
        self._install()

    # Lightning's connector wraps SIGTERM in handlers of its own; take it back for the loop.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        self._install()
        # A signal during the start (reference statistics, a resumed run's FID): nothing new to save.
        self._stop_before_step(trainer, pl_module, "the start of training")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn != "fit":
            return
        if trainer.sanity_checking:
            self._stop_before_step(trainer, pl_module, "the sanity check")
            return
        code = self._stop_code(trainer, pl_module)
        if code == 0:
            return
        self._stopping(code)
        checkpoint = self._checkpoint_callback(trainer)
        if checkpoint is not None and checkpoint.save_last:
            self._save_validation_cut_short(trainer, checkpoint)
        raise Interrupted(self.stopped_by, self._stopped_message(trainer, f"the validation after step "
                                                                          f"{trainer.global_step}"))

    def _save_validation_cut_short(self, trainer: L.Trainer, checkpoint: ModelCheckpoint) -> None:
        """``last.ckpt`` as from inside the validation in progress: Lightning's state of a validation cut short,
        which the resumed run repeats, whole, before its next training step."""
        mark_validation_cut_short(trainer)
        save_last_checkpoint(checkpoint, trainer)
        self.checkpoint_path = checkpoint.last_model_path

    def _stop_before_step(self, trainer: L.Trainer, pl_module: L.LightningModule, where: str) -> None:
        code = self._stop_code(trainer, pl_module)
        if code:
            self._stopping(code)
            raise Interrupted(self.stopped_by, self._stopped_message(trainer, where))

    def _stopping(self, code: int) -> None:
        self.stopped_by = signal.Signals(code % 64)
        self._requeue_pending = code >= 64 and self.requeue

    def _stopped_message(self, trainer: L.Trainer, where: str) -> str:
        """``stopped by SIG during WHERE; CKPT is at step K: resume with ...``, what the command line prints."""
        assert self.stopped_by is not None
        path = self.checkpoint_path or trainer.ckpt_path
        at = f"; {path} is at step {trainer.global_step}" if path else "; no checkpoint was written yet"
        resume = f": resume with `lit-score fit --resume {trainer.log_dir}`" if path and trainer.log_dir else ""
        return f"stopped by {self.stopped_by.name} during {where}{at}{resume}"

    @staticmethod
    def _checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        return next((cb for cb in callbacks if cb.save_last), callbacks[0] if callbacks else None)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # The batch that made step k logs at k - 1, after the checkpoint: the resumed run logs from k on.
        self._resume_step = int(checkpoint.get("global_step", 0))
        if trainer.state.fn == "fit":
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    _continue_checkpoint_state(trainer, callback, checkpoint)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # TensorBoard drops the points an interrupted run logged after the checkpoint (after step 0 when a run
        # restarts from scratch in its own directory): one point per step. Nothing is logged before this hook.
        step, self._resume_step = self._resume_step, None
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer, own = open_event_writer(logger)  # opened, still empty, by Lightning's setup
            earlier = [p for p in Path(logger.log_dir).glob("events.out.tfevents.*") if str(p) != own]
            if step is None and not earlier:
                continue
            self.purge_step = step or 0
            reopen_with_purge_step(logger, self.purge_step)
            if own is not None:
                Path(own).unlink(missing_ok=True)
            # TensorBoard reads a run's files in name order, and a name starts with the second it was made: the new
            # file must sort after the interrupted run's for its purge to apply (a restart within that second).
            newest = max((int(p.name.split(".")[3]) for p in earlier), default=0)
            while int(time.time()) <= newest:
                time.sleep(0.05)

    def _stop_code(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        code = _encode(self.received, self.received in self.requeue_signals)
        if trainer.world_size > 1:  # any rank's signal stops every rank; a requeue signal wins
            code = int(trainer.strategy.reduce(torch.tensor(code, device=pl_module.device), reduce_op="max").item())
        return code

    @staticmethod
    def _last_step(trainer: L.Trainer) -> bool:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            return True
        max_epochs = trainer.max_epochs
        return (max_epochs is not None and 0 < max_epochs <= trainer.current_epoch + 1
                and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch))

    def _save_last(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int) -> None:
        checkpoint = self._checkpoint_callback(trainer)
        if checkpoint is None or not checkpoint.save_last:
            return
        # A periodic checkpoint due at this step first (ModelCheckpoint skips a step it has saved), then last.ckpt.
        checkpoint.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not saved_at_this_step(checkpoint, trainer) or not checkpoint.last_model_path:
            save_last_checkpoint(checkpoint, trainer)
        self.checkpoint_path = checkpoint.last_model_path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stopped_by is not None:
            return
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and (batch_idx + 1) % accumulate and batch_idx + 1 != trainer.num_training_batches:
            return  # not an optimizer-step boundary
        code = self._stop_code(trainer, pl_module)
        if code == 0:
            if self._last_step(trainer):
                self._save_last(trainer, pl_module, outputs, batch, batch_idx)
            return
        if validation_follows(trainer):
            return  # stopped at its first batch, saved as a validation cut short: the resumed run validates
        self._stopping(code)
        if self.stopped_by == signal.SIGINT:
            rank_zero_info(f"Interrupted (Ctrl-C): saving a checkpoint at step {trainer.global_step} and stopping.")
        else:
            rank_zero_info(f"Pre-emption signal: saving a checkpoint at step {trainer.global_step} and stopping "
                           f"({self.stopped_by.name}).")
        self._save_last(trainer, pl_module, outputs, batch, batch_idx)
        if self.checkpoint_path is None:
            self._requeue_pending = False
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates when should_stop is set; no time for that now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Early stopping ends a run between steps: its last step is saved here (ModelCheckpoint would save it
        # only if it had saved nothing else in this run).
        checkpoint = self._checkpoint_callback(trainer)
        if (checkpoint is not None and checkpoint.save_last and trainer.global_step > self._start_step
                and not saved_at_this_step(checkpoint, trainer)):
            save_last_checkpoint(checkpoint, trainer)

    def _stop_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str,
                         batch_idx: int) -> None:
        code = self._stop_code(trainer, pl_module)
        if code:
            sig = signal.Signals(code % 64)
            message = f"stopped by {sig.name} after {stage} batch {batch_idx}; the remaining batches did not run"
            rank_zero_info(message)
            raise Interrupted(sig, message)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stop_evaluation(trainer, pl_module, "predict", batch_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stop_evaluation(trainer, pl_module, "test", batch_idx)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "validate":
            self._stop_evaluation(trainer, pl_module, "validation", batch_idx)

    def _save_after_data_error(self, trainer: L.Trainer, error: DataReadError) -> None:
        """Data that cannot be read between two steps (a training or validation batch): ``last.ckpt`` at the last
        completed step, named at the end of ``error``'s message. One process only: under DDP the other ranks are
        inside the next step, and its checkpoint would wait for them (they stop as for a dead rank)."""
        progress = trainer.fit_loop.epoch_loop.batch_progress.total
        checkpoint = self._checkpoint_callback(trainer)
        if (trainer.world_size > 1 or checkpoint is None or not checkpoint.save_last
                or progress.ready != progress.completed):
            return
        if trainer.sanity_checking:
            pass  # nothing new since the checkpoint this run started from
        elif trainer.validating:
            self._save_validation_cut_short(trainer, checkpoint)
        elif trainer.global_step > self._start_step and not saved_at_this_step(checkpoint, trainer):
            save_last_checkpoint(checkpoint, trainer)
        path = checkpoint.last_model_path or trainer.ckpt_path
        if path:
            resume = f"`lit-score fit --resume {trainer.log_dir}`" if trainer.log_dir else f"--ckpt_path {path}"
            note = (f"; {path} is at step {trainer.global_step}, the last completed step: repair or remove the file, "
                    f"then resume with {resume}")
            error.args = (f"{error.args[0] if error.args else error}{note}", *error.args[1:])

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # Lightning skips the teardown hooks after an exception
        unreadable = user_error(exception)
        if isinstance(unreadable, DataReadError) and trainer.state.fn == "fit" and (trainer.training
                                                                                   or trainer.validating):
            self._save_after_data_error(trainer, unreadable)
        if isinstance(exception, Interrupted) and trainer.state.fn == "fit":
            if self.stopped_by is None:  # raised by a check (stop_check) before training started: the reference pass
                self._stopping(_encode(exception.signum, exception.signum in self.requeue_signals))
                exception.message = self._stopped_message(trainer, "the start of the fit")
            if exception.signum != signal.SIGINT:
                rank_zero_info(f"Pre-emption signal: {exception}")
            if self._requeue_pending and trainer.is_global_zero:
                self._requeue()
            self._requeue_pending = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        if stage != "fit":
            return
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
