"""The ``lit-score`` command (also ``python -m lit_score``): the LightningCLI subcommands ``fit``, ``validate``,
``test`` and ``predict``, and the tools ``submit``, ``export``, ``export-diffusers``, ``import-diffusers``, ``sigma-max`` and
``posthoc-ema``; ``lit-score --help`` lists them all, one line each.

A problem with the user's input (:class:`lit_score.errors.UserError`: configuration, data, checkpoint, weights,
allocation) is printed in one or two lines and exits with status 2; ``--traceback`` or ``LIT_SCORE_TRACEBACK=1``
shows the full traceback. After a signal stopped a run the status is 128 + the signal number."""
from __future__ import annotations

import importlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
# One line each, for `lit-score --help`: the LightningCLI subcommands, then the tools.
SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model (--config EXPERIMENT.yaml), or continue a run (--resume RUN_DIR)",
    "validate": "the validation loss of a checkpoint (--ckpt_path)",
    "test": "test-set bits/dim of a checkpoint, through the probability-flow ODE",
    "predict": "sample from a checkpoint or export (samples.png, samples.npz)",
}
TOOL_HELP: dict[str, str] = {
    "submit": "submit a fit to SLURM with the packaged sbatch templates, checked against the partition",
    "export": "a checkpoint as a folder: model.safetensors, config.json and a model card",
    "export-diffusers": "a checkpoint or export as a diffusers pipeline folder",
    "import-diffusers": "a diffusers score-SDE pipeline or UNet2DModel folder as a lit-score export",
    "sigma-max": "the largest pairwise distance of a data config's training images (a VE SDE's sigma_max)",
    "posthoc-ema": "the EMA of any width from a run's post-hoc EMA snapshots (Karras et al. 2024)",
}
# Lightning warnings that a command expects, when it resumes a run in its own directory (--resume, --ckpt_path):
# that directory holds checkpoints, and `--ckpt_path last` before the first checkpoint starts from scratch.
RESUME_WARNINGS = (re.escape("Checkpoint directory ") + ".* exists and is not empty",
                   re.escape('.fit(ckpt_path="last") is set, but there is no last checkpoint available.'))
# ... and those that do not apply to lit-score: the training scalars are logged every log_every_n_steps steps of
# the run, whatever the length of an epoch.
NEEDLESS_WARNINGS = (re.escape("The number of training batches (") + r"\d+" +
                     re.escape(") is smaller than the logging interval"),)
# Subcommands of earlier releases -> the command that replaced them (said in one line, exit status 2).
REPLACED: dict[str, str] = {
    "export-ema": "lit-score export CHECKPOINT OUT_DIR --weights ema",
}


def tool(name: str) -> Callable[[list[str]], int]:
    """The function behind the subcommand ``name``."""
    module, function = TOOLS[name]
    return getattr(importlib.import_module(module), function)


def overview() -> str:
    """``lit-score --help``: every subcommand and tool with one line on what it does."""
    width = max(map(len, [*SUBCOMMANDS, *TOOL_HELP])) + 2
    lines = ["usage: lit-score SUBCOMMAND [options]   (lit-score SUBCOMMAND --help: its options)", "",
             "Training and inference (LightningCLI; --config, --trainer.*, --model.*, --data.*):"]
    lines += [f"  {name:<{width}}{text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:<{width}}{TOOL_HELP.get(name, '')}" for name in TOOLS]
    lines += ["", "--threads N anywhere sets the CPU threads; --traceback shows the full traceback of an error."]
    return "\n".join(lines)


@contextmanager
def expected_warnings_silenced(args: list[str]) -> Iterator[None]:
    """Within the block, the Lightning warnings in ``NEEDLESS_WARNINGS`` are silent, and those in
    ``RESUME_WARNINGS`` when ``args`` resume a run."""
    resume = any(a in ("--resume", "--ckpt_path") or a.startswith(("--resume=", "--ckpt_path=")) for a in args)
    with warnings.catch_warnings():
        for message in NEEDLESS_WARNINGS + (RESUME_WARNINGS if resume else ()):
            warnings.filterwarnings("ignore", message=message)
        yield


def main() -> None:
    """Console script ``lit-score``. ``--threads N`` anywhere sets the CPU threads (default: the CPUs the process
    may use, see :mod:`lit_score.cli.threads`)."""
    try:
        sys.argv[1:], threads = pop_threads_arg(sys.argv[1:])
    except ValueError as err:
        print(report(ConfigurationError(str(err))), file=sys.stderr)
        sys.exit(2)
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(overview(), file=sys.stdout if len(sys.argv) > 1 else sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    try:
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

    with expected_warnings_silenced(sys.argv[1:]):
        status = run_reporting_errors(fit_main)
    sys.exit(status)
