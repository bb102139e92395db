"""End to end: `lit-score fit` trains from a local image folder (RGB) and from a saved Arrow dataset (grayscale)
with nothing but the data path set on experiments/imagefolder_example.yaml; the sigma_max command runs on a
folder; a hub dataset that cannot be reached says how to use a local copy; the data benchmark measures."""
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from lit_score.cli.lightning_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "experiments" / "imagefolder_example.yaml"
LIT_SCORE = str(Path(sys.executable).parent / "lit-score")
# A tiny network and 2 steps; the data settings are the example's own.
SMALL = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
         "--model.net.init_args.num_res_blocks", "1", "--model.net.init_args.attn_resolutions", "[8]",
         "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
         "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]


def rgb_folder(folder: Path, n: int = 12, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (size, size + 4 * (i % 3), 3), dtype=np.uint8))
        image.save(folder / (f"{i:02d}.png" if i % 2 else f"{i:02d}.jpg"))
    return folder


@pytest.mark.slow  # a CLI fit in a process (~8 s): runs in make test-slow (CI)
def test_fit_from_an_rgb_image_folder(tmp_path):
    """`lit-score fit` on the example YAML with only the folder path set trains 2 steps and checkpoints."""
    folder = rgb_folder(tmp_path / "images")
    proc = subprocess.run([LIT_SCORE, "fit", "--config", str(EXAMPLE), "--data.init_args.path", str(folder), *SMALL],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`max_steps=2` reached" in proc.stderr + proc.stdout
    assert list((tmp_path / "runs" / "imagefolder").glob("version_*/checkpoints/last.ckpt"))


def test_fit_from_a_grayscale_arrow_dataset(tmp_path):
    """The same YAML on a save_to_disk dataset of grayscale images builds a 1-channel network and trains."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": list(range(12))}, features=features).save_to_disk(
        str(tmp_path / "gray"))
    cli = run_cli(["fit", "--config", str(EXAMPLE), "--data.init_args.path", str(tmp_path / "gray"), *SMALL,
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert cli.model.net.data_shape == (1, 16, 16)
    assert cli.trainer.global_step == 2


def test_sigma_max_command_on_an_image_folder(tmp_path, capsys):
    """`lit-score sigma-max` prints the largest pairwise distance of the folder's images for the VE SDE."""
    from lit_score.cli.tools import sigma_max_main

    for i, value in enumerate((0, 255, 100)):
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / f"{i}.png")
    assert sigma_max_main(["--config", str(EXAMPLE), "--data.init_args.path", str(tmp_path),
                           "--data.init_args.num_workers", "0"]) == 0
    out = capsys.readouterr().out
    value = 2 * (3 * 64) ** 0.5  # centered data: black to white is 2 per coordinate
    assert f"model.sde.init_args.sigma_max: {value:.4f}" in out and "images searched: 3 of 3" in out


def test_unreachable_hub_dataset_says_how_to_use_a_local_copy(monkeypatch):
    """With the hub unreachable (offline mode), a preset fails naming the hub id and the local-copy options."""
    import huggingface_hub.constants

    from lit_score.data import ImageDataModule
    from lit_score.data.plugins import DatasetUnavailableError

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datamodule = ImageDataModule("cifar10", num_workers=0)
    with pytest.raises(DatasetUnavailableError, match=r"(?s)'uoft-cs/cifar10'.*set data.init_args.path to a folder"):
        datamodule.setup("fit")


def test_benchmark_measures_delivery_from_folder_and_arrow(tmp_path):
    """The benchmark's delivery measurement runs on both a PNG folder and its Arrow copy."""
    from benchmarks.data import delivered_images_per_second, write_arrow, write_png_folder

    folder = write_png_folder(tmp_path / "png", 64)
    arrow = write_arrow(folder, tmp_path / "arrow")
    assert delivered_images_per_second(folder, 16, 0, epochs=1) > 0
    assert delivered_images_per_second(arrow, 16, 0, epochs=1) > 0


@pytest.mark.slow
def test_benchmark_prints_the_table(capsys):
    """`python -m benchmarks.data` prints delivered and consumed images/s and their ratio."""
    from benchmarks.data import main

    main(["--num_images", "256", "--train_steps", "1"])
    out = capsys.readouterr().out
    assert "delivered img/s" in out and "consumed img/s" in out and "Arrow (save_to_disk)" in out
