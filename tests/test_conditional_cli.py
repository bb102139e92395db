"""Class-conditional models through the command line, as a user runs them: fit `quickstart_cond.yaml` and the
digits classifier, then predict with each guidance method and a class label; labels in samples.npz, the NFE guidance
implies, the same labels and images from 1 and 2 processes; and (slow) the full quickstart, whose guided samples an
independent digit classifier recognises."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIT_SCORE = str(Path(sys.executable).parent / "lit-score")
TINY = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
        "--model.net.init_args.attn_resolutions", "[]", "--data.init_args.image_size", "8",
        "--data.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false"]
HEUN_5 = ["--model.sampler", "EDMSampler", "--model.sampler.steps", "5"]  # 9 NFE
ENV = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}


def run(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([LIT_SCORE, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=ENV)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


class Runs(dict):
    """4-step tiny fits of the experiments asked for (the conditional quickstart, the digits classifier), each run
    on first use, under ``self["tmp"]``."""

    def __missing__(self, name: str) -> Path:
        run(["fit", "--config", str(ROOT / f"experiments/{name}.yaml"), *TINY, "--trainer.max_steps", "4",
             "--trainer.num_sanity_val_steps", "0", "--fid_every", "1000", "--sample_every", "4"], self["tmp"])
        self[name] = self["tmp"] / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
        assert self[name].is_file()
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp=tmp_path_factory.mktemp("cond"))


def predict(runs: dict, name: str, *args: str, num: int = 6) -> dict:
    out = runs["tmp"] / "out" / name
    run(["predict", "--ckpt_path", str(runs["quickstart_cond"]), "--data.init_args.num_samples", str(num),
         "--data.init_args.sample_batch_size", "4", "--output", str(out), *HEUN_5, *args], runs["tmp"])
    with np.load(out / "samples.npz") as f:
        return {k: f[k] for k in f.files}


GUIDANCE = {  # name: (options, network evaluations per image)
    "cfg": (["--model.guidance", "ClassifierFreeGuidance", "--model.guidance.scale", "3"], 18),
    "cfg_interval": (["--model.guidance", "ClassifierFreeGuidance", "--model.guidance.scale", "3",
                      "--model.guidance.interval", "[0.5, 10]"], None),
    "auto": (["--model.guidance", "AutoGuidance", "--model.guidance.scale", "2", "--model.guidance.guide",
              "{quickstart_cond}"], 18),
    "classifier": (["--model.guidance", "ClassifierGuidance", "--model.guidance.scale", "1",
                    "--model.guidance.classifier", "{quickstart_classifier}"], 18),
}


@pytest.mark.parametrize("name", [n if n == "cfg" else pytest.param(n, marks=pytest.mark.slow) for n in GUIDANCE])
def test_predict_with_guidance_and_a_class_label(runs, name):
    """`--data.init_args.class_label 3` with each guidance method: samples.npz holds labels all 3, the sampler's NFE
    (9) and the network evaluations guidance implies (two per NFE: the guided passes; fewer with an interval)."""
    options, evaluations = GUIDANCE[name]
    options = [o.format_map(runs) for o in options]
    out = predict(runs, name, *options, "--data.init_args.class_label", "3")
    assert out["labels"].tolist() == [3] * 6 and int(out["nfe"]) == 9
    if evaluations is None:  # the interval leaves the first levels (sigma 80, ...) and the last unguided
        assert 9 < int(out["network_evaluations"]) < 18
    else:
        assert int(out["network_evaluations"]) == evaluations
    assert out["samples"].shape == (6, 8, 8, 1)


@pytest.mark.slow  # a CLI start (~10 s); DataSpace.labels_for itself is tested in test_conditional.py
def test_without_a_class_label_each_seed_draws_its_own(runs):
    """Without class_label, image i's label is its seed's draw with the training set's class frequencies: the labels
    vary, and are the data space's labels_for(seeds)."""
    import torch

    from lit_score.runtime.module import ScoreModel

    out = predict(runs, "seeded", num=12)
    space = ScoreModel.load_from_checkpoint(runs["quickstart_cond"], map_location="cpu").data_space
    assert out["labels"].tolist() == space.labels_for(torch.arange(12)).tolist()
    assert len(set(out["labels"].tolist())) > 3 and int(out["network_evaluations"]) == 9


