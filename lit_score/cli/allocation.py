"""SLURM pre-flight inside a job: the allocation SLURM gave against the Trainer's ``num_nodes`` x ``devices``."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import lightning as L

from lit_score.errors import UserError


class SlurmAllocationError(UserError, RuntimeError):
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
