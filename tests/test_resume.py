"""Nothing lost: a run stopped by Ctrl-C, SIGTERM or SIGUSR1 (in a real process, at a chosen step), or killed
with ``kill -9`` and restarted, reaches max_steps with the weights, optimizer, EMA, random state, loop counters and
TensorBoard loss curve of an uninterrupted run, bit for bit (with EDM's augmentation on); the end of a run always
leaves last.ckpt at its final step; a crash during a save leaves the previous checkpoint whole."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_score.runtime.checkpoint_io import CorruptCheckpointError, atomic_torch_save
from lit_score.cli.lightning_cli import run_cli
from lit_score.errors import CheckpointError, ConfigurationError
from lit_score.evaluate.shards import ShardStore
from lit_score.callbacks.preemption import Interrupted, stop_at_boundaries
from lit_score.callbacks.resume import ResumableDataLoader

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 14
EVERY = 6  # periodic checkpoints at steps 6 and 12; max_steps is not a multiple
# 180 training digits in batches of 32: 5 batches an epoch (steps 1-5, 6-10, 11-14), validation after every 4th.
TINY = {
    "defaults": [str(ROOT / "experiments/quickstart.yaml")],
    "trainer": {
        "max_steps": MAX_STEPS, "log_every_n_steps": 1, "val_check_interval": 4, "limit_val_batches": 0.02,
        "num_sanity_val_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": EVERY}},
            {"class_path": "lit_score.callbacks.EMA", "init_args": {"rate": 0.9}},
        ],
    },
    # with EDM's augmentation (p 0.5), whose draws must resume exactly too, class-conditional on the digits' labels
    # with label dropout (its draws too)
    "model": {"warmup": 5, "net": {"init_args": {"nf": 8, "ch_mult": [1, 2], "attn_resolutions": [], "augment_dim": 9,
                                                 "num_classes": 10, "label_dropout": 0.2}},
              "augment": {"class_path": "lit_score.diffusion.augment.AugmentPipe", "init_args": {"p": 0.5}}},
    "data": {"init_args": {"image_size": 8, "batch_size": 32, "val_fraction": 0.9}},
}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)]), "OMP_NUM_THREADS": "1"}

# One thread in-process too, as ENV gives the subprocesses: bitwise comparisons need the same reduction order.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


class SignalAt(L.Callback):
    """Sends ``signum`` to this process during the training step after optimizer step ``step`` (``during:
    train``), or during the validation that follows it (``during: validation``)."""

    def __init__(self, step: int, signum: str = "SIGUSR1", during: str = "train") -> None:
        self.step, self.signum, self.during, self.sent = step, signal.Signals[signum], during, False

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step and not self.sent and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.during == "train":
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during == "validation":
            self._send(trainer)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during == "predict" and batch_idx == self.step:
            os.kill(os.getpid(), self.signum)


class KillAfterStep(L.Callback):
    """``kill -9`` of this process once optimizer step ``step`` is done (``during: validation``: in the
    validation after it)."""

    def __init__(self, step: int, during: str = "train") -> None:
        self.step, self.during = step, during

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.during == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during == "validation" and trainer.global_step == self.step and not trainer.sanity_checking:
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


def fit_process(config: Path, version: str, *args: str) -> subprocess.CompletedProcess:
    """``lit-score fit`` in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lit_score", "fit", "--config", str(config),
                           "--trainer.logger.init_args.version", version, *args], env=ENV, capture_output=True,
                          text=True, timeout=600)


def last_checkpoint(tmp_path: Path, version: str) -> dict:
    return torch.load(tmp_path / "runs/tiny" / version / "checkpoints/last.ckpt", weights_only=True)


