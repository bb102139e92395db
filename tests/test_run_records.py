"""A training run's folder is a record: predict, test, validate and lit-score-eval leave it byte for byte as fit left
it and say where their outputs went; a config that asks for another network, SDE or loss than --ckpt_path's is
refused, not overridden; sampling needs no training data. One tiny run on a folder of images (imagefolder_small's
experiment at 8x8) serves every test; everything runs in this process through the command line's own entry points.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_score.cli.lightning_cli import fit_main, run_cli
from lit_score.errors import CheckpointError, run_reporting_errors
from lit_score.interop.export import export_checkpoint
from lit_score.runtime.upgrade import sampling_state, upgrade_checkpoint
from test_data_image import write_images

TINY = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
        "--model.net.init_args.attn_resolutions", "[]", "--data.init_args.image_size", "8",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
FAST = ["--data.init_args.num_samples", "4", "--model.sampler", "EDMSampler", "--model.sampler.steps", "2",
        "--trainer.enable_progress_bar", "false"]

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One step of imagefolder_small's tiny variant on 24 images, logged under an absolute save_dir."""
    tmp = tmp_path_factory.mktemp("records")
    write_images(tmp / "images", [(8, 8)] * 24)
    run_cli(["fit", "--config", "imagefolder_small", *TINY, "--data.init_args.path", str(tmp / "images"),
             "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--data.init_args.val_size", "8",
             "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
             "--trainer.logger.init_args.save_dir", str(tmp / "runs")])
    run_dir = tmp / "runs" / "imagefolder_small" / "version_0"
    (tmp / "elsewhere").mkdir()
    return {"tmp": tmp, "run": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt",
            "config": run_dir / "config.yaml", "elsewhere": tmp / "elsewhere"}


@pytest.fixture(scope="module")
def export(run) -> Path:
    folder = run["tmp"] / "shared" / "tiny-export"
    export_checkpoint(run["ckpt"], folder)
    return folder


def hashes(folder: Path) -> dict[Path, str]:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def printed(text: str, prefix: str) -> list[Path]:
    """The paths of the lines ``<prefix>: <what>: <path>`` that a command printed."""
    return [Path(line.rsplit(": ", 1)[1]) for line in text.splitlines() if line.startswith(prefix + ": ")]


def lit_score(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``lit-score ARGS`` as the console script runs it: the exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["lit-score", *map(str, args)])
    code = run_reporting_errors(fit_main)
    return code, capsys.readouterr().err


