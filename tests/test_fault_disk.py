"""A checkpoint that cannot be written (disk full, read-only file system) ends `lit-score fit` with exit status 2
and one line naming the file, the reason, the free space and the newest intact checkpoint with the option that
resumes from it; the checkpoints already written stay byte for byte, no temporary file is left, and resuming
from the named checkpoint reaches the state of an uninterrupted run bit for bit."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import IN_CI
from lit_score.errors import report, user_error
from lit_score.runtime.checkpoint_io import CheckpointSaveError, atomic_torch_save, checkpoint_problem, sha256
from test_resume import ENV, MAX_STEPS, assert_same_state, fit, fit_process, last_checkpoint, loss_curve, write_config

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

FREE = re.compile(r" \((\d+|\d+\.\d) (B|KiB|MiB|GiB|TiB|PiB) free in [^)]+\); ")


class _FillingFile(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that reaches them is short, the next fails with
    ENOSPC, as the kernel's do."""

    def __init__(self, file: str | os.PathLike, room: int) -> None:
        super().__init__(file, "wb")
        self.room = room

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        if self.room == 0 and len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(data[: self.room])
        self.room -= written
        return written


def filling_open(folder: str | Path, room: int) -> Callable[..., Any]:
    """``open`` for which a file opened for binary writing in ``folder`` fills up after ``room`` bytes."""
    real, folder = builtins.open, os.path.realpath(folder)

    def opener(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if ("w" in mode and "b" in mode and isinstance(file, (str, os.PathLike))
                and os.path.dirname(os.path.realpath(file)) == folder):
            return io.BufferedWriter(_FillingFile(file, room))
        return real(file, mode, *args, **kwargs)

    return opener


class DiskFullAt(L.Callback):
    """Before the batch that makes optimizer step ``step``: writes the SHA-256 of every checkpoint to ``record``
    (JSON), then, unless ``room`` is None, makes each file written into the checkpoint folder from then on fail
    with ENOSPC after ``room`` bytes (through the real save code: ``builtins.open`` is replaced in this process)."""

    def __init__(self, step: int, record: str, room: int | None = 4096) -> None:
        self.step, self.record, self.room = step, record, room

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.step - 1 or trainer.sanity_checking:
            return
        folder = Path(trainer.checkpoint_callback.dirpath)
        Path(self.record).write_text(json.dumps({p.name: sha256(p) for p in folder.glob("*.ckpt")}))
        if self.room is not None:
            builtins.open = filling_open(folder, self.room)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> tuple[dict, Path]:
    """The final checkpoint and checkpoint folder of an uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    assert fit(write_config(tmp_path, "plain"), "plain").global_step == MAX_STEPS
    return last_checkpoint(tmp_path, "plain"), tmp_path / "runs/tiny/plain/checkpoints"


def fit_command(config: Path, version: str) -> list[str]:
    """The command line of test_resume's ``fit_process``."""
    return [sys.executable, "-m", "lit_score", "fit", "--config", str(config), "--trainer.logger.init_args.version",
            version]


def mount_problem() -> str | None:
    """Why this user cannot mount a file system in a user and mount namespace of its own, or None if it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", folder], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount in a namespace of its own: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def can_mount() -> None:
    """Skips where mounting is not allowed (a failure under CI=true, whose machine must allow it)."""
    problem = mount_problem()
    if problem is not None:
        (pytest.fail if IN_CI else pytest.skip)(problem)


def fit_on_mount(tmp_path: Path, mount: str, config: Path, version: str) -> subprocess.CompletedProcess:
    """``lit-score fit`` in a user and mount namespace of its own where ``mount`` (a shell command on "$1", the run's
    checkpoint folder) has run first; the files the run left there are then copied into that folder here."""
    folder = tmp_path / "runs/tiny" / version / "checkpoints"
    folder.mkdir(parents=True)
    copied = tmp_path / "copied"
    copied.mkdir()
    script = f'{mount} || exit 97; dir=$1; out=$2; shift 2; "$@"; status=$?; cp -a "$dir"/. "$out"; exit $status'
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(folder),
                           str(copied), *fit_command(config, version)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 97, f"could not mount: {proc.stderr[-2000:]}"
    shutil.copytree(copied, folder, dirs_exist_ok=True)
    return proc


def error_line(proc: subprocess.CompletedProcess, path: Path, reason: str, newest: Path | None) -> str:
    """The one error line of a run whose save to ``path`` failed with ``reason``, checked: exit status 2, the
    line and the traceback hint end stderr, it names the free space and ``newest`` (None: that there is none)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    assert len([line for line in lines if line.startswith("lit-score: error:")]) == 1, proc.stderr[-3000:]
    line, hint = lines[-2:]
    assert hint == "(the full traceback: --traceback or LIT_SCORE_TRACEBACK=1)"
    assert line.startswith(f"lit-score: error: could not write checkpoint {path}: {reason} ("), line
    assert FREE.search(line), line
    if newest is None:
        assert line.endswith(f"; no intact checkpoint is in {path.parent} to resume from"), line
    else:
        assert f"; the newest intact checkpoint is {newest}" in line and line.endswith(f"--ckpt_path {newest}"), line
    assert "Traceback" not in proc.stderr
    return line


def test_a_failed_write_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    """atomic_torch_save onto a full disk: CheckpointSaveError (a one-line UserError from the OSError, which
    torch.save wraps in a RuntimeError), the previous file byte for byte, no temporary file; errors that are not
    the file system's pass unchanged."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(builtins, "open", filling_open(tmp_path, 1000))
    with pytest.raises(CheckpointSaveError) as err:
        atomic_torch_save({"step": 2, "w": torch.zeros(10**5)}, path)
    message = str(err.value)
    assert "\n" not in message and user_error(err.value) is err.value
    assert message.startswith(f"could not write checkpoint {path}: No space left on device ("), message
    assert FREE.search(message), message
    assert message.endswith(f"is {path} (the previous one, unchanged): once the folder is writable and has room, "
                            f"resume with --ckpt_path {path}"), message
    assert isinstance(err.value.__cause__, RuntimeError) and isinstance(err.value.__cause__.__context__, OSError)
    assert report(err.value).splitlines()[0] == f"lit-score: error: {message}"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()

    monkeypatch.setattr(builtins, "open", filling_open(tmp_path / "new", 0))
    with pytest.raises(CheckpointSaveError, match=r"; no intact checkpoint is in \S+new to resume from$"):
        atomic_torch_save({"w": torch.zeros(10**5)}, tmp_path / "new/last.ckpt")
    assert list((tmp_path / "new").iterdir()) == []
    monkeypatch.undo()

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("boom")

    with pytest.raises(pickle.PicklingError, match="boom"):
        atomic_torch_save({"x": Unpicklable()}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "new"]


@pytest.mark.slow  # ~25 s with its reference run
def test_a_full_disk_at_the_last_save_ends_the_run_in_one_line_and_resume_is_exact(tmp_path, reference):
    """The disk fills during the final save of last.ckpt (step 14): exit 2, one line naming last.ckpt, the free
    space and last.ckpt itself (step 12, byte for byte as before) as the newest intact checkpoint; no temporary
    file; resuming with the --ckpt_path it gives reaches the uninterrupted run's state."""
    record = tmp_path / "before.json"
    config = write_config(tmp_path, "full", [{"class_path": "test_fault_disk.DiskFullAt",
                                               "init_args": {"step": MAX_STEPS, "record": str(record)}}])
    failed = fit_process(config, "run")
    folder = tmp_path / "runs/tiny/run/checkpoints"
    last = folder / "last.ckpt"
    error_line(failed, last, "No space left on device", newest=last)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=6.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]
    assert json.loads(record.read_text()) == {p.name: sha256(p) for p in folder.iterdir()}
    assert torch.load(last, weights_only=True)["global_step"] == 12
    resumed = fit(write_config(tmp_path, "resume"), "run", "--ckpt_path", str(last))
    assert resumed.global_step == MAX_STEPS
    assert_same_state(last_checkpoint(tmp_path, "run"), reference[0])


