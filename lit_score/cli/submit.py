"""``lit-score submit``: submits an experiment with the packaged sbatch templates (the repository's ``slurm/``),
after checking the request against the partition's nodes."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lit_score.cli.lightning_cli import ScoreCLI
from lit_score.cli.config import expand_config_args
from lit_score.errors import UserError
from lit_score.cli.resources import sbatch_dir

GPU_ACCELERATORS = ("gpu", "cuda", "auto")


class PreflightError(UserError, ValueError):
    """A job that the partition's nodes cannot hold: it would stay pending forever."""


@dataclass
class Request:
    """What a job asks of each node: tasks, CPUs per task, GPUs, memory (MB, None: unspecified)."""

    partition: str | None
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    mem_mb: int | None = None


@dataclass
class NodeGroup:
    """One line of ``sinfo``: ``count`` nodes of a partition with the same CPUs, memory (MB) and GPUs."""

    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    count: int
    default: bool = False


def _mem_mb(value: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip().upper())
    if match is None:
        raise ValueError(f"cannot read the memory {value!r}; use e.g. --mem=16G")
    return int(int(match.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match.group(2)])


def parse_sinfo(text: str) -> list[NodeGroup]:
    """``sinfo -h -o '%P|%c|%m|%G|%D'`` -> node groups."""
    groups = []
    for line in text.splitlines():
        if not line.strip():
            continue
        partition, cpus, mem, gres, count = line.strip().split("|")
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        groups.append(NodeGroup(partition.rstrip("*"), int(cpus.rstrip("+")), int(mem.rstrip("+")), gpus,
                                int(count), partition.endswith("*")))
    return groups


def preflight_errors(request: Request, groups: list[NodeGroup]) -> list[str]:
    """Why the nodes of ``request.partition`` (the default partition if None) cannot run the job, each with the
    option that fixes it; empty when enough nodes fit."""
    groups = [g for g in groups if (g.partition == request.partition if request.partition else g.default)]
    where = f"partition {request.partition!r}" if request.partition else "the default partition"
    if not groups:
        return [f"{where} has no nodes (sinfo shows none): pick a partition that `sinfo -s` lists, with "
                f"--partition=NAME before `--`"]
    cpus = request.tasks_per_node * request.cpus_per_task
    errors = []
    most_cpus = max(g.cpus for g in groups)
    if cpus > most_cpus:
        per_task = most_cpus // request.tasks_per_node
        fix = (f"pass --cpus-per-task={per_task} before `--`" if per_task else
               f"use fewer devices per node (--trainer.devices {most_cpus})")
        errors.append(f"the nodes of {where} have at most {most_cpus} CPUs, but the job asks "
                      f"{request.tasks_per_node} task(s) x {request.cpus_per_task} CPUs per node: {fix}, or "
                      f"pick a partition with larger nodes (--partition)")
    most_gpus = max(g.gpus for g in groups)
    if request.gpus_per_node > most_gpus:
        fix = ("train on CPUs (--trainer.accelerator cpu) or pick a GPU partition (--partition)" if not most_gpus
               else f"set --trainer.devices {most_gpus} (and more --trainer.num_nodes)")
        errors.append(f"the nodes of {where} have at most {most_gpus} GPUs, but the job asks "
                      f"{request.gpus_per_node} per node: {fix}")
    most_mem = max(g.mem_mb for g in groups)
    if request.mem_mb is not None and request.mem_mb > most_mem:
        errors.append(f"the nodes of {where} have at most {most_mem} MB of memory, but the job asks "
                      f"{request.mem_mb} MB per node: pass a smaller --mem (e.g. --mem={most_mem}M) before `--`")
    if not errors:
        fits = sum(g.count for g in groups if g.cpus >= cpus and g.gpus >= request.gpus_per_node
                   and (request.mem_mb is None or g.mem_mb >= request.mem_mb))
        if fits < request.nodes:
            errors.append(f"{where} has {fits} node(s) that fit the job, but it asks {request.nodes}: set "
                          f"--trainer.num_nodes {fits}")
    return errors


def _sbatch_options(args: list[str]) -> dict[str, str]:
    """The long options (and -c, -p, -N) of sbatch arguments or ``#SBATCH`` lines; later ones win."""
    short = {"-c": "cpus-per-task", "-p": "partition", "-N": "nodes"}
    options: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            options[key] = value
        elif arg in short and i + 1 < len(args):
            options[short[arg]], i = args[i + 1], i + 1
        elif arg[:2] in short and len(arg) > 2:
            options[short[arg[:2]]] = arg[2:]
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            options[arg[2:]], i = args[i + 1], i + 1
        i += 1
    return options


def _template_options(template: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in template.read_text().splitlines()
            if line.startswith("#SBATCH ") and len(line.split(None, 1)) > 1]