def samples(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as f:
        return f["samples"]


def test_predict_test_and_validate_leave_the_run_as_it_was_and_say_where_they_wrote(run, capsys):
    """Property: predict (twice), test and validate with the run's own config.yaml and last.ckpt leave every file of
    the run byte-identical and add only new folders <run>/<subcommand>_<N>, each printed line naming a file there."""
    before = hashes(run["run"])
    folders_before = {p.name for p in run["run"].iterdir()}
    common = ["--config", str(run["config"]), "--ckpt_path", str(run["ckpt"])]
    launches = [("predict", FAST), ("predict", FAST),
                ("test", ["--trainer.limit_test_batches", "1", "--data.init_args.batch_size", "2",
                          "--model.likelihood", "lit_score.diffusion.likelihood.Likelihood",
                          "--model.likelihood.rtol", "1e-2", "--model.likelihood.atol", "1e-2"]),
                ("validate", ["--trainer.limit_val_batches", "1"])]
    written = []
    for subcommand, extra in launches:
        capsys.readouterr()
        run_cli([subcommand, *common, *extra])
        paths = printed(capsys.readouterr().out, f"lit-score {subcommand}")
        assert paths and all(p.is_file() for p in paths), paths
        [folder] = {p.parent for p in paths}
        assert folder.parent == run["run"] and folder.name.startswith(subcommand + "_")
        written.append((subcommand, folder, {p.name for p in paths}))
    new = {p.name for p in run["run"].iterdir()} - folders_before
    assert new == {folder.name for _, folder, _ in written}
    (_, first, names), (_, second, _) = written[:2]
    assert first != second and {"samples.png", "samples.npz", "config.yaml"} <= names
    assert samples(first).shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(samples(first), samples(second))
    [events] = [folder / name for _, folder, names in written[2:3] for name in names if name.startswith("events")]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "test/bpd" in accumulator.Tags()["scalars"]
    after = {k: v for k, v in hashes(run["run"]).items() if k.parts[0] not in new}
    assert after == before


def test_saved_configs_name_no_machines_run_location(run):
    """Property: the config.yaml that fit saved (with an absolute save_dir on its command line) has a relative
    save_dir, no version and no ckpt_path: fit from it elsewhere makes a new run there. (Inputs, such as the data's
    path, stay as given.)"""
    config = yaml.safe_load(run["config"].read_text())
    logger = config["trainer"]["logger"]["init_args"]
    assert logger["version"] is None and logger["name"] == "imagefolder_small"
    assert not Path(logger["save_dir"]).is_absolute() and str(run["tmp"] / "runs") not in run["config"].read_text()
    assert config["ckpt_path"] is None


def test_a_checkpoint_of_another_network_is_refused_naming_the_options(run, monkeypatch, capsys):
    """Property: fit --ckpt_path with a YAML that builds another network, and predict --ckpt_path with network and
    SDE options that differ from the checkpoint's, exit 2 with one line naming each key and both values and the
    option that does what was meant (no run folder made); predict without weights needs --untrained."""
    monkeypatch.chdir(run["elsewhere"])
    code, err = lit_score(monkeypatch, capsys, "fit", "--config", "imagefolder_small", "--data.init_args.path",
                          run["tmp"] / "images", "--data.init_args.image_size", "8", "--ckpt_path", run["ckpt"])
    [line] = [x for x in err.splitlines() if x.startswith("lit-score: error:")]
    assert code == 2 and "model.net.init_args.nf is 16 here but 8 in the checkpoint" in line, err
    assert "model.net.init_args.ch_mult is [1, 2, 2] here but [1, 2]" in line and "--init_weights" in line
    code, err = lit_score(monkeypatch, capsys, "predict", "--ckpt_path", run["ckpt"], "--model.net.init_args.nf", "32",
                          "--model.sde.init_args.beta_max", "5")
    [line] = [x for x in err.splitlines() if x.startswith("lit-score: error:")]
    assert code == 2 and "model.net.init_args.nf is 32 here but 8 in the checkpoint" in line
    assert "model.sde.init_args.beta_max is 5.0 here but 20.0 in the checkpoint" in line
    code, err = lit_score(monkeypatch, capsys, "predict", "--config", run["config"], *FAST)
    assert code == 2 and "--untrained" in err
    assert not (run["elsewhere"] / "runs").exists()


def test_sampling_needs_no_training_data(run, export, monkeypatch, capsys):
    """Property: predict from the folder experiment's YAML without its data path, from the checkpoint alone, and from
    the export alone in another directory, all sample from seeds in the checkpoint's data space and give the same
    images (the export holds the EMA weights the checkpoint samples with)."""
    images, loads = [], []
    monkeypatch.chdir(run["elsewhere"])
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or load(*args, **kwargs))
    for args in (["--config", "imagefolder_small", *TINY, "--ckpt_path", run["ckpt"]], ["--ckpt_path", run["ckpt"]],
                 ["--ckpt_path", export]):
        loads.clear()
        cli = run_cli(["predict", *map(str, args), *FAST])
        assert type(cli.datamodule).__name__ == "SeedsDataModule"
        [folder] = {p.parent for p in printed(capsys.readouterr().out, "lit-score predict")}
        images.append(samples(folder))
        assert len(loads) == (0 if args[-1] == export else 2), loads  # the CLI's read, then the Trainer's
    assert folder.resolve() == (run["elsewhere"] / "runs" / "tiny-export" / "predict_0").resolve()
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], images[2])


class Capture(L.Callback):
    """The networks as the first training step finds them."""

    seen: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Capture.seen = {"step": trainer.global_step,
                        **{name: {k: v.clone() for k, v in getattr(pl_module, name).state_dict().items()}
                           for name in ("net", "ema")}}


