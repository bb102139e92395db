"""The folder `lit-score export` writes is shareable as it is: ordinary file modes, no path or run version of the
machine that made it, and a model card (README.md) whose commands run for that model and whose statements on
ranges are true."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from lit_score.interop.export import export_main

ROOT = Path(__file__).resolve().parents[1]
RELEASE_CKPT = ROOT / "tests" / "fixtures" / "release_0_1" / "vp_dsm.ckpt"  # a 1x8x8 DDPM++, VP SDE with N = 100
TEXT_FILES = ("README.md", "config.json", "experiment.yaml")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as `lit-score fit` leaves it: checkpoints/last.ckpt and the run's config.yaml, which (as a resumed
    run's does) names absolute paths of this machine, the logger's version and the checkpoint it resumed."""
    run = tmp_path / "machine" / "runs" / "quickstart" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(RELEASE_CKPT, run / "checkpoints" / "last.ckpt")
    config = {
        "seed_everything": 0,
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(run.parents[1]), "name": "quickstart",
                                             "version": "version_0"}},
                    "default_root_dir": str(tmp_path / "machine"), "max_steps": 30},
        "model": {"lr": 0.001},
        "data": {"class_path": "lit_score.data.ImageDataModule",
                 "init_args": {"dataset": "huggingface", "path": str(tmp_path / "machine" / "images"),
                               "image_size": 8, "centered": True}},
        "ckpt_path": str(run / "checkpoints" / "last.ckpt"),
    }
    (run / "config.yaml").write_text("# lightning.pytorch==2.6.6\n" + yaml.safe_dump(config, sort_keys=False))
    return run


def export(run: Path, out: Path) -> Path:
    assert export_main([str(run / "checkpoints" / "last.ckpt"), str(out)]) == 0
    return out


def _with_umask(mask: int, fn: Any) -> Any:
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def test_exported_files_have_ordinary_modes_under_the_umask(run_dir, tmp_path, one_thread, capsys):
    """Property: under umask 022 the folder is 0755 and every file, model.safetensors included, 0644; under
    umask 027, 0750 and 0640 (as any file the user makes), so that the folder can be shared as written."""
    for mask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        out = _with_umask(mask, lambda: export(run_dir, tmp_path / f"shared_{mask:o}" / "tiny"))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert set(modes) == {"model.safetensors", *TEXT_FILES}
        assert modes == dict.fromkeys(modes, file_mode), {k: oct(v) for k, v in modes.items()}
        assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    capsys.readouterr()


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_export_carries_no_path_or_run_version_of_the_machine(run_dir, tmp_path, one_thread, capsys):
    """Property: no exported text file names a path of the machine that made it; experiment.yaml (the run's config)
    has no logger version and no ckpt_path, its logger writes to `runs` wherever it is used, and keeps the run's
    settings; config.json still names the experiment and the checkpoint's file."""
    out = export(run_dir, tmp_path / "shared" / "tiny")
    for name in TEXT_FILES:
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "/machine" not in text, name
    config = json.loads((out / "config.json").read_text())
    experiment = yaml.safe_load((out / "experiment.yaml").read_text())
    for name, tree in (("config.json", config), ("experiment.yaml", experiment)):
        absolute = [s for s in _strings(tree) if os.path.isabs(s) or s.startswith("~")]
        assert not absolute, (name, absolute)
    logger = experiment["trainer"]["logger"]["init_args"]
    assert logger == {"save_dir": "runs", "name": "quickstart", "version": None}
    assert experiment["ckpt_path"] is None and experiment["trainer"]["default_root_dir"] is None
    assert experiment["data"]["init_args"] == {"dataset": "huggingface", "path": None, "image_size": 8,
                                               "centered": True}
    assert experiment["trainer"]["max_steps"] == 30 and experiment["model"] == {"lr": 0.001}
    assert config["experiment"] == {"name": "quickstart", "config": "experiment.yaml", "checkpoint": "last.ckpt"}
    capsys.readouterr()


def card_block(card: str, language: str) -> str:
    """The first fenced code block of ``language`` in the card."""
    match = re.search(rf"```{language}\n(.*?)```", card, re.S)
    assert match, f"no {language} block in the card"
    return match.group(1)


def test_card_python_example_runs_on_the_folder_and_its_ranges_hold(run_dir, tmp_path, monkeypatch, one_thread,
                                                                     capsys):
    """Property: the card's Python block, run as written from the folder that holds the export, samples 16 images;
    what the card says of them holds: `x` is the sampler's output, not clamped (this 30-step model's go well outside
    [-1, 1]), and `images` are uint8 (16, 1, 8, 8), `x` clamped to [-1, 1] and rounded to 256 levels."""
    out = export(run_dir, tmp_path / "shared" / "tiny")
    card = (out / "README.md").read_text()
    monkeypatch.chdir(out.parent)
    namespace: dict[str, Any] = {}
    exec(compile(card_block(card, "python"), "README.md", "exec"), namespace)
    x, images = namespace["x"], namespace["images"]
    assert x.dtype == torch.float32 and x.shape == (16, 1, 8, 8)
    assert "not clamped" in card and "[-1, 1]" in card
    assert x.abs().max() > 1  # so "not clamped" is the statement that holds, not "in [-1, 1]"
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 8, 8)
    assert torch.equal(images, torch.round((x.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8))
    assert "x clamped to [-1, 1]" in card and "0..255" in card
    capsys.readouterr()


def test_card_predict_command_runs_as_written(run_dir, tmp_path, monkeypatch, one_thread):
    """Property: the card's `lit-score predict` command, run as written from the folder that holds the export (no
    YAML, no data), writes samples.npz with the 16 uint8 images (N x H x W x C, 0..255) the card describes."""
    from lit_score.cli.lightning_cli import run_cli

    out = export(run_dir, tmp_path / "shared" / "tiny")
    command = card_block((out / "README.md").read_text(), "bash").strip()
    program, *args = shlex.split(command)
    assert program == "lit-score" and args[0] == "predict"
    monkeypatch.chdir(out.parent)
    run_cli([*args, "--trainer.enable_progress_bar", "false"])
    written = list(out.parent.rglob("samples.npz"))
    assert len(written) == 1, written
    with np.load(written[0]) as f:
        assert f["samples"].dtype == np.uint8 and f["samples"].shape == (16, 8, 8, 1)
        assert sorted(f["seeds"].tolist()) == list(range(16))
