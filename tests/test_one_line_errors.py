"""A mistake in the options, an experiment YAML or an image folder is one line on stderr (and the traceback hint),
exit status 2, before any run folder exists: an unknown option or key with the closest valid names (and the YAML
file and line), a value a class refuses with its config key, the unreadable images of a folder named and counted.

One test runs the console script (the YAML's file is recovered from the command line the user typed); the others
call the command-line functions in-process, as the console scripts do."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_score.cli.lightning_cli import run_cli
from lit_score.errors import run_reporting_errors
from lit_score.evaluate.experiment import build_experiment
from test_data_image import write_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HINT = "(the full traceback: --traceback or LIT_SCORE_TRACEBACK=1)"
QUICKSTART = ["--config", "quickstart"]


def status_and_stderr(run, capsys, prog: str = "lit-score") -> tuple[int, list[str]]:
    """The exit status of ``run`` as the console scripts report it, and the lines it wrote on stderr."""
    try:
        status = run_reporting_errors(lambda: run() and 0, prog)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.strip().splitlines()


def assert_one_line(status: int, lines: list[str], *expected: str, prog: str = "lit-score") -> None:
    assert status == 2, lines[-10:]
    assert len(lines) <= 3 and lines[-1] == HINT and lines[-2].startswith(f"{prog}: error: "), lines[-10:]
    for text in expected:
        assert text in lines[-2], (text, lines[-2])


@pytest.mark.slow  # a CLI start (~8 s); a misspelt key on the command line is in test_cli.py
def test_a_misspelt_key_in_an_experiment_yaml_names_the_file_the_line_and_the_closest_key(tmp_path):
    """The console script: the YAMLs reach jsonargparse composed, as inline documents; the message still names
    the file the user gave, and the line of the key."""
    (tmp_path / "mine.yaml").write_text(f"defaults: [{ROOT / 'experiments' / 'quickstart.yaml'}]\n"
                                        "model:\n  net: {init_args: {nff: 8}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LIT_SCORE_TRACEBACK", None)
    proc = subprocess.run([str(BIN / "lit-score"), "fit", "--config", "mine.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert_one_line(proc.returncode, lines, "unknown key model.net.init_args.nff in mine.yaml, line 3",
                    "did you mean model.net.init_args.nf?")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, expected", [
    (["--model.lrr", "1e-3"], "unknown option --model.lrr; did you mean --model.lr?"),
    (["--trainer.max_step", "10"], "unknown option --trainer.max_step; did you mean --trainer.max_steps?"),
    (["--model.net.init_args.nff", "8"], "did you mean --model.net.init_args.nf?"),
    (["--dat.init_args.batch_size", "8"], "did you mean --data.init_args.batch_size?"),
    (["--config", "trainer: {max_step: 10}"], "unknown key trainer.max_step; did you mean trainer.max_steps?"),
], ids=["model", "abbreviation", "class-argument", "section", "yaml"])
def test_an_unknown_option_names_the_closest_valid_one(args, expected, tmp_path, monkeypatch, capsys):
    """No usage dump: one line with the closest names (an abbreviation is no longer taken for the option)."""
    monkeypatch.chdir(tmp_path)
    status, lines = status_and_stderr(lambda: run_cli(["fit", *QUICKSTART, *args, "--print_config"]), capsys)
    assert_one_line(status, lines, expected)


@pytest.mark.parametrize("args, expected", [
    (["--model.lr=-1e-3"], "model.lr must be > 0, got -0.001 (lit_score.runtime.module.ScoreModel)"),
    (["--model.warmup=-1"], "model.warmup must be >= 0"),
    (["--ema_rate", "1.5"], "init_args.rate (of the EMA) must be in (0, 1), got 1.5"),
    (["--model.loss", "DSMLoss", "--model.loss.init_args.eps", "0"], "model.loss.init_args.eps"),
    (["--model.sde.init_args.N", "0"], "model.sde.init_args.N (the number of discretisation steps) must be >= 1"),
    (["--model.sde.init_args.beta_max", "0.01"], "0 <= beta_min < beta_max, got beta_min=0.1, beta_max=0.01"),
    (["--data.init_args.batch_size", "0"], "data.init_args.batch_size must be >= 1, got 0"),
    (["--data.init_args.val_fraction", "1.5"], "data.init_args.val_fraction must be in (0, 1)"),
], ids=["lr", "warmup", "ema-rate", "loss-eps", "sde-N", "sde-beta", "batch-size", "val-fraction"])
def test_a_value_out_of_range_is_named_by_its_key(args, expected, capsys):
    status, lines = status_and_stderr(lambda: build_experiment("quickstart", args), capsys)
    assert_one_line(status, lines, expected)


def test_a_sampler_value_a_class_refuses_stops_predict_before_its_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, lines = status_and_stderr(lambda: run_cli(
        ["predict", *QUICKSTART, "--untrained", "--model.sampler", "PCSampler", "--model.sampler.init_args.steps",
         "-5"]), capsys)
    assert_one_line(status, lines, "model.sampler.init_args.steps", "got -5", "PCSampler")
    assert not (tmp_path / "runs").exists()


def test_unreadable_images_stop_fit_before_its_run_folder(tmp_path, monkeypatch, capsys):
    """Two corrupt PNGs of a folder: named and counted in one line, with the option that skips them, before
    the Trainer writes anything."""
    paths = write_images(tmp_path / "images", [(32, 32)] * 24)
    paths[5].write_bytes(paths[5].read_bytes()[:200])
    paths[9].write_bytes(b"no image")
    monkeypatch.chdir(tmp_path)
    status, lines = status_and_stderr(lambda: run_cli(
        ["fit", "--config", "imagefolder_small", "--data.init_args.path", "images", "--data.init_args.val_size",
         "2", "--data.init_args.num_workers", "0", "--trainer.max_steps", "1"]), capsys)
    assert_one_line(status, lines, "2 of 24 images of images", "img_005.png", "img_009.png (not an image)",
                    "data.init_args.skip_unreadable true")
    assert not (tmp_path / "runs").exists()


def test_lit_score_eval_names_the_closest_option(tmp_path, monkeypatch, capsys):
    from lit_score.evaluate.cli import run

    monkeypatch.setattr(sys, "argv", [str(BIN / "lit-score-eval")])
    monkeypatch.chdir(tmp_path)
    status, lines = status_and_stderr(lambda: run([*QUICKSTART, "--evaluation.num_sampels", "8"]), capsys,
                                      prog="lit-score-eval")
    assert_one_line(status, lines, "did you mean --evaluation.num_samples?", prog="lit-score-eval")
