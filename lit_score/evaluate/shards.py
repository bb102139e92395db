"""Finished pieces of an evaluation kept on disk, so that a restarted run skips them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lit_score.callbacks.preemption import raise_if_stop_requested


class ShardStore:
    """Shard ``i`` is the file ``<directory>/shard_<i>.pt``, written atomically (temporary file, then rename) and
    stamped with ``fingerprint``: a file that is there is a finished shard of this protocol."""

    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.directory, self.fingerprint = Path(directory), fingerprint

    def path(self, index: int) -> Path:
        return self.directory / f"shard_{index:06d}.pt"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def pending(self, num_shards: int) -> list[int]:
        """Shards not yet on disk; leftovers of interrupted writes are removed."""
        if self.directory.is_dir():
            for leftover in self.directory.glob("*.tmp*"):
                leftover.unlink(missing_ok=True)
        return [i for i in range(num_shards) if not self.done(i)]

    def save(self, index: int, payload: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(index)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save({**payload, "index": index, "fingerprint": self.fingerprint}, tmp)
        tmp.replace(path)
        raise_if_stop_requested(f"shard {index}")  # a signal waits for the shard being sampled

    def load(self, index: int) -> dict[str, Any]:
        path = self.path(index)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("fingerprint") != self.fingerprint or payload.get("index") != index:
            raise ValueError(f"{path} belongs to another evaluation (fingerprint {payload.get('fingerprint')!r}, "
                             f"expected {self.fingerprint!r}); use a fresh out_dir or delete it")
        return payload