def loss_curve(run_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """``tag`` as TensorBoard shows it: every event file of the run, points after a restart purged."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def assert_equal_tree(actual, expected, where: str) -> None:
    """Tensors bitwise equal, everything else equal, in nested containers."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_equal_tree(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal_tree(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_state(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    assert resumed["epoch"] == reference["epoch"]
    assert any(k.startswith("ema.") for k in reference["state_dict"]), "the EMA network is in the state_dict"
    for name in ("state_dict", "optimizer_states", "lr_schedulers", "random_state"):  # state_dict: net.* and ema.*
        assert_equal_tree(resumed[name], reference[name], name)
    ema = [k for k in reference["callbacks"] if k.startswith("EMA")]
    assert ema, "the reference run has an EMA callback"
    for key in ema:
        assert_equal_tree(resumed["callbacks"][key], reference["callbacks"][key], key)
    # Epochs and batches done (Lightning's ready/started counts of a restart differ and decide nothing).
    for key in ("epoch_progress", "epoch_loop.batch_progress"):
        for count in ("processed", "completed"):
            assert resumed["loops"]["fit_loop"][key]["total"][count] == \
                reference["loops"]["fit_loop"][key]["total"][count], f"{key} {count}"
    assert_equal_tree(resumed["loops"]["fit_loop"]["epoch_loop.state_dict"],
                      reference["loops"]["fit_loop"]["epoch_loop.state_dict"], "epoch_loop.state_dict")


def assert_same_curve(run_dir: Path, reference_dir: Path, tag: str = "train/loss") -> None:
    curve, expected = loss_curve(run_dir, tag), loss_curve(reference_dir, tag)
    steps = [s for s, _ in curve]
    assert all(a < b for a, b in zip(steps, steps[1:])), f"TensorBoard steps not strictly increasing: {steps}"
    assert curve == expected, tag


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> tuple[dict, Path]:
    """The final checkpoint and run directory of an uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    trainer = fit(write_config(tmp_path, "plain"), "plain")
    assert trainer.global_step == MAX_STEPS
    return last_checkpoint(tmp_path, "plain"), tmp_path / "runs/tiny/plain"


def test_the_end_of_a_run_saves_its_last_step(reference):
    """max_steps 14 with checkpoints every 6 steps: last.ckpt holds step 14 (not 12), in epoch 2, whose loop
    counters say epoch 2 is under way (11-14 are its first 4 batches)."""
    checkpoint, run_dir = reference
    assert checkpoint["global_step"] == MAX_STEPS and checkpoint["epoch"] == 2
    loop = checkpoint["loops"]["fit_loop"]
    assert loop["epoch_progress"]["total"]["completed"] == 2
    assert loop["epoch_loop.batch_progress"]["total"]["processed"] == MAX_STEPS
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["epoch=1-step=6.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]


# (where, what the trigger callback does, the step whose checkpoint a signal leaves)
POSITIONS = {
    "before_first_checkpoint": ({"step": 2}, 3),
    "mid_epoch": ({"step": 6}, 7),
    "epoch_boundary": ({"step": 9}, 10),
    "during_validation": ({"step": 8, "during": "validation"}, 8),  # cut short, saved at its step, rerun on resume
}
KILLS = {  # kill -9 after step k: the restart resumes from the periodic checkpoint before it (or from scratch)
    "before_first_checkpoint": ({"step": 3}, None),
    "mid_epoch": ({"step": 7}, 6),
    "epoch_boundary": ({"step": 10}, 6),
    "during_validation": ({"step": 8, "during": "validation"}, 6),
}
SIGNALS = ["SIGINT", "SIGTERM", "SIGUSR1"]
FAST = {("SIGINT", "before_first_checkpoint")}


def signal_case(tmp_path: Path, reference: tuple[dict, Path], signum: str, position: str) -> None:
    trigger, stop = POSITIONS[position]
    config = write_config(tmp_path, "signal", [{"class_path": "test_resume.SignalAt",
                                                 "init_args": {**trigger, "signum": signum}}])
    stopped = fit_process(config, "run")
    assert stopped.returncode == 128 + signal.Signals[signum], stopped.stderr[-3000:]
    assert f"lit-score: stopped by {signum}" in stopped.stderr
    saved = last_checkpoint(tmp_path, "run")
    assert saved["global_step"] == stop
    assert saved["epoch"] == (stop - 1) // 5, "the checkpoint of a stopped run is in the epoch of its last step"
    resumed = fit(write_config(tmp_path, "resume"), "run", "--ckpt_path", "last")
    assert resumed.global_step == MAX_STEPS
    assert_same_state(last_checkpoint(tmp_path, "run"), reference[0])
    assert_same_curve(tmp_path / "runs/tiny/run", reference[1])
    assert_same_curve(tmp_path / "runs/tiny/run", reference[1], "val/loss")  # a validation cut short ran again
    assert sorted(p.name for p in (tmp_path / "runs/tiny/run/checkpoints").glob("last*")) == ["last.ckpt"]


@pytest.mark.parametrize("signum,position", [
    pytest.param(s, p, marks=() if (s, p) in FAST else pytest.mark.slow) for s in SIGNALS for p in POSITIONS])
def test_signal_saves_at_the_next_step_and_resume_is_exact(tmp_path, reference, signum, position):
    """A signal during a step (or a validation) -> last.ckpt after that step, stop, exit 128 + signum; resuming
    from it reaches max_steps in the reference state with the reference loss curve, one point per step."""
    signal_case(tmp_path, reference, signum, position)


@pytest.mark.parametrize("position", [
    pytest.param(p, marks=() if p == "mid_epoch" else pytest.mark.slow) for p in KILLS])
def test_kill_9_and_restart_is_exact(tmp_path, reference, position):
    """kill -9 -> the restart resumes from the last periodic checkpoint (from scratch before the first) and
    reaches the reference state; TensorBoard drops the points the killed run logged after that checkpoint."""
    trigger, resume_step = KILLS[position]
    config = write_config(tmp_path, "kill", [{"class_path": "test_resume.KillAfterStep", "init_args": trigger}])
    killed = fit_process(config, "run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "runs/tiny/run/checkpoints/last.ckpt"
    assert (torch.load(last, weights_only=True)["global_step"] if last.exists() else None) == resume_step
    resumed = fit(write_config(tmp_path, "resume"), "run", "--ckpt_path", "last")
    assert resumed.global_step == MAX_STEPS
    assert_same_state(last_checkpoint(tmp_path, "run"), reference[0])
    assert_same_curve(tmp_path / "runs/tiny/run", reference[1])


def test_resume_flag_continues_the_run_in_place(tmp_path, reference):
    """`lit-score fit --resume RUN_DIR` after Ctrl-C: same directory, same TensorBoard run, last.ckpt replaced
    in place, the reference state at max_steps."""
    trigger, stop = POSITIONS["before_first_checkpoint"]
    config = write_config(tmp_path, "signal", [{"class_path": "test_resume.SignalAt",
                                                 "init_args": {**trigger, "signum": "SIGINT"}}])
    trainer = fit(config, "run")
    assert trainer.global_step == stop
    run_dir = tmp_path / "runs/tiny/run"
    resumed = run_cli(["fit", "--resume", str(run_dir)]).trainer
    assert resumed.global_step == MAX_STEPS and Path(resumed.log_dir) == run_dir
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["checkpoints"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert_same_state(last_checkpoint(tmp_path, "run"), reference[0])
    assert_same_curve(run_dir, reference[1])
    with pytest.raises(ConfigurationError, match="no config.yaml"):
        run_cli(["fit", "--resume", str(tmp_path)])


def test_first_launch_without_checkpoint_just_starts(tmp_path):
    """--ckpt_path last in an empty run directory trains from scratch."""
    config = write_config(tmp_path, "fresh")
    trainer = fit(config, "fresh", "--ckpt_path", "last", "--trainer.max_steps", "2")
    assert trainer.global_step == 2


def test_a_fit_that_fails_at_start_leaves_no_run_directory(tmp_path):
    """A checkpoint that Lightning cannot restore fails before the first step and leaves no empty version
    directory (a missing one is refused before anything starts)."""
    config = write_config(tmp_path, "fails")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        fit(config, "fails", "--ckpt_path", str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "empty.ckpt")
    with pytest.raises(Exception, match="state_dict|Missing key|global_step|optimizer|loops|epoch|pytorch-lightning_version"):
        fit(config, "fails", "--ckpt_path", str(tmp_path / "empty.ckpt"))
    assert not (tmp_path / "runs/tiny/fails").exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "the signal handlers are given back"


def test_truncated_checkpoint_names_the_newest_good_one(tmp_path, reference):
    """A truncated last.ckpt passed to --ckpt_path: one error naming it and the newest good checkpoint beside it."""
    _, run_dir = reference
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("epoch=1-step=6.ckpt", 0), ("epoch=2-step=12.ckpt", 1), ("last.ckpt", 2)):
        path = folder / name
        path.write_bytes((run_dir / "checkpoints" / name).read_bytes())
        os.utime(path, (1e9 + step, 1e9 + step))
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError) as err:
        fit(write_config(tmp_path, "corrupt"), "corrupt", "--ckpt_path", str(last))
    message = str(err.value)
    assert "\n" not in message and str(last) in message
    assert f"--ckpt_path {folder / 'epoch=2-step=12.ckpt'}" in message


class _KillWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """kill -9 in the middle of writing a checkpoint: the previous file is intact, no partial one is in its
    place. (A plain torch.save to the path truncates it first.)"""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(1000.0)}, path)
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_resume import _KillWhilePickled; from lit_score.runtime.checkpoint_io import atomic_torch_save; "
            f"atomic_torch_save({{'step': 2, 'w': torch.zeros(10**6), 'x': _KillWhilePickled()}}, {str(path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.arange(1000.0))
    with pytest.raises(pickle.PicklingError, match="boom"):
        class Bad:
            def __reduce__(self):
                raise pickle.PicklingError("boom")
        atomic_torch_save({"x": Bad()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not (tmp_path / f".last.ckpt.tmp-{os.getpid()}").exists()


@pytest.mark.slow  # ~10 s each; the stop after the current shard of an evaluation runs in the default suite
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_signal_stops_predict_after_the_current_batch(tmp_path, reference, signum):
    """`lit-score predict` (4 batches): a signal during batch 1 -> batch 1 finishes, the run stops with a message
    naming the batch and exits 128 + signum instead of sampling on (or exiting 0)."""
    config = write_config(tmp_path, "predict", [{"class_path": "test_resume.SignalAt",
                                                  "init_args": {"step": 1, "signum": signum, "during": "predict"}}])
    proc = subprocess.run(
        [sys.executable, "-m", "lit_score", "predict", "--config", str(config),
         "--ckpt_path", str(reference[1] / "checkpoints/last.ckpt"), "--data.init_args.num_samples", "8",
         "--data.init_args.sample_batch_size", "2", "--model.sampler", "EDMSampler", "--model.sampler.steps", "2",
         "--trainer.logger.init_args.version", "predict"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.Signals[signum], proc.stderr[-3000:]
    assert f"stopped by {signum} after predict batch 1; the remaining batches did not run" in proc.stderr


def test_signal_stops_an_evaluation_after_the_current_shard(tmp_path):
    """lit-score-eval's unit of work is a shard: a signal while shard 0 is sampled lets it be written, then
    stops with 128 + signum; the next shard is never started."""
    store = ShardStore(tmp_path, "fp")
    before = signal.getsignal(signal.SIGTERM)
    with stop_at_boundaries():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives "during" shard 0
        with pytest.raises(Interrupted) as stop:
            store.save(0, {"x": torch.ones(2)})
            store.save(1, {"x": torch.ones(2)})
    assert stop.value.code == 128 + signal.SIGTERM and "after shard 0" in str(stop.value)
    assert store.pending(3) == [1, 2] and torch.equal(store.load(0)["x"], torch.ones(2))
    assert signal.getsignal(signal.SIGTERM) == before


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


def test_resume_refuses_an_interval_its_config_has_already_resolved(tmp_path):
    """Property: `fit --resume RUN --sample_every 5` (or --ema_rate, ...) stops in one line instead of resuming
    with the interval of the run's config.yaml, whose callbacks hold the resolved value; other overrides pass."""
    run = tmp_path / "runs" / "q" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("sample_every: 100\n")
    for option in ("--sample_every", "--ema_rate"):
        with pytest.raises(ConfigurationError, match=rf"^--resume .*{option} would be ignored") as err:
            run_cli(["fit", "--resume", str(run), option, "5"])
        assert "\n" not in str(err.value)
    from lit_score.callbacks.resume import resume_args

    assert resume_args(["fit", "--resume", str(run), "--trainer.max_steps", "9"])[-2:] == ["--trainer.max_steps", "9"]
