"""CPU threads: as many intra-op threads as CPUs the process may use, and OpenMP threads that sleep when they wait.

With OpenMP's default (active) waiting, a thread whose peer was descheduled by another process spins on the barrier:
on a busy 2-core machine one quickstart-network evaluation with 2 threads took 800 ms against 42 ms with passive
waiting (``python -m benchmarks.threads``). ``OMP_WAIT_POLICY`` is read once, when torch loads its OpenMP runtime, so
``prefer_passive_wait`` runs when ``lit_score`` is imported, before it imports torch. Nothing here imports torch at
module level.
"""
from __future__ import annotations

import os
import sys


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy; True if it can still take effect (torch not
    yet imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all CPUs where there is no mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, and at most SLURM's ``--cpus-per-task`` under SLURM."""
    n = affinity_cpus()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else the available CPUs shared among the node's processes when a launcher
    said how many (``LOCAL_WORLD_SIZE``)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, available_cpus() // (int(local) if local.isdigit() and int(local) > 0 else 1))


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: ``default_threads()``); an explicit count also goes into
    ``OMP_NUM_THREADS`` for the processes this one launches (Lightning then keeps it). Returns the count."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive number of threads, got {threads}")
        os.environ["OMP_NUM_THREADS"] = str(threads)
    n = default_threads() if threads is None else threads
    torch.set_num_threads(n)
    return n


def pop_threads_arg(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` without ``--threads N`` / ``--threads=N``, and N (None when absent)."""
    out, threads, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--threads=") else None)
        if arg == "--threads" or arg.startswith("--threads="):
            if value is None or not value.isdigit() or int(value) < 1:
                raise ValueError(f"--threads needs a positive integer, got {value!r}")
            threads = int(value)
            i += 2 if arg == "--threads" else 1
            continue
        out.append(arg)
        i += 1
    return out, threads