@pytest.mark.slow
def test_a_really_full_file_system_stops_the_run_at_that_step(tmp_path, reference, can_mount):
    """A tmpfs with room for three checkpoints and a half: the saves at step 12 write epoch=2-step=12.ckpt, then
    last.ckpt fails (ENOSPC from the kernel): exit 2, one line naming last.ckpt and epoch=2-step=12.ckpt as the
    newest intact checkpoint; last.ckpt is still step 6's byte for byte, no temporary file, nothing trained or
    logged after step 12; resuming from the named checkpoint reaches the uninterrupted run's state."""
    pages = max(-(-p.stat().st_size // 4096) for p in reference[1].iterdir())
    record = tmp_path / "before.json"
    config = write_config(tmp_path, "full", [{"class_path": "test_fault_disk.DiskFullAt",
                                               "init_args": {"step": 12, "record": str(record), "room": None}}])
    failed = fit_on_mount(tmp_path, f'mount -t tmpfs -o size={4 * (3 * pages + pages // 2)}k tmpfs "$1"', config,
                          "run")
    folder = tmp_path / "runs/tiny/run/checkpoints"
    newest = folder / "epoch=2-step=12.ckpt"
    error_line(failed, folder / "last.ckpt", "No space left on device", newest=newest)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=6.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]
    recorded = json.loads(record.read_text())
    assert sorted(recorded) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    assert recorded == {name: sha256(folder / name) for name in recorded}
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    assert checkpoint_problem(newest) is None and torch.load(newest, weights_only=True)["global_step"] == 12
    # The batch that made step k logs at k - 1 after its end hooks: step 12's failed save is its last act.
    assert max(step for step, _ in loss_curve(tmp_path / "runs/tiny/run")) == 10, "nothing logged after step 11"
    resumed = fit(write_config(tmp_path, "resume"), "run", "--ckpt_path", str(newest))
    assert resumed.global_step == MAX_STEPS
    assert_same_state(last_checkpoint(tmp_path, "run"), reference[0])


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_ends_the_run_at_the_first_save(tmp_path, can_mount):
    """The checkpoint folder is a read-only mount (EROFS: root, too, cannot write there): the first save (step 6)
    ends the run with exit 2 and one line saying no intact checkpoint exists; nothing is left in the folder."""
    config = write_config(tmp_path, "readonly")
    failed = fit_on_mount(tmp_path, 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"', config, "run")
    folder = tmp_path / "runs/tiny/run/checkpoints"
    error_line(failed, folder / "epoch=1-step=6.ckpt", "Read-only file system", newest=None)
    assert list(folder.iterdir()) == []
    assert max(step for step, _ in loss_curve(tmp_path / "runs/tiny/run")) == 4, "nothing logged after step 5"
