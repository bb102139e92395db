"""The few torch.distributed collectives used outside Lightning's hooks; no-ops in a single process."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def close() -> None:
    """Wait for every rank, then take the process group down together: a rank that exits while its peer still
    holds the group can abort (gloo's "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (picklable objects; CPU tensors)."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def gather_to_zero(value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 only (None elsewhere); picklable objects, CPU tensors."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    values: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(value, values, dst=0)
    return values
