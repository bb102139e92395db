"""What a new user ran into, pinned: integer limits stay integers, a small first image-folder experiment, warnings
for too many CPU processes and for converted images, a hub that cannot be reached fails at once, and the noisy
messages (LightningCLI's args warning, Lightning's SLURM auto-requeue, datasets' "Downloading data") are gone."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from lit_score.cli.lightning_cli import ScoreCLI
from lit_score.cli.config import expand_config_args
from lit_score.cli.threads import affinity_cpus
from test_data_image import write_images

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
        "--model.net.init_args.attn_resolutions", "[]", "--data.init_args.image_size", "8",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def build(*args: str, config: str = "experiments/quickstart.yaml", tmp_path: Path | None = None) -> ScoreCLI:
    extra = ["--trainer.default_root_dir", str(tmp_path)] if tmp_path is not None else []
    return ScoreCLI(run=False, args=expand_config_args(["--config", str(ROOT / config)]) + list(args) + extra,
                    save_config_callback=None)


def test_integer_limits_from_the_command_line_stay_integers(tmp_path):
    """Property: `--trainer.limit_test_batches 1` reaches the Trainer as the int 1 (one batch), not 1.0 (all of
    them); `0.5` stays a fraction; `--x=2` is read too."""
    trainer = build(*TINY, "--trainer.limit_test_batches", "1", "--trainer.limit_val_batches=2",
                    "--trainer.limit_predict_batches", "0.5", tmp_path=tmp_path).trainer
    assert type(trainer.limit_test_batches) is int and trainer.limit_test_batches == 1
    assert type(trainer.limit_val_batches) is int and trainer.limit_val_batches == 2
    assert trainer.limit_predict_batches == 0.5


def test_no_args_and_sys_argv_warning(tmp_path, monkeypatch):
    """`lit-score submit` and tests pass the command line as args while sys.argv holds one too: no warning."""
    monkeypatch.setattr(sys, "argv", ["lit-score", "fit", "--config", "experiments/quickstart.yaml"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(*TINY, tmp_path=tmp_path)
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]


def test_more_cpu_processes_than_cores_warn(tmp_path):
    cores = affinity_cpus()
    with pytest.warns(UserWarning, match=rf"{cores + 1} CPU processes on {cores} core"):
        build(*TINY, "--trainer.accelerator", "cpu", "--trainer.devices", str(cores + 1), "--trainer.strategy",
              "ddp", tmp_path=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(*TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "1", tmp_path=tmp_path)
    assert not [w for w in caught if "CPU processes on" in str(w.message)]


def test_lit_score_turns_off_lightnings_slurm_auto_requeue(tmp_path, monkeypatch):
    """Inside a SLURM job the Preemption callback requeues; Lightning's handler (and its "SLURM auto-requeueing
    enabled" line, printed when auto_requeue is on) stays off."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                       "SLURM_NTASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(key, value)
    environment = build(*TINY, tmp_path=tmp_path).trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


def test_first_image_folder_experiment_is_small_with_a_mean_loss(tmp_path):
    """imagefolder_small.yaml: a network of under 1M parameters (the paper-size imagefolder_example.yaml has
    62M), the mean-reduced loss, every image resized to 32 px."""
    write_images(tmp_path / "images", [(40, 48)] * 40)
    cli = build("--data.init_args.path", str(tmp_path / "images"), "--trainer.logger", "false",
                config="experiments/imagefolder_small.yaml", tmp_path=tmp_path)
    parameters = sum(p.numel() for p in cli.model.net.parameters())
    assert parameters < 1_000_000 and cli.model.loss.reduce_mean is True
    assert (cli.datamodule.image_size, cli.datamodule.num_channels) == (32, 3)
    assert cli.model.net.data_shape == (3, 32, 32)
    print(f"imagefolder_small: {parameters:,} parameters")


def _conversion_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "of the first" in str(w.message)]


def test_converted_images_are_counted_once(tmp_path):
    """A folder of mixed sizes and of mixed grayscale / RGB images says how many images are resized and converted;
    a uniform folder says nothing."""
    from lit_score.data import ImageDataModule

    write_images(tmp_path / "mixed", [(16, 16), (16, 16), (24, 20), (30, 40), (16, 18)])
    write_images(tmp_path / "mixed" / "z_gray", [(16, 16)] * 2, mode="L")
    write_images(tmp_path / "uniform", [(16, 16)] * 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageDataModule(path=str(tmp_path / "mixed"), batch_size=2, val_size=0, num_workers=0).setup("fit")
        ImageDataModule(path=str(tmp_path / "uniform"), batch_size=2, val_size=0, num_workers=0).setup("fit")
    [message] = _conversion_warnings(caught)
    assert "of the first 7 images, 2 have a shorter side other than 16 px" in message
    assert "2 are not RGB (e.g. mode L) and are converted to RGB" in message


def test_a_hub_that_cannot_be_reached_fails_at_once_with_the_fix(monkeypatch):
    """The cifar10 preset without a network: the connection probe fails, so datasets (which would retry with
    back-off for minutes) is never asked, and the error says how to point at a local copy."""
    import datasets
    from huggingface_hub import constants

    from lit_score.data import ImageDataModule
    from lit_score.data.plugins import DatasetUnavailableError

    calls = []
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or datasets.Dataset.from_dict({}))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DatasetUnavailableError, match=r"cannot be reached(.|\n)*set data.init_args.path"):
        ImageDataModule(dataset="cifar10", num_workers=0).setup("fit")
    assert calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the local cache is asked, without a probe
    with pytest.raises(Exception):
        ImageDataModule(dataset="cifar10", num_workers=0).setup("fit")
    assert calls == [("uoft-cs/cifar10", "plain_text")]


def test_a_local_folder_does_not_say_downloading(tmp_path, capsys):
    import datasets

    from lit_score.data import ImageDataModule

    write_images(tmp_path, [(16, 16)] * 4)
    ImageDataModule(path=str(tmp_path), batch_size=2, val_size=0, num_workers=0).setup("fit")
    assert "Downloading data" not in capsys.readouterr().err
    assert datasets.utils.logging.is_progress_bar_enabled()  # switched back on after
