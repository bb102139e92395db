"""A rank that dies ends every rank of a distributed run within a stated time, with one line naming it.

Under ``srun --kill-on-bad-exit=1`` (the SLURM templates) SLURM ends the job step when one task dies. Elsewhere,
e.g. under Lightning's own launcher (``--trainer.devices N``) or torchrun, the ranks left wait in their next
collective until the process-group timeout (Lightning's default: 30 minutes), holding their GPUs. lit-score:

* sets the process-group timeout to ``--dead_rank.timeout`` seconds, 600 (10 minutes, torch's own default for NCCL)
  unless given: a collective that waits longer for some rank fails on the others. It applies to every strategy that
  Lightning builds from a name (``auto`` on several devices, ``ddp``, ``ddp_find_unused_parameters_true``,
  ``fsdp``, ``deepspeed``...); a strategy given as a class keeps its own (``--trainer.strategy DDPStrategy
  --trainer.strategy.timeout 0:30:00``). Nothing in a lit-score run legitimately waits that long in a collective:
  ``prepare_data`` runs under Lightning's barrier without a timeout, sampling, FID and its reference statistics are
  sharded over the ranks, and the others wait only for rank 0's checkpoint writes (seconds to a minute).
* stops a process whose collective failed because a rank is gone (gloo: at once, the connection is reset; NCCL:
  at the timeout at the latest) or stopped answering (at the timeout).
* under Lightning's launcher, watches the ranks of one machine four times a second: rank 0 the ranks it started,
  and they rank 0. One that dies ends the others within seconds, whatever the backend (NCCL's collectives would
  otherwise wait for the timeout). A rank that exited with status 0 has finished; rank 0, whose exit status the
  ranks it started cannot see, has died when it is still gone 3 s later and their work is not done.

Each process that stops prints one line on stderr and exits with status 1, as after a crash (the SLURM templates
requeue the job, and the restart resumes from the last checkpoint), or 2 when the rank it names exited with 2 (a
problem to fix first, which that rank's own line names), e.g.::

    lit-score: rank 1 (pid 1234) died (killed by SIGKILL); every rank stops; restart to resume from the last \
checkpoint runs/quickstart/version_0/checkpoints/last.ckpt

The rank is named when it ran on this machine (ranks announce their host and pid when the run starts); for a rank
on another machine, or one that hangs, the line gives the collective's error instead. ``--traceback`` (or
``LIT_SCORE_TRACEBACK=1``) keeps the error's traceback as well.
"""
from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry

from lit_score.distributed import gather_to_all, rank_and_world
from lit_score.errors import exception_chain, traceback_wanted

DEFAULT_TIMEOUT = 600  # seconds
CHECK_EVERY = 0.25  # seconds between two looks at the watched ranks (Lightning's own launcher looks every 5 s)
CONFIRM = 3.0  # seconds a rank whose exit status is unknown stays gone before it counts as dead
EXIT_STATUS = 1  # a crash, retried; 2 (a problem to fix first, e.g. unreadable data) when the dead rank's was 2
# gloo's errors when a peer's connection breaks or a receive times out (a RuntimeError, not a DistError).
GLOO_FAILURE = re.compile(r"gloo/transport|Connection (reset|closed) by peer|Timed out waiting \d+ ?ms")


@contextmanager
def process_group_timeout(seconds: float) -> Iterator[None]:
    """Within the block, the strategies Lightning builds from a name (``ddp``, ``fsdp``, ``deepspeed``... and ``auto``
    on several devices) get a process-group timeout of ``seconds``; one given as an object keeps its own."""
    saved = {}
    for name in StrategyRegistry.available_strategies():
        entry = StrategyRegistry[name]
        params = entry["init_params"]
        if "timeout" in params or "timeout" not in inspect.signature(entry["strategy"]).parameters:
            continue
        saved[name] = entry
        StrategyRegistry.register(name, entry["strategy"], entry["description"], override=True,
                                  **{**params, "timeout": timedelta(seconds=seconds)})
    try:
        yield
    finally:
        for name, entry in saved.items():
            StrategyRegistry[name] = entry


