"""SLURM: pre-flight checks of a job's allocation against the Trainer, and ``lit-score submit``, which submits
an experiment with the sbatch templates in ``slurm/``."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L

TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
GPU_ACCELERATORS = ("gpu", "cuda", "auto")


class SlurmAllocationError(RuntimeError):
    """The SLURM job's nodes or tasks do not match the Trainer's ``num_nodes`` and ``devices``."""


def _tasks_per_node(spec: str) -> list[int]:
    """Expands SLURM's compressed tasks-per-node list, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise SlurmAllocationError(f"cannot read SLURM's tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def allocation_errors(num_nodes: int, devices: int, environ: Mapping[str, str] = os.environ) -> list[str]:
    """What is wrong with running a Trainer of ``num_nodes`` x ``devices`` processes in this SLURM job (empty
    outside SLURM, in an interactive job (named ``bash`` or ``interactive``), or when all is well)."""
    if "SLURM_JOB_ID" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return []
    job = environ["SLURM_JOB_ID"]
    world = num_nodes * devices
    if "SLURM_STEP_ID" not in environ:
        ntasks = int(environ.get("SLURM_NTASKS", "1"))
        if world > 1 or ntasks > 1:
            return [f"lit-score runs in the batch script of SLURM job {job}, not under srun, but needs {world} "
                    f"processes: start it as `srun lit-score fit ...` (as slurm/*.sbatch do), so that SLURM starts "
                    f"one process per device"]
        return []
    errors = []
    nodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1"))
    per_node = _tasks_per_node(spec)
    if nodes != num_nodes:
        errors.append(f"SLURM gave job {job} {nodes} node(s) but trainer.num_nodes is {num_nodes}: set "
                      f"--trainer.num_nodes {nodes}, or submit with --nodes={num_nodes}")
    if len(set(per_node)) > 1:
        errors.append(f"SLURM started an uneven number of tasks per node ({spec}): submit with "
                      f"--ntasks-per-node={devices} instead of --ntasks")
    elif per_node[0] != devices:
        errors.append(f"SLURM started {per_node[0]} task(s) per node but trainer.devices is {devices}: set "
                      f"--trainer.devices {per_node[0]}, or submit with --ntasks-per-node={devices} (one task per "
                      f"device)")
    return errors


def check_allocation(trainer: L.Trainer) -> None:
    """Raises :class:`SlurmAllocationError` before any process group is formed if the job does not match the
    Trainer (a mismatch would otherwise hang, or train several copies side by side)."""
    errors = allocation_errors(trainer.num_nodes, trainer.num_devices)
    if errors:
        raise SlurmAllocationError("; ".join(errors))


@dataclass
class Submission:
    """An experiment's SLURM job: the sbatch command line and where the run writes."""

    command: list[str]
    run_root: Path

    def __str__(self) -> str:
        return shlex.join(self.command)

    def submit(self) -> str:
        """Runs sbatch; returns the job id."""
        if shutil.which("sbatch") is None:
            raise FileNotFoundError("sbatch not found; submit from a SLURM login node")
        self.run_root.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(self.command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}\n{self}")
        return result.stdout.strip().split(";")[0]

    def run_dir(self, job_id: str) -> Path:
        """Where job ``job_id`` trains, on every (re)start."""
        return self.run_root / f"slurm-{job_id}"


