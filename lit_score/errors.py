"""Problems with what the user gave (configuration, data, checkpoint, weights, allocation) or that a run cannot go
on with (values that stay non-finite). The command line prints them in one or two lines and exits with status 2;
``LIT_SCORE_TRACEBACK=1`` (or ``--traceback``) shows the full traceback instead."""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LIT_SCORE_TRACEBACK"


class UserError(Exception):
    """A problem the user can fix; its message says what, where and the fix."""


class ConfigurationError(UserError, ValueError):
    """A configuration key, value or file that cannot be used."""


class DataError(UserError, ValueError):
    """A data set, folder or image that cannot be served."""


class DataReadError(DataError):
    """A data file (an image) that cannot be read or decoded; the message names it."""


class MissingDataError(DataError, FileNotFoundError):
    """A data folder or file that does not exist or holds no images."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class WeightsError(UserError, FileNotFoundError):
    """Pretrained weights (e.g. Inception's) that are missing or do not fit."""


class NonFiniteError(UserError, FloatingPointError):
    """A training run whose loss or gradients stayed non-finite for too many consecutive optimizer steps (see
    ``lit_score.callbacks.NonFinite``); its message names the steps and the settings to change."""


def exception_chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and the errors it was raised from (``__cause__``, else ``__context__``), outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def rejected_argument(err: BaseException) -> tuple[type, BaseException] | None:
    """The class whose ``__init__`` raised a ValueError or TypeError while jsonargparse instantiated the config
    (an argument of that class that the YAML or the command line got wrong), and that error, found in ``err``
    or the errors it was raised from; else None."""
    for e in reversed(exception_chain(err)):
        owner = _init_owner(e)
        if owner is not None:
            return owner, e
    return None


def _init_owner(err: BaseException) -> type | None:
    if not isinstance(err, (ValueError, TypeError)) or err.__traceback__ is None:
        return None
    tb = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    parsing = [i for i, f in enumerate(frames) if "jsonargparse" in f.f_code.co_filename]
    if not parsing:
        return None
    inits = [f for f in frames[parsing[-1] + 1:] if f.f_code.co_name == "__init__" and "self" in f.f_locals]
    return type(inits[0].f_locals["self"]) if inits else None


def user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` that ``err`` is or was raised from (jsonargparse and Lightning wrap them), or the
    argument a configured class rejected."""
    found = next((e for e in exception_chain(err) if isinstance(e, UserError)), None)
    rejected = rejected_argument(err) if found is None else None
    if rejected is not None:
        owner, cause = rejected
        return ConfigurationError(f"{owner.__module__}.{owner.__qualname__}: {cause}")
    return found


WORKER_ERROR = re.compile(r"^Caught (\w+) (in DataLoader worker process \d+)\.\s*\nOriginal Traceback")


def one_line(err: BaseException) -> str:
    """``err``'s message; for an error re-raised from a DataLoader worker, its last line (the original message)
    instead of the worker's traceback."""
    message = str(err)
    worker = WORKER_ERROR.match(message)
    if worker:
        last = message.rstrip().splitlines()[-1]
        last = re.sub(r"^[\w.]*" + re.escape(worker.group(1)) + r": ", "", last)
        return f"{last} ({worker.group(2)})"
    return message


def report(err: UserError, prog: str = "lit-score") -> str:
    """The one- or two-line message for ``err``."""
    return f"{prog}: error: {one_line(err)}\n(the full traceback: {TRACEBACK_FLAG} or {TRACEBACK_ENV}=1)"


def exit_reporting(err: UserError, prog: str | None = None) -> NoReturn:
    """Print ``err`` as :func:`report` does and exit with status 2."""
    print(report(err, prog or program_name()), file=sys.stderr)
    raise SystemExit(2)


def program_name() -> str:
    """``lit-score`` or ``lit-score-eval``, as the running command is called."""
    command = sys.argv[0] if sys.argv else ""
    name = os.path.basename(command)
    return name if name.startswith("lit-score") else "lit-score-eval" if "evaluate" in command else "lit-score"


def traceback_wanted() -> bool:
    """Whether the user asked for full tracebacks (``--traceback`` or ``LIT_SCORE_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def run_reporting_errors(run: Callable[[], int], prog: str = "lit-score") -> int:
    """``run()``'s exit status; a :class:`UserError` becomes its message on stderr and status 2."""
    if TRACEBACK_FLAG in sys.argv[1:]:
        sys.argv.remove(TRACEBACK_FLAG)
        os.environ[TRACEBACK_ENV] = "1"  # also for the processes DDP launches from this command line
    if traceback_wanted():
        return run()
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - only a UserError is reported briefly; the rest re-raised
        problem = user_error(err)
        if problem is None:
            raise
        print(report(problem, prog), file=sys.stderr)
        return 2
