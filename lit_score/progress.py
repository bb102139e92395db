"""Progress of long computations on stderr: images done / total, NFE per image and an ETA, drawn by rank 0 only;
and their interruption: a stop request (Ctrl-C, SIGTERM, SLURM's SIGUSR1) acted on inside one, which
:class:`Interrupted` unwinds and every process of a distributed run learns of at the same collective
(:func:`gather_stops`).

Sampling progress is counted per score-network evaluation by wrapping the score function, so samplers need no
hook and no host synchronisation is added (the count is a Python integer). ``TQDM_DISABLE=1`` silences it.
"""
from __future__ import annotations

import signal
import sys
from typing import IO, Any, Callable

from torch import Tensor
from tqdm import tqdm

from lit_score.distributed import gather_to_all, rank_and_world

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {status} [{elapsed}, ETA {remaining}]"


class _Bar(tqdm):
    """tqdm with a ``status`` field in its format."""

    status = ""

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "status": self.status}


class Progress:
    """A progress bar over ``total`` images (or other items, ``unit``) with an ETA.

    Args:
        desc: what is being computed, e.g. ``"predict"`` or ``"val/fid@10k"``.
        total: items this process will do.
        nfe_per_image: score evaluations each sampled image will take, when known in advance (see
            ``planned_nfe``); progress then advances within a batch, one evaluation at a time.
        enabled: draw the bar (default: on rank 0 only).
        file: where (default: stderr).
        interrupt: called after every network evaluation and every ``advance``; a stop request makes it raise
            (:class:`Interrupted`), which ends the computation there.
    """

    def __init__(self, desc: str, total: int, nfe_per_image: int | None = None, unit: str = "images",
                 enabled: bool | None = None, file: IO[str] | None = None,
                 interrupt: Callable[[], None] | None = None) -> None:
        self.interrupt = interrupt
        world = rank_and_world()[1]
        if enabled is None:
            enabled = rank_and_world()[0] == 0
        self.desc = desc if world == 1 else f"{desc} (rank 0 of {world})"
        self.total, self.unit, self.planned = int(total), unit, nfe_per_image
        self.done, self.nfe, self.last_nfe = 0, 0, None
        self._batch, self._in_batch = 0, 0.0
        off = {} if enabled else {"disable": True}  # when on, TQDM_DISABLE=1 still turns it off
        self.bar = _Bar(total=max(self.total, 1), desc=self.desc, bar_format=BAR_FORMAT,
                        file=file if file is not None else sys.stderr, dynamic_ncols=True, mininterval=0.5,
                        leave=True, **off)
        self._show()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._show()
        self.bar.close()

    def _show(self) -> None:
        text = f"{self.unit} {self.done}/{self.total}"
        if self._batch:
            expected = self.planned or self.last_nfe
            text += f", NFE {self.nfe}/{expected} per image" if expected else f", NFE {self.nfe} per image"
        elif self.last_nfe is not None:
            text += f", NFE {self.last_nfe} per image"
        self.bar.status = text

    def check(self) -> None:
        """Calls ``interrupt`` (before work that should not start after a stop request)."""
        if self.interrupt is not None:
            self.interrupt()

    def advance(self, n: int) -> None:
        """``n`` more items are done (for work that is not sampling)."""
        self.done += n
        self._show()
        self.bar.update(n)
        self.check()

    def counter(self, batch: int) -> Callable[[], None]:
        """A function to call after each network evaluation of a batch of ``batch`` images, counting it into the
        bar; call ``batch_done`` after the batch."""
        self._batch, self._in_batch, self.nfe = batch, 0.0, 0
        expected = self.planned or self.last_nfe

        def count() -> None:
            self.nfe += 1
            step = min(batch / expected, 0.99 * batch - self._in_batch) if expected else 0.0
            step = max(step, 0.0)  # the batch's last share lands in batch_done
            self._in_batch += step
            self._show()
            self.bar.update(step)  # redraws at most every mininterval
            self.check()

        return count

    def wrap(self, score_fn: Callable[[Tensor, Tensor], Tensor], batch: int) -> Callable[[Tensor, Tensor], Tensor]:
        """``score_fn`` for a batch of ``batch`` images, counting each evaluation into the bar (``counter``)."""
        count = self.counter(batch)

        def counted(x: Tensor, t: Tensor) -> Tensor:
            out = score_fn(x, t)
            count()
            return out

        return counted

    def batch_done(self, n: int, nfe: int | None = None) -> None:
        """The batch of ``n`` images is sampled, at ``nfe`` evaluations per image (default: those counted)."""
        self.last_nfe = int(nfe) if nfe is not None else self.nfe
        self._batch, self._in_batch = 0, 0.0
        self.done += n
        self._show()
        self.bar.update(self.done - self.bar.n)  # exact at batch ends


def planned_nfe(sampler: object, sde: object) -> int | None:
    """Score evaluations per image ``sampler`` will take under ``sde`` (None: adaptive, or not known in advance)."""
    planned = getattr(sampler, "planned_nfe", None)
    return planned(sde) if callable(planned) else None


def exit_code(signum: int) -> int:
    """The shell's status of a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1)."""
    return 128 + int(signum)


class Interrupted(SystemExit):
    """Raised after a signal once the current unit of work (a batch, a shard, a sampler step) is finished; exits
    the program with :func:`exit_code` of the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(exit_code(signum))
        self.signum, self.message = signal.Signals(signum), message

    def __str__(self) -> str:
        return self.message


def gather_stops(local: Any, stopped: Interrupted | None) -> list[Any]:
    """Every rank's ``local``, in rank order (as ``gather_to_all``), unless some rank's work was ``stopped``:
    then every rank raises that rank's :class:`Interrupted` (this rank's own first)."""
    stop = None if stopped is None else (int(stopped.signum), stopped.message)
    parts = gather_to_all((local, stop))
    if stopped is not None:
        raise stopped
    for _, other in parts:
        if other is not None:
            raise Interrupted(*other)
    return [part for part, _ in parts]
