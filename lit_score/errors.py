"""Problems with what the user gave (configuration, data, checkpoint, weights, allocation). The command line
prints them in one or two lines and exits with status 2; ``LIT_SCORE_TRACEBACK=1`` (or ``--traceback``) shows
the full traceback instead."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LIT_SCORE_TRACEBACK"


class UserError(Exception):
    """A problem the user can fix; its message says what, where and the fix."""


class ConfigurationError(UserError, ValueError):
    """A configuration key, value or file that cannot be used."""


class DataError(UserError, ValueError):
    """A data set, folder or image that cannot be served."""


class MissingDataError(DataError, FileNotFoundError):
    """A data folder or file that does not exist or holds no images."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class WeightsError(UserError, FileNotFoundError):
    """Pretrained weights (e.g. Inception's) that are missing or do not fit."""


def _chain(err: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _rejected_argument(err: BaseException) -> ConfigurationError | None:
    """A ValueError or TypeError that a class's ``__init__`` raised while the config was instantiated: an argument
    of that class (named by the message) that the YAML or the command line got wrong."""
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
    if not inits:
        return None
    owner = type(inits[0].f_locals["self"])
    return ConfigurationError(f"{owner.__module__}.{owner.__qualname__}: {err}")


def user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` that ``err`` is or was raised from (jsonargparse and Lightning wrap them), or the
    argument a configured class rejected."""
    chain = _chain(err)
    found = next((e for e in chain if isinstance(e, UserError)), None)
    if found is None:
        found = next((r for r in map(_rejected_argument, reversed(chain)) if r is not None), None)
    return found


def report(err: UserError, prog: str = "lit-score") -> str:
    """The one- or two-line message for ``err``."""
    return f"{prog}: error: {err}\n(the full traceback: {TRACEBACK_FLAG} or {TRACEBACK_ENV}=1)"


def run_reporting_errors(run: Callable[[], int], prog: str = "lit-score") -> int:
    """``run()``'s exit status; a :class:`UserError` becomes its message on stderr and status 2."""
    if TRACEBACK_FLAG in sys.argv[1:]:
        sys.argv.remove(TRACEBACK_FLAG)
        os.environ[TRACEBACK_ENV] = "1"  # also for the processes DDP launches from this command line
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return run()
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - only a UserError is reported briefly; the rest re-raised
        problem = user_error(err)
        if problem is None:
            raise
        print(report(problem, prog), file=sys.stderr)
        return 2
