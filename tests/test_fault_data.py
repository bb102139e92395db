"""A training image that becomes unreadable mid-run (its folder gone from a network file system): the run saves
``last.ckpt`` at the last completed optimizer step and stops with one line naming the file and that checkpoint;
once the file is back, the resumed run ends bitwise equal to an uninterrupted one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import yaml
from PIL import Image

from test_resume import ENV, TINY, assert_same_curve, assert_same_state, fit, last_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


class MoveFolderAfterStep(L.Callback):
    """Renames ``folder`` (to ``<folder>.away``) once optimizer step ``step`` is done."""

    def __init__(self, folder: str, step: int) -> None:
        self.folder, self.step = Path(folder), step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.folder.is_dir():
            self.folder.rename(self.folder.with_name(self.folder.name + ".away"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """48 random 8x8 RGB PNGs: 40 training images (5 batches of 8 an epoch) and 8 validation images."""
    folder = tmp_path_factory.mktemp("data") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def write_config(tmp_path: Path, name: str, images: Path, extra_callbacks: list[dict] = (),
                 num_workers: int = 0) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    for key in ("num_classes", "label_dropout"):  # the folder has no classes
        del config["model"]["net"]["init_args"][key]
    config["data"] = {"class_path": "lit_score.data.ImageDataModule",
                      "init_args": {"dataset": "huggingface", "path": str(images), "image_size": 8, "centered": True,
                                    "batch_size": 8, "val_size": 8, "num_workers": num_workers,
                                    "pin_memory": False}}
    config["trainer"]["limit_val_batches"] = 1
    config["trainer"]["callbacks"] += list(extra_callbacks)
    config["trainer"]["logger"] = {"init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images) -> tuple[dict, Path]:
    tmp_path = tmp_path_factory.mktemp("reference")
    fit(write_config(tmp_path, "plain", images), "plain")
    return last_checkpoint(tmp_path, "plain"), tmp_path / "runs/tiny/plain"


def fit_process(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_score", "fit", "--config", str(config),
                           "--trainer.logger.init_args.version", "run"], env=ENV, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # ~25 s each with the reference run (make test-slow, in CI)
@pytest.mark.parametrize("step", [9, 8])  # 8: a validation step, which the image folder's loss also cuts short
def test_an_image_gone_mid_run_saves_the_last_step_and_resume_is_exact(tmp_path, images, reference, step):
    moving = {"class_path": "test_fault_data.MoveFolderAfterStep", "init_args": {"folder": str(images),
                                                                                  "step": step}}
    away = images.with_name(images.name + ".away")
    try:
        stopped = fit_process(write_config(tmp_path, "break", images, [moving]))
    finally:
        if away.is_dir():
            away.rename(images)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("lit-score:")]
    assert len(lines) == 1, stopped.stderr[-3000:]
    last = tmp_path / "runs/tiny/run/checkpoints/last.ckpt"
    assert lines[0].startswith(f"lit-score: error: cannot read image '{images}/"), lines[0]
    assert lines[0].endswith(f"; {last} is at step {step}, the last completed step: repair or remove the file, "
                             f"then resume with `lit-score fit --resume {tmp_path}/runs/tiny/run`"), lines[0]
    assert last_checkpoint(tmp_path, "run")["global_step"] == step

    fit(write_config(tmp_path, "resume", images), "run", "--ckpt_path", "last")
    assert_same_state(last_checkpoint(tmp_path, "run"), reference[0])
    for curve in ("train/loss", "val/loss"):
        assert_same_curve(tmp_path / "runs/tiny/run", reference[1], curve)
