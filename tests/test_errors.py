"""Bad input reaches the user as one or two lines and exit status 2 (configuration, data, checkpoint, weights),
through the real console scripts; ``--traceback`` shows the traceback instead."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_score.evaluate import load_experiment

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HINT = "(the full traceback: --traceback or LIT_SCORE_TRACEBACK=1)"

TINY = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, logger: false, max_steps: 1, enable_checkpointing: false}
model:
  net:
    class_path: lit_score.networks.DDPMpp
    init_args: {nf: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
  sde:
    class_path: lit_score.diffusion.sdes.VPSDE
data:
  class_path: lit_score.data.DigitsDataModule
  init_args: {image_size: 8}
"""

EVAL = """
evaluation:
  num_samples: 8
  batch_size: 8
  shard_size: 8
  sampler: {class_path: lit_score.sampling.EDMSampler, init_args: {steps: 2}}
  features: {class_path: lit_score.metrics.InceptionV3, init_args: {weights_path: %s}}
  inception_score: false
  kid: false
  bpd: false
  cache_dir: %s
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LIT_SCORE_TRACEBACK", None)
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_brief(proc: subprocess.CompletedProcess, *expected: str, prog: str = "lit-score") -> None:
    """Exit status 2; the error and the hint are the last two lines; no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1] == HINT and lines[-2].startswith(f"{prog}: error: "), lines[-5:]
    for text in expected:
        assert text in lines[-2], lines[-2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "tiny.yaml").write_text(TINY)
    model = load_experiment(tmp / "tiny.yaml").model
    torch.save({"state_dict": model.state_dict(), "ema_state_dict": model.state_dict(), "global_step": 1},
               tmp / "tiny.ckpt")
    return tmp


@pytest.mark.slow  # a CLI start in a process: runs in make test-slow (CI)
def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    proc = run(BIN / "lit-score", "fit", "--config", "imagefolder_example", "--data.init_args.path",
               tmp_path / "images", cwd=tmp_path)
    assert_brief(proc, "contains no images", str(tmp_path / "images"))


@pytest.mark.slow  # three CLI starts
def test_missing_checkpoint_and_the_traceback_flag(tiny):
    args = ("predict", "--config", tiny / "tiny.yaml", "--ckpt_path", tiny / "nowhere.ckpt")
    assert_brief(run(BIN / "lit-score", *args, cwd=tiny), "checkpoint not found", "nowhere.ckpt")
    full = run(sys.executable, "-m", "lit_score", *args, "--traceback", cwd=tiny)
    assert full.returncode not in (0, 2) and "Traceback" in full.stderr and "CheckpointError" in full.stderr


@pytest.mark.slow  # a CLI start (~7 s); test_resume's truncated --ckpt_path test runs in the default suite
def test_truncated_checkpoint(tiny):
    data = (tiny / "tiny.ckpt").read_bytes()
    (tiny / "cut.ckpt").write_bytes(data[: len(data) // 2])
    proc = run(BIN / "lit-score", "predict", "--config", tiny / "tiny.yaml", "--ckpt_path", tiny / "cut.ckpt",
               cwd=tiny)
    assert_brief(proc, "cut.ckpt")


@pytest.mark.slow  # a CLI start in a process: runs in make test-slow (CI)
def test_architecture_mismatch_in_evaluation(tiny):
    """A checkpoint of nf=16 against the experiment at nf=8: the counts of mismatched shapes, not 200 lines."""
    (tiny / "eval.yaml").write_text(EVAL % (tiny / "no_weights.pth", tiny / "cache"))
    proc = run(BIN / "lit-score-eval", "--config", tiny / "tiny.yaml", "--config", tiny / "eval.yaml",
               "--ckpt_path", tiny / "tiny.ckpt", "--evaluation.out_dir", tiny / "out",
               "--model.net.init_args.nf", "8", cwd=tiny)
    assert_brief(proc, "does not fit the experiment's network", "shape mismatch", prog="lit-score-eval")
    assert len(proc.stderr.strip().splitlines()) <= 4, proc.stderr


@pytest.mark.slow  # a CLI start in a process: runs in make test-slow (CI)
def test_missing_inception_weights_in_evaluation(tiny):
    (tiny / "eval.yaml").write_text(EVAL % (tiny / "no_weights.pth", tiny / "cache"))
    proc = run(BIN / "lit-score-eval", "--config", tiny / "tiny.yaml", "--config", tiny / "eval.yaml",
               "--ckpt_path", tiny / "tiny.ckpt", "--evaluation.out_dir", tiny / "out2", cwd=tiny)
    assert_brief(proc, "InceptionV3 weights for FID not found", "no_weights.pth", prog="lit-score-eval")


@pytest.mark.slow  # four CLI starts
def test_a_packaged_experiment_is_found_by_name_and_an_unknown_one_is_listed(tmp_path):
    proc = run(sys.executable, "-m", "lit_score", "fit", "--config", "quickstart", "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DigitsDataModule" in proc.stdout
    proc = run(BIN / "lit-score", "fit", "--config", "quickstrat", cwd=tmp_path)
    assert_brief(proc, "quickstrat", "packaged:", "quickstart")


def test_an_error_raised_in_a_data_loader_worker_is_reported_by_its_own_message():
    """Not the worker's traceback that PyTorch puts in the message of the error it raises again."""
    from torch._utils import ExceptionWrapper

    from lit_score.data.image import ImageReadError
    from lit_score.errors import report, user_error

    try:
        raise ImageReadError("cannot read image 'a.png' (row 2 of images): OSError: broken data stream")
    except ImageReadError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImageReadError) as raised:
        wrapped.reraise()
    assert report(user_error(raised.value)).splitlines() == [
        "lit-score: error: cannot read image 'a.png' (row 2 of images): OSError: broken data stream (in DataLoader "
        "worker process 0)", HINT]


def test_every_subcommand_resolves_to_its_function():
    from lit_score.cli.main import TOOLS, tool

    assert {"submit", "export", "export-diffusers", "sigma-max", "posthoc-ema"} <= set(TOOLS)
    for name in TOOLS:
        assert callable(tool(name)), name