def _fit_config(fit_args: list[str]):
    """The parsed (not instantiated) configuration of ``lit-score fit <fit_args>``."""
    from lit_score.cli import ScoreCLI
    from lit_score.config import expand_config_args

    class _ReadConfig(ScoreCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = _ReadConfig(run=False, args=expand_config_args(fit_args), auto_configure_optimizers=False)
    return cli.config


def _count_devices(devices: object) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        count = -1
    if count < 1:
        raise ValueError(f"trainer.devices is {devices!r}: a SLURM job needs the number of devices per node, "
                         f"e.g. --trainer.devices 4")
    return count


def build_submission(fit_args: list[str], sbatch_args: list[str] = (), template: str | Path | None = None,
                     python: str | None = None) -> Submission:
    """The ``sbatch`` command that trains ``lit-score fit <fit_args>`` on ``trainer.num_nodes`` nodes with
    ``trainer.devices`` tasks (and GPUs, unless the accelerator is ``cpu``) each; ``sbatch_args`` come last and
    win."""
    config = _fit_config(list(fit_args))
    trainer = config.trainer
    num_nodes = trainer.num_nodes
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"trainer.num_nodes must be a positive integer, got {num_nodes!r}")
    devices = _count_devices(trainer.devices)
    logger = trainer.logger
    init_args = getattr(logger, "init_args", None)
    if init_args is None or "version" not in init_args or "save_dir" not in init_args:
        raise ValueError("a SLURM run directory is keyed by the logger's version: configure trainer.logger as a "
                         "TensorBoardLogger (or CSVLogger) with save_dir and name")
    name = init_args.get("name") or "lightning_logs"
    run_root = Path(init_args.save_dir).absolute() / str(name)
    if template is None:
        template = TEMPLATES / ("single_node.sbatch" if num_nodes == 1 else "multi_node.sbatch")
    if not Path(template).is_file():
        raise FileNotFoundError(f"sbatch template not found: {template}")
    accelerator = str(trainer.accelerator).lower()
    gpus = devices if accelerator in GPU_ACCELERATORS else 0
    export = f"ALL,LIT_SCORE_RUN_ROOT={run_root},PYTHON={python or sys.executable}"
    command = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={num_nodes}",
               f"--ntasks-per-node={devices}", f"--gpus-per-node={gpus}", f"--export={export}",
               f"--output={run_root}/slurm-%j.out", *sbatch_args, str(template), *fit_args]
    return Submission(command, run_root)


USAGE = """usage: lit-score submit [--dry-run] [--template FILE] [SBATCH OPTIONS] -- FIT ARGUMENTS

Submits `lit-score fit FIT ARGUMENTS` as a SLURM job: trainer.num_nodes nodes, trainer.devices tasks (and GPUs,
unless --trainer.accelerator cpu) per node, pre-emptible and requeued into the same run directory,
<save_dir>/<name>/slurm-<job id>. SBATCH OPTIONS (e.g. --partition=gpu --time=1-00:00:00) go to sbatch.
Without `--`, all arguments are FIT ARGUMENTS.

example: lit-score submit --time=1-00:00:00 -- --config experiments/quickstart.yaml --trainer.devices 4"""


def submit_main(argv: list[str]) -> int:
    """``lit-score submit``: prints the job id and run directory (or, with ``--dry-run``, the command)."""
    if "-h" in argv[: argv.index("--") if "--" in argv else len(argv)] or "--help" in argv[:1]:
        print(USAGE)
        return 0
    if "--" in argv:
        split = argv.index("--")
        own, fit_args = argv[:split], argv[split + 1:]
    else:
        own, fit_args = [], argv
    dry_run, template, sbatch_args = False, None, []
    i = 0
    while i < len(own):
        if own[i] == "--dry-run":
            dry_run = True
        elif own[i] == "--template" and i + 1 < len(own):
            template, i = own[i + 1], i + 1
        elif own[i].startswith("--template="):
            template = own[i].split("=", 1)[1]
        else:
            sbatch_args.append(own[i])
        i += 1
    if not fit_args:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        submission = build_submission(fit_args, sbatch_args, template)
    except (ValueError, FileNotFoundError) as err:
        print(f"lit-score submit: error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        print(submission)
        return 0
    try:
        job_id = submission.submit()
    except (FileNotFoundError, RuntimeError) as err:
        print(f"lit-score submit: error: {err}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}; run directory {submission.run_dir(job_id)}")
    return 0
