"""Charts that are right: every scalar at the step it belongs to, whatever the epoch length and the logging
interval; a resumed run neither repeats nor loses what its first step logged; the notices and warnings of a stop,
a resume and an evaluation are said once, and only where they mean something."""
from __future__ import annotations

import json
import math
import os
import signal
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from lit_score.callbacks import EMA
from lit_score.callbacks.preemption import Preemption
from lit_score.cli.main import main
from lit_score.data import DigitsDataModule
from lit_score.runtime.module import ScoreModel
from test_progress import TINY_NET
from test_resume import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


class Truth(L.Callback):
    """What each optimizer step k did, computed here: the loss of its batch, its learning rate and the norm of its
    gradients (float64, before clipping)."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.lr: dict[int, float] = {}
        self.grad_norm: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.lr[step] = optimizer.param_groups[0]["lr"]
        self.grad_norm[step] = math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                             for p in pl_module.parameters() if p.grad is not None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss[trainer.global_step - 1] = float(outputs["loss"])


def test_scalars_are_at_their_steps_with_the_default_logging_interval(tmp_path):
    """Lightning's default log_every_n_steps (50), 60 batches an epoch, 100 steps: train/loss, train/lr,
    train/grad_norm and train/ema_decay are each at steps 49 and 99, with step k's loss, learning rate (warm-up:
    one per step) and gradient norm (the norm of step 0 stood at 49, and none at 99, in an epoch it did not
    start)."""
    from lit_score.diffusion.sdes import VPSDE
    from lit_score.networks import DDPMpp

    model = ScoreModel(DDPMpp(num_channels=1, image_size=8, **TINY_NET), VPSDE(N=20), warmup=200)
    truth = Truth()
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, max_steps=100, limit_val_batches=0,
                        callbacks=[truth, LearningRateMonitor(logging_interval="step"), EMA(rate=0.9)],
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    data = DigitsDataModule(image_size=8, batch_size=3, val_fraction=0.9)
    trainer.fit(model, data)
    assert trainer.num_training_batches == 60 and trainer.log_every_n_steps == 50
    logged = events(logger.log_dir)
    scalars = {tag: {e.step: e.value for e in logged.Scalars(tag)}
               for tag in ("train/loss", "train/lr", "train/grad_norm", "train/ema_decay")}
    for tag, values in scalars.items():
        assert sorted(values) == [49, 99], (tag, sorted(values))
    for step in (49, 99):
        assert scalars["train/grad_norm"][step] == pytest.approx(truth.grad_norm[step], rel=1e-5), step
        assert scalars["train/loss"][step] == pytest.approx(truth.loss[step], rel=1e-6), step
        assert scalars["train/lr"][step] == pytest.approx(truth.lr[step], rel=1e-6), step
    assert truth.grad_norm[0] != pytest.approx(truth.grad_norm[49], rel=1e-3)


class _CtrlCInWorkers(Dataset):
    """Four items; the worker that loads item 0 or 1 gets a SIGINT, as Ctrl-C reaches every process of the
    terminal's process group."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 2:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(1)


def test_ctrl_c_is_announced_once_as_an_interruption(capfd):
    """Ctrl-C with two data-loader workers (forked with the handler): one notice, from the main process, that
    says "interrupted (Ctrl-C)", not pre-emption; the workers keep loading."""
    preemption = Preemption()
    preemption.on_predict_start(None, None)  # installs the handler
    try:
        loader = DataLoader(_CtrlCInWorkers(), batch_size=1, num_workers=2, multiprocessing_context="fork")
        assert len(list(loader)) == 4
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.received == signal.SIGINT
    finally:
        preemption.teardown(None, None, "predict")
    err = capfd.readouterr().err
    assert err.count("Interrupted (Ctrl-C): stopping with a checkpoint after this step") == 1, err
    assert "pre-emption" not in err.lower()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, one_thread):
    """`lit-score fit ... --ckpt_path last` (a first launch) in a relative runs/ folder, 5 batches an epoch, scalars
    every 10 steps, a grid every 2 steps and an FID every 3, stopped by Ctrl-C during step 2 (last.ckpt at step
    3), then `lit-score fit --resume` to step 7; the warnings of both."""
    tmp = tmp_path_factory.mktemp("charts")
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["trainer"].update(max_steps=7, log_every_n_steps=10,
                             logger={"init_args": {"save_dir": "runs", "name": "tiny"}})
    sampler = {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 2}}
    config["trainer"]["callbacks"] += [
        {"class_path": "lit_score.callbacks.SampleGrid",
         "init_args": {"every_n_steps": 2, "num_samples": 4, "batch_size": 4, "sampler": sampler}},
        {"class_path": "lit_score.callbacks.FID",
         "init_args": {"features": {"class_path": "lit_score.metrics.RandomConvFeatures",
                                    "init_args": {"num_features": 4, "width": 2}},
                       "num_samples": 6, "every_n_steps": 3, "batch_size": 3, "sampler": sampler,
                       "cache_dir": str(tmp / "cache")}}]
    config["trainer"]["callbacks"].append({"class_path": "test_resume.SignalAt",
                                           "init_args": {"step": 2, "signum": "SIGINT"}})
    (tmp / "stop.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp / "runs/tiny/run"
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.chdir(tmp)
        patch.setenv("OMP_NUM_THREADS", "1")
        for argv, code, step in ((["fit", "--config", "stop.yaml", "--trainer.logger.init_args.version", "run",
                                   "--ckpt_path", "last"], 128 + signal.SIGINT, 3),
                                 (["fit", "--resume", "runs/tiny/run"], 0, 7)):
            patch.setattr("sys.argv", ["lit-score", *argv, "--threads", "1"])
            with pytest.raises(SystemExit) as exit_:
                main()
            assert exit_.value.code == code
            assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"] == step
    return run_dir, [str(w.message) for w in caught]


def test_a_resumed_run_neither_repeats_nor_loses_its_first_steps_grid_and_fid(resumed):
    """Stopped at step 3 (an FID step, not a grid step), resumed to 7: grids at 0, 2, 4, 6 only (no extra one at
    3), each once in TensorBoard; the FID of step 3, computed before the stop, is still in TensorBoard (whose
    purge of the stopped run's steps from 3 on would hide it) beside that of step 6."""
    run_dir, _ = resumed
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        f"step_{s:08d}.png" for s in (0, 2, 4, 6)]
    logged = events(run_dir)
    assert [e.step for e in logged.Images("samples")] == [0, 2, 4, 6]
    assert [e.step for e in logged.Scalars("val/fid@6")] == [3, 6]


