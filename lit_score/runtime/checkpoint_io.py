"""Checkpoint files that are either whole or absent: written to a temporary file beside the target, flushed to
disk and renamed over it, so a crash or ``kill -9`` during a save leaves the previous checkpoint intact."""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from fsspec.utils import get_protocol

from lit_score.errors import CheckpointError, exception_chain

TMP_MARK = ".tmp-"


def is_local_file(path: str | Path) -> bool:
    """Whether ``path`` names a local file (no fsspec protocol such as s3://)."""
    return get_protocol(str(path)) == "file"


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is truncated or not a checkpoint at all."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint that could not be written (disk full, quota, permission, read-only or failing file system)."""


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` archive (its zip directory and CRCs), or None if it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return str(err) or type(err).__name__
    return None if bad is None else f"member {bad} fails its CRC check"


def newest_good_checkpoint(directory: str | Path, exclude: str | Path | None = None) -> Path | None:
    """The most recently written complete ``*.ckpt`` in ``directory`` other than ``exclude``."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    candidates = [p for p in Path(directory).glob("*.ckpt") if p.is_file() and p.resolve() != excluded]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(candidate) is None:
            return candidate
    return None


def corrupt_message(path: str | Path, problem: str) -> str:
    """One line naming the bad file and the checkpoint to use instead."""
    good = newest_good_checkpoint(Path(path).parent, exclude=path)
    fix = (f"the newest good checkpoint beside it is {good}: pass --ckpt_path {good}" if good is not None
           else "no good checkpoint lies beside it")
    return f"checkpoint {path} is truncated or corrupt ({problem}); {fix}"


def human_size(size: float) -> str:
    """``size`` bytes as ``512 B``, ``1.2 MiB``, ``3.4 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{size:.0f} {units[i]}" if i == 0 else f"{size:.1f} {units[i]}"


def os_error(err: BaseException) -> OSError | None:
    """The OSError that ``err`` is or arose from (``torch.save`` turns a failed write into a RuntimeError)."""
    return next((e for e in exception_chain(err) if isinstance(e, OSError)), None)


def save_failed_message(path: str | Path, err: OSError, exclude: str | Path | None = None,
                        replaced: bool = False) -> str:
    """One line naming the file that could not be written, why, the free space there and the newest intact
    checkpoint beside it (other than ``exclude``) to resume from; ``replaced``: ``path`` is the new file."""
    path = Path(path)
    folder = path.parent
    while not os.path.isdir(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{human_size(shutil.disk_usage(folder).free)} free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    try:
        good = newest_good_checkpoint(path.parent, exclude=exclude)
    except OSError:
        good = None
    same = " (the previous one, unchanged)" if good is not None and good.name == path.name and not replaced else ""
    fix = (f"the newest intact checkpoint is {good}{same}: once the folder is writable and has room, resume with "
           f"--ckpt_path {shlex.quote(str(good))}" if good is not None
           else f"no intact checkpoint is in {path.parent} to resume from")
    return f"could not write checkpoint {path}: {err.strerror or err} ({free}); {fix}"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``. A failed write
    (an OSError: disk full, quota, permission) removes the temporary file, leaves ``path`` as it was and raises
    :class:`CheckpointSaveError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    replaced = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. EROFS: then there is no temporary file either
        cause = os_error(err) if isinstance(err, Exception) else None
        if cause is None:
            raise
        raise CheckpointSaveError(save_failed_message(path, cause, tmp, replaced)) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes, and a :class:`CorruptCheckpointError` naming
    the newest good checkpoint beside a file that cannot be read."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not is_local_file(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception:
            problem = checkpoint_problem(path) if is_local_file(path) else None
            if problem is None:
                raise
            raise CorruptCheckpointError(corrupt_message(path, problem)) from None


def state_mismatch(module: torch.nn.Module, state: dict[str, Any]) -> str | None:
    """How ``state``'s keys and shapes differ from ``module``'s (the first few of each kind), or None."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
             for what, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                 ("shape mismatch(es), checkpoint vs model", shapes)) if items]
    return "; ".join(parts) or None