def sinfo_groups() -> list[NodeGroup]:
    """The node groups of every partition, from ``sinfo``."""
    result = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"sinfo failed ({result.returncode}): {result.stderr.strip()}")
    return parse_sinfo(result.stdout)


@dataclass
class Submission:
    """An experiment's SLURM job: the sbatch command line, what it asks of each node and where the run writes."""

    command: list[str]
    run_root: Path
    request: Request | None = None

    def __str__(self) -> str:
        return shlex.join(self.command)

    def preflight(self) -> None:
        """Raises :class:`PreflightError` if the partition's nodes cannot hold the job (``sinfo``)."""
        if self.request is None or shutil.which("sinfo") is None:
            return
        errors = preflight_errors(self.request, sinfo_groups())
        if errors:
            raise PreflightError("; ".join(errors))

    def submit(self) -> str:
        """Checks the request against the partition, runs sbatch; returns the job id."""
        if shutil.which("sbatch") is None:
            raise FileNotFoundError("sbatch not found; submit from a SLURM login node")
        self.preflight()
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
                     python: str | None = None, max_restarts: int = 3) -> Submission:
    """The ``sbatch`` command that trains ``lit-score fit <fit_args>`` on ``trainer.num_nodes`` nodes with
    ``trainer.devices`` tasks (and GPUs, unless the accelerator is ``cpu``) each, requeued after at most
    ``max_restarts`` crashes; ``sbatch_args`` come last and win."""
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"--max-restarts must be a whole number >= 0, got {max_restarts!r}")
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
        template = sbatch_dir() / ("single_node.sbatch" if num_nodes == 1 else "multi_node.sbatch")
    if not Path(template).is_file():
        raise FileNotFoundError(f"sbatch template not found: {template}")
    accelerator = str(trainer.accelerator).lower()
    gpus = devices if accelerator in GPU_ACCELERATORS else 0
    export = (f"ALL,LIT_SCORE_RUN_ROOT={run_root},PYTHON={python or sys.executable},"
              f"LIT_SCORE_MAX_RESTARTS={max_restarts}")
    ours = [f"--job-name={name}", f"--nodes={num_nodes}", f"--ntasks-per-node={devices}",
            f"--gpus-per-node={gpus}", f"--export={export}", f"--output={run_root}/slurm-%j.out"]
    command = ["sbatch", "--parsable", *ours, *sbatch_args, str(template), *fit_args]
    options = _sbatch_options([*_template_options(Path(template)), *ours, *sbatch_args])
    try:
        cpus_per_task = int(options.get("cpus-per-task", 1))
        mem = _mem_mb(options["mem"]) if "mem" in options else (
            _mem_mb(options["mem-per-cpu"]) * cpus_per_task * devices if "mem-per-cpu" in options else None)
        request = Request(options.get("partition"), int(options["nodes"]), int(options["ntasks-per-node"]),
                          cpus_per_task, int(str(options["gpus-per-node"]).split(":")[-1]), mem or None)
    except ValueError as err:
        raise ValueError(f"cannot read the sbatch options {sbatch_args}: {err}") from None
    return Submission(command, run_root, request)


USAGE = """usage: lit-score submit [--dry-run] [--template FILE] [--max-restarts N] [SBATCH OPTIONS] -- FIT ARGUMENTS

Submits `lit-score fit FIT ARGUMENTS` as a SLURM job: trainer.num_nodes nodes, trainer.devices tasks (and GPUs,
unless --trainer.accelerator cpu) per node, pre-emptible and requeued into the same run directory,
<save_dir>/<name>/slurm-<job id>. A training process that dies requeues the job, at most --max-restarts times
(default 3). Before submitting, the CPUs, GPUs and memory asked per node are checked against the partition's
nodes (sinfo). SBATCH OPTIONS (e.g. --partition=gpu --time=1-00:00:00) go to sbatch.
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
    dry_run, template, sbatch_args, max_restarts = False, None, [], "3"
    i = 0
    while i < len(own):
        if own[i] == "--dry-run":
            dry_run = True
        elif own[i] == "--max-restarts" and i + 1 < len(own):
            max_restarts, i = own[i + 1], i + 1
        elif own[i].startswith("--max-restarts="):
            max_restarts = own[i].split("=", 1)[1]
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
    if not max_restarts.isdigit():
        print(f"lit-score submit: error: --max-restarts must be a whole number >= 0, got {max_restarts!r}",
              file=sys.stderr)
        return 2
    try:
        submission = build_submission(fit_args, sbatch_args, template, max_restarts=int(max_restarts))
    except (ValueError, FileNotFoundError) as err:
        print(f"lit-score submit: error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        print(submission)
        return 0
    try:
        job_id = submission.submit()
    except PreflightError as err:
        print(f"lit-score submit: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as err:
        print(f"lit-score submit: error: {err}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}; run directory {submission.run_dir(job_id)}")
    return 0