def test_starting_and_resuming_in_place_warn_of_nothing_expected(resumed):
    """`--ckpt_path last` before any checkpoint, the run's own non-empty checkpoint folder on resume, `--resume`
    spelling the run directory absolute where the run had a relative one, and epochs shorter than the logging
    interval: none of Lightning's warnings about them ("no last checkpoint", "exists and is not empty", "dirpath
    has changed", "smaller than the logging interval"); last.ckpt is replaced in place, with the state of its
    ModelCheckpoint carried on."""
    run_dir, caught = resumed
    expected = ("no last checkpoint available", "exists and is not empty", "dirpath has changed",
                "smaller than the logging interval")
    assert not [m for m in caught if any(e in m for e in expected)], caught
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]
    state = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    [checkpoint] = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert checkpoint["dirpath"] == str(run_dir / "checkpoints")
    assert checkpoint["last_model_path"] == str(run_dir / "checkpoints/last.ckpt")


def test_evaluating_a_checkpoint_asks_for_no_training_callbacks(resumed, tmp_path):
    """Validating the run's last.ckpt with a Trainer of other callbacks, checkpointing elsewhere: neither
    Lightning's "callbacks used to create the checkpoint need to be provided" nor "dirpath has changed"."""
    run_dir, _ = resumed
    last = run_dir / "checkpoints/last.ckpt"
    model = ScoreModel.load_from_checkpoint(last)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[
                            ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_train_steps=6)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model, DigitsDataModule(image_size=8, batch_size=32, val_fraction=0.9), ckpt_path=last)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "dirpath has changed" in m or "when using `ckpt_path`" in m], messages


def test_help_lists_the_subcommands_and_the_tools(monkeypatch, capsys):
    """`lit-score --help` names fit, validate, test, predict and every tool, each with a line on what it does;
    `lit-score` alone says the same on stderr and exits 2."""
    from lit_score.cli.main import SUBCOMMANDS, TOOL_HELP, TOOLS, main

    assert set(TOOL_HELP) == set(TOOLS)
    for argv, code in ((["lit-score", "--help"], 0), (["lit-score"], 2)):
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == code
        out, err = capsys.readouterr()
        shown = out if code == 0 else err
        for name, text in {**SUBCOMMANDS, **TOOL_HELP}.items():
            assert any(line.split() and line.split()[0] == name and text in line for line in shown.splitlines()), \
                (name, shown)


def test_results_json_counts_samples_as_a_number(tmp_path):
    """results.json's "n" is the number of samples, 32, not the string "32" (nor "50k" for 50000)."""
    from lit_score.evaluate.evaluator import Evaluator
    from lit_score.evaluate.shards import ShardStore
    from lit_score.metrics import RandomConvFeatures
    from lit_score.metrics.reference import ReferenceStatistics

    evaluator = Evaluator(out_dir=str(tmp_path), num_samples=32, shard_size=32, batch_size=32,
                          features=RandomConvFeatures(num_features=3), inception_score=False, kid=False, bpd=False)
    store = ShardStore(tmp_path, "fp")
    g = torch.Generator().manual_seed(0)
    store.save(0, {"seeds": [0, 31], "features": torch.randn(32, 3, generator=g, dtype=torch.float64),
                   "logits": None, "images": None, "nfe": [[32, 3]]})
    reference = ReferenceStatistics(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), 100, "k")
    results = evaluator._sample_metrics(store, reference)
    assert json.loads(json.dumps(results))["n"] == 32