def test_init_weights_start_a_new_run_from_the_checkpoints_weights(run, monkeypatch):
    """Property: fit --init_weights CKPT with another SDE starts a new run at step 0 with the checkpoint's sampling
    (EMA) weights in both the trained and the EMA network; weights that do not fit the configured network are one
    line naming the mismatch."""
    monkeypatch.chdir(run["elsewhere"])
    args = ["fit", "--config", str(run["config"]), "--init_weights", str(run["ckpt"]), "--trainer.max_steps", "1",
            "--trainer.logger.init_args.save_dir", "finetune"]
    cli = run_cli([*args, "--model.sde.init_args.beta_max", "10", "--trainer.callbacks+=test_run_records.Capture"])
    expected = sampling_state(upgrade_checkpoint(torch.load(run["ckpt"], weights_only=True))["state_dict"])
    assert Capture.seen["step"] == 0 and cli.trainer.global_step == 1 and cli.model.sde.beta_1 == 10
    for network in ("net", "ema"):
        assert Capture.seen[network].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(Capture.seen[network][key], value, rtol=0, atol=0)
    assert Path(cli.trainer.log_dir).resolve().parent == (run["elsewhere"] / "finetune" / "imagefolder_small").resolve()
    with pytest.raises(CheckpointError, match=r"^--init_weights .* does not fit .*shape mismatch") as err:
        run_cli([*args, "--model.net.init_args.nf", "16"])
    assert "\n" not in str(err.value)


def test_init_weights_are_not_read_when_a_checkpoint_is_given(run, tmp_path, monkeypatch, capsys):
    """Property: a YAML that names --init_weights (as quickstart_ect.yaml names its teacher) predicts from
    --ckpt_path in a directory where that file does not exist, and without --ckpt_path the missing file is one
    line naming the option."""
    config = yaml.safe_load(run["config"].read_text())
    config["init_weights"] = "runs/teacher/version_0/checkpoints/last.ckpt"
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(run["elsewhere"])
    run_cli(["predict", "--config", str(path), "--ckpt_path", str(run["ckpt"]), *FAST])
    assert printed(capsys.readouterr().out, "lit-score predict")
    with pytest.raises(CheckpointError, match=r"^--init_weights runs/teacher/version_0/checkpoints/last.ckpt: not "
                                              r"found; give the \.ckpt or `lit-score export` folder"):
        run_cli(["fit", "--config", str(path), "--trainer.max_steps", "1"])


EVAL = """
evaluation:
  num_samples: 8
  batch_size: 8
  shard_size: 8
  sampler: {class_path: lit_score.sampling.EDMSampler, init_args: {steps: 2}}
  features: {class_path: lit_score.metrics.RandomConvFeatures, init_args: {num_features: 16}}
  inception_score: false
  kid: false
  bpd: false
  reference: reference.npz
"""


def test_evaluation_of_an_export_without_data_writes_beside_it_and_resumes(run, export, monkeypatch, capsys):
    """Property: lit-score-eval of an export with no experiment YAML (reference statistics given) samples from
    seeds, writes to runs/<export>/eval_0 in the current directory, prints each output, and the same command
    again resumes that folder (its one shard) with the same FID."""
    from lit_score.evaluate.cli import run as evaluate
    from lit_score.metrics.reference_file import save_reference

    folder = run["tmp"] / "eval_here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    save_reference("reference.npz", torch.zeros(16, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    (folder / "eval.yaml").write_text(EVAL)
    args = ["--ckpt_path", str(export), "--config", "eval.yaml", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1"]
    first = evaluate(args)
    paths = printed(capsys.readouterr().out, "lit-score-eval")
    assert {p.parent for p in paths} == {Path("runs/tiny-export/eval_0")} and all(p.exists() for p in paths)
    again = evaluate(args)
    assert again["fid"] == first["fid"] and again["protocol"]["resumed_shards"] == 1
    assert sorted(p.name for p in (folder / "runs" / "tiny-export").iterdir()) == ["eval_0"]
