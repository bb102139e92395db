"""`lit-score predict` and `lit-score test` on a quickstart checkpoint, through the console script, as a user runs
them: every named sampler writes the grid and the uint8 .npz, and 1 and 2 DDP processes give identical images."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
LIT_SCORE = str(Path(sys.executable).parent / "lit-score")
TINY = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
        "--model.net.init_args.attn_resolutions", "[]", "--data.init_args.image_size", "8",
        "--data.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false"]
NUM = 6


def run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    subcommand, *rest = args
    proc = subprocess.run([LIT_SCORE, subcommand, "--config", "experiments/quickstart.yaml", *TINY,
                           "--trainer.logger.init_args.save_dir", str(tmp), *rest],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    run(["fit", "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"], tmp)
    path = tmp / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def predict(checkpoint: Path, tmp: Path, version: str, sampler: list[str], extra: list[str] = ()) -> dict:
    run(["predict", "--ckpt_path", str(checkpoint), "--data.init_args.num_samples", str(NUM),
         "--data.init_args.sample_batch_size", "4", "--trainer.logger.init_args.version", version,
         *sampler, *extra], tmp)
    out = tmp / "quickstart" / version
    with np.load(out / "samples.npz") as f:
        return {"samples": f["samples"], "seeds": f["seeds"], "png": np.asarray(Image.open(out / "samples.png"))}


SAMPLERS = {
    "pc": ["--model.sampler", "PCSampler", "--model.sampler.steps", "25"],
    "pc_ancestral_ald": ["--model.sampler", "PCSampler", "--model.sampler.predictor", "ancestral_sampling",
                         "--model.sampler.corrector", "ald", "--model.sampler.steps", "30"],
    "ode": ["--model.sampler", "ODESampler", "--model.sampler.rtol", "1e-2", "--model.sampler.atol", "1e-2"],
    "edm_heun": ["--model.sampler", "EDMSampler", "--model.sampler.steps", "4"],
    "edm_stochastic": ["--model.sampler", "EDMSampler", "--model.sampler.steps", "4",
                       "--model.sampler.S_churn", "10", "--model.sampler.schedule", "geometric"],
    "dpm_solver_pp": ["--model.sampler", "DPMSolverPP", "--model.sampler.steps", "5",
                      "--model.sampler.schedule", "uniform"],
}


FAST = {"pc", "edm_stochastic"}  # the others take ~15 s each (a CLI start): run them with -m slow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in SAMPLERS])
def test_predict_writes_grid_and_npz_with_each_sampler(checkpoint, tmp_path, name):
    """Property: with each named sampler, predict writes NUM uint8 NHWC images ordered by seed and a PNG grid."""
    out = predict(checkpoint, tmp_path, name, SAMPLERS[name])
    assert out["samples"].dtype == np.uint8 and out["samples"].shape == (NUM, 8, 8, 1)
    assert out["seeds"].tolist() == list(range(NUM))
    assert out["png"].dtype == np.uint8 and out["png"].shape == (2 * 10 + 2, 3 * 10 + 2)  # 2 rows x 3 columns of 8x8 + 2 padding


@pytest.mark.parametrize("name", ["edm_stochastic", pytest.param("pc", marks=pytest.mark.slow)])
def test_one_and_two_processes_give_the_same_images(checkpoint, tmp_path, name):
    """Property: the same seeds give byte-identical images on 1 and on 2 DDP processes (gloo, CPU), although DDP
    splits and pads the 6 seeds differently; the writer de-duplicates and orders them by seed."""
    one = predict(checkpoint, tmp_path, "one", SAMPLERS[name], ["--trainer.devices", "1"])
    two = predict(checkpoint, tmp_path, "two", SAMPLERS[name],
                  ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                   "--data.init_args.num_samples", "5"])
    assert two["seeds"].tolist() == list(range(5))
    np.testing.assert_array_equal(one["samples"][:5], two["samples"])


@pytest.mark.slow
def test_lit_score_test_logs_bits_per_dim(checkpoint, tmp_path):
    """Property: `lit-score test` reports a finite test/bpd above 0 in TensorBoard (dequantised 8-bit digits,
    [-1, 1] data: offset 7 bits)."""
    run(["test", "--ckpt_path", str(checkpoint), "--trainer.limit_test_batches", "1",
         "--data.init_args.batch_size", "2", "--model.likelihood", "lit_score.likelihood.Likelihood",
         "--model.likelihood.rtol", "1e-2", "--model.likelihood.atol", "1e-2",
         "--model.likelihood.eps", "1e-3",
         "--trainer.logger.init_args.version", "test"], tmp_path)
    events = EventAccumulator(str(tmp_path / "quickstart" / "test"))
    events.Reload()
    bpd = [e.value for e in events.Scalars("test/bpd")]
    assert len(bpd) == 1 and 0 < bpd[0] < 100
