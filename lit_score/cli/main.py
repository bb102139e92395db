"""The ``lit-score`` command (also ``python -m lit_score``): the LightningCLI subcommands ``fit``, ``validate``,
``test`` and ``predict``, and the tools ``submit``, ``export``, ``export-diffusers``, ``import-diffusers``, ``sigma-max`` and
``posthoc-ema``.

A problem with the user's input (:class:`lit_score.errors.UserError`: configuration, data, checkpoint, weights,
allocation) is printed in one or two lines and exits with status 2; ``--traceback`` or ``LIT_SCORE_TRACEBACK=1``
shows the full traceback. After a signal stopped a run the status is 128 + the signal number."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from lit_score.errors import ConfigurationError, report, run_reporting_errors
from lit_score.cli.threads import configure_threads, pop_threads_arg


# Subcommand -> (module, function taking the remaining arguments and returning the exit status); loaded on use.
TOOLS: dict[str, tuple[str, str]] = {
    "submit": ("lit_score.cli.submit", "submit_main"),
    "export": ("lit_score.interop.export", "export_main"),
    "export-diffusers": ("lit_score.interop.diffusers", "export_main"),
    "import-diffusers": ("lit_score.interop.diffusers", "import_main"),
    "sigma-max": ("lit_score.cli.tools", "sigma_max_main"),
    "posthoc-ema": ("lit_score.cli.tools", "posthoc_ema_main"),
}
# Subcommands of earlier releases -> the command that replaced them (said in one line, exit status 2).
REPLACED: dict[str, str] = {
    "export-ema": "lit-score export CHECKPOINT OUT_DIR --weights ema",
}


def tool(name: str) -> Callable[[list[str]], int]:
    """The function behind the subcommand ``name``."""
    module, function = TOOLS[name]
    return getattr(importlib.import_module(module), function)


def main() -> None:
    """Console script ``lit-score``. ``--threads N`` anywhere sets the CPU threads (default: the CPUs the process
    may use, see :mod:`lit_score.cli.threads`)."""
    try:
        sys.argv[1:], threads = pop_threads_arg(sys.argv[1:])
        configure_threads(threads)
    except ValueError as err:
        print(report(ConfigurationError(str(err))), file=sys.stderr)
        sys.exit(2)
    if len(sys.argv) > 1 and sys.argv[1] in REPLACED:
        print(f"lit-score: error: `lit-score {sys.argv[1]}` was replaced by `{REPLACED[sys.argv[1]]}`", file=sys.stderr)
        sys.exit(2)
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        run = tool(sys.argv[1])
        sys.exit(run_reporting_errors(lambda: run(sys.argv[2:])))
    from lit_score.cli.lightning_cli import fit_main

    sys.exit(run_reporting_errors(fit_main))