@pytest.mark.slow  # a CLI start (~8 s); the DataModules' check is tested in test_data_labels.py
def test_a_class_label_out_of_range_is_one_line(runs):
    proc = run(["predict", "--ckpt_path", str(runs["quickstart_cond"]), "--data.init_args.class_label", "10"],
               runs["tmp"], ok=False)
    assert proc.returncode == 2 and "class_label must be in 0..9" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3


@pytest.mark.slow  # two CLI starts, one with 2 processes
def test_one_and_two_processes_give_the_same_labels_and_images(runs):
    one = predict(runs, "one", *GUIDANCE["cfg"][0], "--trainer.devices", "1", num=5)
    two = predict(runs, "two", *GUIDANCE["cfg"][0], "--trainer.devices", "2", "--trainer.strategy", "ddp",
                  "--trainer.accelerator", "cpu", num=5)
    assert two["seeds"].tolist() == list(range(5))
    np.testing.assert_array_equal(one["labels"], two["labels"])
    np.testing.assert_array_equal(one["samples"], two["samples"])


@pytest.mark.slow  # an export and a predict from it, in other folders
def test_an_export_carries_the_classes_and_predicts_a_class(runs):
    import json

    folder = runs["tmp"] / "exported"
    run(["export", str(runs["quickstart_cond"]), str(folder)], runs["tmp"])
    config = json.loads((folder / "config.json").read_text())
    assert config["data_space"]["num_classes"] == 10 and config["data_space"]["class_names"][3] == "3"
    assert "class-conditional, with 10 classes" in (folder / "README.md").read_text()
    elsewhere = runs["tmp"] / "elsewhere"
    elsewhere.mkdir()
    run(["predict", "--ckpt_path", str(folder), "--data.init_args.num_samples", "4", "--data.init_args.class_label",
         "7", *HEUN_5], elsewhere)
    with np.load(next(elsewhere.glob("runs/*/predict_0/samples.npz"))) as f:
        assert f["labels"].tolist() == [7] * 4


@pytest.mark.slow  # ~10-12 min: the full conditional quickstart, then 4 x 1000 guided samples
@pytest.mark.timeout(2400)
def test_quickstart_cond_draws_the_digits_asked_for(tmp_path):
    """`lit-score fit --config experiments/quickstart_cond.yaml`, then 100 samples of each digit at classifier-free
    guidance w = 1, 2, 3, 5 (EDM Heun, 18 levels), labelled by a logistic regression fitted on real digits only
    (``benchmarks.guidance_accuracy``): accuracy well above chance (0.1) at every w, and not falling as w grows beyond
    the binomial noise of 1000 samples (3 standard errors of the difference). Measured 0.913, 0.994, 0.998, 0.997.
    With 10 levels w = 5 measured 0.982 after 0.997 at w = 3: strong guidance with coarse steps spoils some digits."""
    from benchmarks.guidance_accuracy import accuracy, digit_classifier
    from lit_score.runtime.module import ScoreModel

    run(["fit", "--config", str(ROOT / "experiments/quickstart_cond.yaml"), "--trainer.enable_progress_bar", "false"],
        tmp_path)
    ckpt = tmp_path / "runs/quickstart_cond/version_0/checkpoints/last.ckpt"
    model = ScoreModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    clf, ceiling = digit_classifier()
    acc = [accuracy(model, clf, w, "ClassifierFreeGuidance", None)["accuracy"] for w in (1.0, 2.0, 3.0, 5.0)]
    assert ceiling > 0.9 and min(acc) > 0.5, acc
    for before, after in zip(acc, acc[1:]):  # 3 standard errors of the difference of two binomial proportions
        noise = np.sqrt((before * (1 - before) + after * (1 - after)) / 1000)
        assert after > before - 3 * max(noise, 1 / 1000), acc