def peer_failure(err: BaseException | None) -> BaseException | None:
    """The collective's error in ``err`` or the errors it was raised from, when one failed because another rank is
    gone or did not answer in time; else None."""
    return next((e for e in exception_chain(err) if isinstance(e, dist.DistError)
                 or (isinstance(e, RuntimeError) and GLOO_FAILURE.search(str(e)))), None)


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None without the process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _host() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class Peer:
    """Another rank of the run, as it announced itself: its host, pid, parent's pid and start time."""

    rank: int
    host: str
    pid: int
    ppid: int
    start: int | None

    def visible(self) -> bool:
        """Whether this process can see the peer's process (same machine and pid namespace)."""
        return self.host == _host() and self.start is not None and _start_time(self.pid) == self.start

    def gone(self) -> bool:
        fields = _stat(self.pid)
        return fields is None or fields[0] in ("Z", "X") or int(fields[19]) != self.start

    def exit_status(self) -> int | None:
        """The peer's exit status (-N after signal N, as :mod:`subprocess` gives it), where this process is its
        parent and has not collected it; else None."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (ChildProcessError, OSError):
            return None
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def describe(peer: Peer, status: int | None) -> str:
    """``rank 1 (pid 1234) died (killed by SIGKILL)``, ``rank 1 (pid 1234) exited with status 2``."""
    what = f"rank {peer.rank} (pid {peer.pid})"
    if status is None:
        return f"{what} died"
    if status > 0:
        return f"{what} exited with status {status}"
    try:
        return f"{what} died (killed by {signal.Signals(-status).name})"
    except ValueError:
        return f"{what} died (killed by signal {-status})"


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint of the run: saved by this launch, else the one it resumed from."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            return str(path)
    return str(trainer.ckpt_path) if trainer.ckpt_path else None


def stop_message(trainer: L.Trainer, what: str) -> str:
    """The line a stopping rank prints: ``what`` happened, every rank stops, and how to go on."""
    if trainer.state.fn != "fit":
        then = "run it again"
    else:
        path = last_checkpoint(trainer)
        then = f"restart to resume from the last checkpoint {path}" if path else \
            "no checkpoint was written yet: a restart starts the run again"
    return f"lit-score: {what}; every rank stops; {then}"


class DeadRank(L.Callback):
    """A rank that dies or stops answering ends every rank, each with one line naming it.

    Within ``timeout`` seconds (the process-group timeout), sooner when the processes are Lightning's on one
    machine or the backend is gloo; exit status 1. See :mod:`lit_score.callbacks.dead_rank`.

    Args:
        timeout: the process-group timeout in seconds: how long a collective waits for every rank before it
            fails (for the strategies Lightning builds from a name; a strategy given as a class keeps its own).
    """

    def __init__(self, timeout: int = DEFAULT_TIMEOUT) -> None:
        if timeout < 1:
            raise ValueError(f"timeout is in seconds and must be >= 1, got {timeout}")
        self.timeout = timeout
        self._peers: list[Peer] = []
        self._done = threading.Event()
        self._stopping = threading.Lock()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        rank, world = rank_and_world()
        if world == 1:
            return
        me = Peer(rank, _host(), os.getpid(), os.getppid(), _start_time(os.getpid()))
        self._peers = [p for p in gather_to_all(me) if p.rank != rank and p.visible()]
        watched = [p for p in self._peers if p.pid == me.ppid or p.ppid == me.pid]  # Lightning's launcher
        self._done = threading.Event()
        if watched:
            threading.Thread(target=self._watch, args=(trainer, watched, self._done), daemon=True,
                             name="lit-score-dead-rank").start()

    def _watch(self, trainer: L.Trainer, peers: list[Peer], done: threading.Event) -> None:
        missing: dict[int, float] = {}
        while not done.wait(CHECK_EVERY):
            for peer in [p for p in peers if p.gone()]:
                status = peer.exit_status()
                # A rank this process started and whose status it cannot see was collected by Lightning's launcher,
                # which would be ending this process too had it failed: it finished, as one that exited with 0.
                if status == 0 or (status is None and peer.ppid == os.getpid()):
                    peers.remove(peer)
                elif status is not None or time.monotonic() - missing.setdefault(peer.rank, time.monotonic()) \
                        >= CONFIRM:
                    if not done.is_set():
                        self.stop(trainer, describe(peer, status), exit_status(status))

    def _finished(self) -> None:
        self._done.set()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._finished()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finished()
        self._peers = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._finished()
        failure = peer_failure(exception) if dist.is_available() and dist.is_initialized() else None
        if failure is None:
            return
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)[:300]  # gloo's source location
        timed_out = re.search(r"timed? ?out", first, re.IGNORECASE) is not None
        deadline = time.monotonic() + (0.0 if timed_out else 2.0)  # a killed process is gone soon after its
        while not (gone := [p for p in self._peers if p.gone()]) and time.monotonic() < deadline:  # sockets close
            time.sleep(0.05)
        status = None
        if gone:
            statuses = {p.rank: p.exit_status() for p in gone}
            peer = next((p for p in gone if statuses[p.rank] is not None), gone[0])
            status = statuses[peer.rank]
            what = describe(peer, status)
        elif timed_out:
            what = f"a collective timed out: some rank stopped answering ({first})"
        else:
            what = f"a collective failed: another rank died or stopped answering ({first})"
        self.stop(trainer, what, exit_status(status), finalize=True, reraise=traceback_wanted())

    def stop(self, trainer: L.Trainer, what: str, status: int, finalize: bool = False, reraise: bool = False) -> None:
        """Print the line for ``what``, end the ranks this process started and exit with ``status`` (``reraise``:
        return instead, for the error's traceback); ``finalize`` the loggers first (main thread)."""
        self._stopping.acquire()  # once: the watcher and the main thread may both see the failure
        print(stop_message(trainer, what), file=sys.stderr, flush=True)
        launcher = trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signal.SIGKILL)
        if reraise:
            return
        if finalize:
            for logger in trainer.loggers:
                try:
                    logger.finalize("failed")
                except Exception:  # noqa: BLE001 - the run is lost; exiting matters more
                    pass
        _exit(status)


def exit_status(peer_status: int | None) -> int:
    """This process's exit status after a peer's end: :data:`EXIT_STATUS`, or 2 after the peer's 2 (a problem that
    a retry would meet again, which the peer's own line names)."""
    return 2 if peer_status == 2 else EXIT_STATUS


def _exit(status: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
