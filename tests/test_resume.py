"""Exact resume: a run stopped at step k, by a pre-emption signal or by ``kill -9``, and resumed from its last
checkpoint reaches step n with the same weights, optimizer, EMA and random state as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_score.cli import run_cli
from lit_score.resume import ResumableDataLoader

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 12
# 180 training digits in batches of 32: 5 batches an epoch, so the runs cross epoch boundaries.
TINY = {
    "defaults": [str(ROOT / "experiments/quickstart.yaml")],
    "trainer": {
        "max_steps": MAX_STEPS, "log_every_n_steps": 2, "val_check_interval": 4, "limit_val_batches": 0.02,
        "num_sanity_val_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": 2}},
            {"class_path": "callbacks.EMA", "init_args": {"rate": 0.9}},
        ],
    },
    "model": {"warmup": 5, "net": {"init_args": {"nf": 8, "ch_mult": [1, 2], "attn_resolutions": []}}},
    "data": {"init_args": {"image_size": 8, "batch_size": 32, "val_fraction": 0.9}},
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process during the training step that follows optimizer step ``step``."""

    def __init__(self, step: int, signum: str = "SIGUSR1") -> None:
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class KillAfterStep(L.Callback):
    """``kill -9`` of this process once optimizer step ``step`` is done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def write_config(tmp_path: Path, name: str, extra_callbacks: list[dict] = ()) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["trainer"]["callbacks"] += list(extra_callbacks)
    config["trainer"]["logger"] = {"init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, version: str, *args: str) -> L.Trainer:
    return run_cli(["fit", "--config", str(config), "--trainer.logger.init_args.version", version, *args]).trainer


def last_checkpoint(tmp_path: Path, version: str) -> dict:
    return torch.load(tmp_path / "runs/tiny" / version / "checkpoints/last.ckpt", weights_only=False)


def assert_close_tree(actual, expected, where: str) -> None:
    """Tensors equal within 1e-6 (bitwise on this machine), everything else equal, in nested containers."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_close_tree(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_tree(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def assert_same_state(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    for name in ("state_dict", "optimizer_states", "lr_schedulers", "random_state"):
        assert_close_tree(resumed[name], reference[name], name)
    ema = [k for k in reference["callbacks"] if k.startswith("EMA")]
    assert ema, "the reference run has an EMA callback"
    for key in ema:
        assert_close_tree(resumed["callbacks"][key], reference["callbacks"][key], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    trainer = fit(write_config(tmp_path, "plain"), "plain")
    assert trainer.global_step == MAX_STEPS
    return last_checkpoint(tmp_path, "plain")


def test_signal_stops_at_a_step_boundary_and_resume_is_exact(tmp_path, reference):
    """SIGUSR1 during step 5 (the last of epoch 0) -> checkpoint after step 5 and stop; resuming from it reaches
    the reference state."""
    stopped = fit(write_config(tmp_path, "signal", [{"class_path": "test_resume.SignalAtStep",
                                                      "init_args": {"step": 4}}]), "run")
    assert stopped.global_step == 5
    assert last_checkpoint(tmp_path, "run")["global_step"] == 5
    resumed = fit(write_config(tmp_path, "resume"), "run", "--ckpt_path", "last")
    assert resumed.global_step == MAX_STEPS
    assert_same_state(last_checkpoint(tmp_path, "run"), reference)


def test_kill_9_after_a_checkpoint_and_resume_is_exact(tmp_path, reference):
    """kill -9 after step 9 (last checkpoint: step 8, mid-epoch) -> resuming from it reaches the reference."""
    config = write_config(tmp_path, "kill", [{"class_path": "test_resume.KillAfterStep", "init_args": {"step": 9}}])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    killed = subprocess.run([sys.executable, "-m", "lit_score.cli", "fit", "--config", str(config),
                             "--trainer.logger.init_args.version", "run"], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert last_checkpoint(tmp_path, "run")["global_step"] == 8
    resumed = fit(write_config(tmp_path, "resume"), "run", "--ckpt_path", "last")
    assert resumed.global_step == MAX_STEPS
    assert_same_state(last_checkpoint(tmp_path, "run"), reference)


def test_first_launch_without_checkpoint_just_starts(tmp_path):
    """--ckpt_path last in an empty run directory trains from scratch."""
    config = write_config(tmp_path, "fresh")
    trainer = fit(config, "fresh", "--ckpt_path", "last", "--trainer.max_steps", "2")
    assert trainer.global_step == 2


def test_resumable_loader_continues_mid_epoch_and_across_process_counts():
    """The batches after a saved position are those an uninterrupted loader yields, also when 2 ranks' position
    is loaded by 1 rank (the samples seen by all ranks are skipped)."""
    data = list(range(40))
    loader = ResumableDataLoader(data, batch_size=4, shuffle=True, seed=3)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "samples_seen": 12}
    again = ResumableDataLoader(data, batch_size=4, shuffle=True, seed=3)
    again.load_state_dict(state)
    assert head + [b.tolist() for b in again] == full
    again.sampler.set_epoch(1)
    assert sorted(sum((b.tolist() for b in again), [])) == data

    ranks = [ResumableDataLoader(data, batch_size=2, shuffle=True, seed=3) for _ in range(2)]
    for rank, rank_loader in enumerate(ranks):
        rank_loader.sampler.num_replicas, rank_loader.sampler.rank = 2, rank
        rank_loader.sampler.num_samples, rank_loader.sampler.total_size = 20, 40
    seen = []
    for rank_loader in ranks:
        it = iter(rank_loader)
        seen += sum((next(it).tolist() for _ in range(3)), [])
    single = ResumableDataLoader(data, batch_size=2, shuffle=True, seed=3)
    single.load_state_dict(ranks[0].state_dict())
    rest = sum((b.tolist() for b in single), [])
    assert sorted(seen + rest) == data


def test_resumable_loader_rejects_its_own_arguments():
    """A sampler or batch_sampler passed to ResumableDataLoader is refused with the reason."""
    with pytest.raises(ValueError, match="chooses its own sampler"):
        ResumableDataLoader(list(range(4)), sampler=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="not a ResumableDataLoader state"):
        ResumableDataLoader(list(range(4))).load_state_dict({"epoch": 0})
