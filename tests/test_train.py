"""A short `lit-score fit` on the embedded digits: the loss falls, and the run directory holds what it should,
including a checkpoint that reloads on its own."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_score.runtime.module import ScoreModel

ROOT = Path(__file__).resolve().parents[1]
LIT_SCORE = str(Path(sys.executable).parent / "lit-score")

TINY = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
        "--model.net.init_args.attn_resolutions", "[]", "--data.init_args.image_size", "8",
        "--data.init_args.batch_size", "32"]


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_short_fit_lowers_the_loss_and_writes_one_run_directory(tmp_path):
    """120 steps on digits: mean train/loss of the last 20 steps is well below the first 20; the run directory
    holds the TensorBoard events, the resolved config and last.ckpt; the checkpoint carries the step count."""
    cmd = [LIT_SCORE, "fit", "--config", "experiments/quickstart.yaml", *TINY, "--trainer.max_steps", "120",
           "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "60", "--model.lr", "2e-3",
           "--model.warmup", "10", "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "quickstart" / "version_0"
    losses = scalars(run_dir, "train/loss")
    assert len(losses) >= 100
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    assert len(scalars(run_dir, "val/loss")) == 2
    assert (run_dir / "config.yaml").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 120
    assert any(k.startswith("net.") for k in checkpoint["state_dict"])
    reloaded = ScoreModel.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert reloaded.data_shape == (1, 8, 8) and type(reloaded.sde).__name__ == "VPSDE"


@pytest.mark.slow  # a CLI fit per switch (~9 s): runs in make test-slow (CI)
def test_gpu_switches_do_no_harm_on_cpu(tmp_path):
    """channels_last and bf16 autocast train on CPU: a few steps finish with a finite loss."""
    cmd = [LIT_SCORE, "fit", "--config", "experiments/quickstart.yaml", *TINY, "--trainer.max_steps", "4",
           "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--model.channels_last", "true",
           "--trainer.precision", "bf16-mixed", "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = scalars(tmp_path / "quickstart" / "version_0", "train/loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
