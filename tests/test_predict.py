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


def run(args: list[str], tmp: Path, net: list[str] = TINY, ok: bool = True) -> subprocess.CompletedProcess:
    subcommand, *rest = args
    proc = subprocess.run([LIT_SCORE, subcommand, "--config", "experiments/quickstart.yaml", *net,
                           "--trainer.logger.init_args.save_dir", str(tmp), *rest],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    run(["fit", "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"], tmp)
    path = tmp / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def predict(checkpoint: Path, tmp: Path, version: str, sampler: list[str], extra: list[str] = (),
            net: list[str] = TINY) -> dict:
    out = tmp / "quickstart" / version
    run(["predict", "--ckpt_path", str(checkpoint), "--data.init_args.num_samples", str(NUM),
         "--data.init_args.sample_batch_size", "4", "--output", str(out), *sampler, *extra], tmp, net)
    with np.load(out / "samples.npz") as f:
        return {"samples": f["samples"], "seeds": f["seeds"], "nfe": int(f["nfe"]),
                "png": np.asarray(Image.open(out / "samples.png"))}


# name: (command-line options, the NFE per image they must run)
SAMPLERS = {
    "pc": (["--model.sampler", "PCSampler", "--model.sampler.steps", "25"], 50),  # predictor + corrector per step
    "pc_ancestral_ald": (["--model.sampler", "PCSampler", "--model.sampler.predictor", "ancestral_sampling",
                          "--model.sampler.corrector", "ald", "--model.sampler.steps", "30"], 60),
    "ode": (["--model.sampler", "ODESampler", "--model.sampler.rtol", "1e-2", "--model.sampler.atol", "1e-2"], None),
    "edm_heun": (["--model.sampler", "EDMSampler", "--model.sampler.steps", "5"], 9),  # Heun: 2 per step, Euler last
    "edm_stochastic": (["--model.sampler", "EDMSampler", "--model.sampler.steps", "4",
                        "--model.sampler.S_churn", "10", "--model.sampler.schedule", "geometric"], 7),
    "dpm_solver_pp": (["--model.sampler", "DPMSolverPP", "--model.sampler.steps", "10",
                       "--model.sampler.schedule", "uniform"], 10),
}


FAST = {"edm_heun"}  # the others take ~8-15 s each (a CLI start): run them with -m slow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in SAMPLERS])
def test_predict_writes_grid_and_npz_with_each_sampler(checkpoint, tmp_path, name):
    """Property: with each named sampler, predict runs that sampler with the command line's options over the
    checkpoint's saved ones (sampler: null, which would mean 1000-step PC): the NFE in samples.npz is the one
    those options give. It writes NUM uint8 NHWC images ordered by seed and a PNG grid."""
    options, nfe = SAMPLERS[name]
    out = predict(checkpoint, tmp_path, name, options)
    if nfe is None:  # adaptive: Dormand-Prince takes 6 evaluations a step (FSAL) plus 2; 1e-2 needs few steps
        assert 8 <= out["nfe"] < 200 and (out["nfe"] - 2) % 6 == 0, out["nfe"]
    else:
        assert out["nfe"] == nfe
    assert out["samples"].dtype == np.uint8 and out["samples"].shape == (NUM, 8, 8, 1)
    assert out["seeds"].tolist() == list(range(NUM))
    assert out["png"].dtype == np.uint8 and out["png"].shape == (2 * 10 + 2, 3 * 10 + 2)  # 2 rows x 3 columns of 8x8 + 2 padding


@pytest.mark.slow  # ~25 s each; 2-process predict of the EMA network also runs in test_ddp_consumers.py
@pytest.mark.parametrize("name", ["edm_stochastic", "pc"])
def test_one_and_two_processes_give_the_same_images(checkpoint, tmp_path, name):
    """Property: the same seeds give byte-identical images on 1 and on 2 DDP processes (gloo, CPU), although DDP
    splits and pads the 6 seeds differently; the writer de-duplicates and orders them by seed."""
    one = predict(checkpoint, tmp_path, "one", SAMPLERS[name][0], ["--trainer.devices", "1"])
    two = predict(checkpoint, tmp_path, "two", SAMPLERS[name][0],
                  ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                   "--data.init_args.num_samples", "5"])
    assert two["seeds"].tolist() == list(range(5)) and two["nfe"] == one["nfe"] == SAMPLERS[name][1]
    np.testing.assert_array_equal(one["samples"][:5], two["samples"])


def test_a_yaml_network_that_differs_from_the_checkpoint_is_refused(checkpoint, tmp_path):
    """Property: the checkpoint fixes the network; the YAML's own (its 16-channel, 3-level DDPM++, which the tiny
    weights do not fit) is not silently replaced but refused in one line naming each key and both values, exit 2,
    before anything is written."""
    proc = run(["predict", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "bad"),
                *SAMPLERS["edm_heun"][0]], tmp_path, ok=False,
               net=["--data.init_args.image_size", "8", "--trainer.enable_progress_bar", "false"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.net.init_args.nf is 16 here but 8 in the checkpoint" in proc.stderr
    assert "model.net.init_args.attn_resolutions is [8] here but [] in the checkpoint" in proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # a CLI start (~8 s); the network's refusal above runs in the default suite
def test_data_that_do_not_fit_the_checkpoint_are_refused(checkpoint, tmp_path):
    """Property: data options whose image size differs from the checkpoint network's stop before sampling, naming
    the key, both values and the option to set (predict itself samples from seeds in the checkpoint's data space)."""
    proc = run(["predict", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "bad"),
                *SAMPLERS["edm_heun"][0]], tmp_path, ok=False, net=TINY[:6])
    assert proc.returncode == 2
    assert "data.init_args.image_size is 16 here but 8 in the checkpoint" in proc.stderr
    assert "--data.init_args.image_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_lit_score_test_logs_bits_per_dim(checkpoint, tmp_path):
    """Property: `lit-score test` reports a finite test/bpd above 0 in TensorBoard (dequantised 8-bit digits,
    [-1, 1] data: offset 7 bits)."""
    run(["test", "--ckpt_path", str(checkpoint), "--trainer.limit_test_batches", "1",
         "--data.init_args.batch_size", "2", "--model.likelihood", "lit_score.diffusion.likelihood.Likelihood",
         "--model.likelihood.rtol", "1e-2", "--model.likelihood.atol", "1e-2",
         "--model.likelihood.eps", "1e-3",
         "--output", str(tmp_path / "quickstart" / "test")], tmp_path)
    events = EventAccumulator(str(tmp_path / "quickstart" / "test"))
    events.Reload()
    bpd = [e.value for e in events.Scalars("test/bpd")]
    assert len(bpd) == 1 and 0 < bpd[0] < 100


def test_checkpoint_carries_the_data_space_of_the_data(checkpoint):
    """The CLI links the DataModule's data space into the model: the quickstart digits at 8 px in [-1, 1], 8-bit."""
    import torch

    hparams = torch.load(checkpoint, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hparams["data_space"] == {"shape": [1, 8, 8], "centered": True, "num_levels": 256}
