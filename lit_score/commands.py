"""The ``lit-score`` command (also ``python -m lit_score``): the LightningCLI subcommands ``fit``, ``validate``,
``test`` and ``predict``, and the tools ``submit``, ``export``, ``export-diffusers``, ``import-diffusers``, ``export-ema``, ``sigma-max`` and
``posthoc-ema``.

A problem with the user's input (:class:`lit_score.errors.UserError`: configuration, data, checkpoint, weights,
allocation) is printed in one or two lines and exits with status 2; ``--traceback`` or ``LIT_SCORE_TRACEBACK=1``
shows the full traceback. After a signal stopped a run the status is 128 + the signal number."""
from __future__ import annotations

import sys
from collections.abc import Callable

from lit_score.errors import ConfigurationError, report, run_reporting_errors
from lit_score.threads import configure_threads, pop_threads_arg


def _submit(argv: list[str]) -> int:
    from lit_score.slurm import submit_main

    return submit_main(argv)


def _export(argv: list[str]) -> int:
    from lit_score.export import export_main

    return export_main(argv)


def _export_diffusers(argv: list[str]) -> int:
    from lit_score.diffusers_interop import export_main

    return export_main(argv)


def _import_diffusers(argv: list[str]) -> int:
    from lit_score.diffusers_interop import import_main

    return import_main(argv)


def _export_ema(argv: list[str]) -> int:
    from lit_score.tools import export_ema_main

    return export_ema_main(argv)


def _sigma_max(argv: list[str]) -> int:
    from lit_score.tools import sigma_max_main

    return sigma_max_main(argv)


def _posthoc_ema(argv: list[str]) -> int:
    from lit_score.tools import posthoc_ema_main

    return posthoc_ema_main(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "submit": _submit,
    "export": _export,
    "export-diffusers": _export_diffusers,
    "import-diffusers": _import_diffusers,
    "export-ema": _export_ema,
    "sigma-max": _sigma_max,
    "posthoc-ema": _posthoc_ema,
}


def main() -> None:
    """Console script ``lit-score``. ``--threads N`` anywhere sets the CPU threads (default: the CPUs the process
    may use, see :mod:`lit_score.threads`)."""
    try:
        sys.argv[1:], threads = pop_threads_arg(sys.argv[1:])
        configure_threads(threads)
    except ValueError as err:
        print(report(ConfigurationError(str(err))), file=sys.stderr)
        sys.exit(2)
    tool = TOOLS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    if tool is not None:
        sys.exit(run_reporting_errors(lambda: tool(sys.argv[2:])))
    from lit_score.cli import fit_main

    sys.exit(run_reporting_errors(fit_main))
