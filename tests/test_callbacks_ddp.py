"""EMA, sample grids and FID under real DDP (2 CPU processes, gloo), launched through the `lit-score` script.

Two launches: a 2-process fit of 4 steps, then a 1-process fit resumed from its checkpoint to step 6. FID and KID
use InceptionV3 on a random-weight file (the real architecture and resize) against the first 12 training images.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_score.callbacks.ema import EMA
from lit_score.callbacks.fid import FID
from lit_score.data import DigitsDataModule
from lit_score.diffusion.ema import warmup_decay
from lit_score.metrics import InceptionV3

ROOT = Path(__file__).resolve().parents[1]
LIT_SCORE = str(Path(sys.executable).parent / "lit-score")
RATE = 0.9


class FirstDigits(DigitsDataModule):
    """The quickstart digits, whose FID reference set is the first 12 training images (Inception on CPU is slow)."""

    def full_dataset(self):
        return torch.utils.data.Subset(self.train_set, range(12))

    def cache_key(self):
        return f"{super().cache_key()}-first12"


class Probe(L.Callback):
    """Test instrument: each rank writes its training-weight (``net``) trajectory, EMA network (``ema``), EMA counter
    and FID to rank<r>.pt."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict = {"after_step": [], "before_batch": []}

    @staticmethod
    def _weights(pl_module, name="net"):
        return {k: v.detach().cpu().clone() for k, v in getattr(pl_module, name).state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        self.record |= {"initial": self._weights(pl_module), "initial_updates": ema.num_updates,
                        "initial_shadow": self._weights(pl_module, "ema"),
                        "ema_requires_grad": any(p.requires_grad for p in pl_module.ema.parameters())}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["before_batch"].append(self._weights(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["after_step"].append(self._weights(pl_module))

    def on_train_end(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        fid = next(cb for cb in trainer.callbacks if isinstance(cb, FID))
        phema = next(cb for cb in trainer.callbacks if type(cb).__name__ == "PostHocEMA")
        self.record["phema"] = [{k: v.cpu().clone() for k, v in s.items()} for s in phema.ema.shadows]
        self.record |= {"shadow": self._weights(pl_module, "ema"),
                        "num_updates": ema.num_updates, "fid": fid.last_value, "kid": fid.last_kid,
                        "world": trainer.world_size}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def _config(tmp_path: Path, probe_dir: Path, inception_weights: Path) -> Path:
    sampler = {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 2}}
    config = {
        "defaults": [str(ROOT / "experiments" / "quickstart.yaml")],
        "trainer": {
            "max_steps": 4, "log_every_n_steps": 1, "val_check_interval": 2, "limit_val_batches": 1,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_top_k": -1, "every_n_train_steps": 4}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                 "init_args": {"logging_interval": "step"}},
                {"class_path": "lit_score.callbacks.EMA", "init_args": {"rate": RATE}},
                {"class_path": "lit_score.callbacks.SampleGrid",
                 "init_args": {"every_n_steps": 2, "num_samples": 7, "batch_size": 3, "sampler": sampler}},
                {"class_path": "lit_score.callbacks.FID",
                 "init_args": {"features": {"class_path": "lit_score.metrics.InceptionV3",
                                            "init_args": {"weights_path": str(inception_weights)}},
                               "num_samples": 11, "every_n_steps": 4, "batch_size": 4, "at_start": True,
                               "kid_subset_size": 4, "kid_subsets": 10,
                               "cache_dir": str(tmp_path / "cache"), "sampler": sampler}},
                {"class_path": "lit_score.callbacks.PostHocEMA", "init_args": {"sigma_rels": [0.05, 0.1], "every_n_steps": 2}},
                {"class_path": "test_callbacks_ddp.Probe", "init_args": {"out_dir": str(probe_dir)}},
            ],
        },
        "model": {"warmup": 2, "net": {"init_args": {"nf": 8, "ch_mult": [1, 2], "attn_resolutions": [4]}}},
        "data": {"class_path": "test_callbacks_ddp.FirstDigits",
                 "init_args": {"image_size": 8, "batch_size": 8, "centered": True}},
    }
    path = tmp_path / f"{probe_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, save_dir: Path, *extra: str) -> None:
    # One thread in every process, as DDP gives each of 2 CPU ranks: float32 kernels differ in the last bits
    # with the thread count, and the 1- and 2-process runs are compared bit for bit.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [LIT_SCORE, "fit", "--config", str(config), "--trainer.accelerator", "cpu",
           "--trainer.logger.init_args.save_dir", str(save_dir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _hand_ema(shadow, trajectory, first_update):
    shadow = {k: v.clone() for k, v in shadow.items()}
    for i, weights in enumerate(trajectory):
        decay = warmup_decay(RATE, first_update + i)
        for k, v in weights.items():
            shadow[k] = shadow[k] * decay + v * (1 - decay) if v.is_floating_point() else v.clone()
    return shadow


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _part(state, prefix):
    """The tensors of one network in a checkpoint's state_dict, prefix stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_equal_states(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol) if tol else torch.testing.assert_close(a[k], b[k], rtol=0,
                                                                                              atol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inception_weights):
    tmp = tmp_path_factory.mktemp("ddp")
    _fit(_config(tmp, tmp / "probe2", inception_weights), tmp / "runs2", "--trainer.devices", "2",
         "--trainer.strategy", "ddp")
    run2 = tmp / "runs2" / "quickstart" / "version_0"
    [ckpt] = (run2 / "checkpoints").glob("*step=4.ckpt")
    _fit(_config(tmp, tmp / "probe1", inception_weights), tmp / "runs1", "--trainer.devices", "1",
         "--trainer.max_steps", "6", "--ckpt_path", str(ckpt))
    return {"tmp": tmp, "weights": inception_weights, "run2": run2, "run1": tmp / "runs1" / "quickstart" / "version_0",
            "ckpt": ckpt,
            "ranks": [torch.load(tmp / "probe2" / f"rank{r}.pt", weights_only=False) for r in (0, 1)],
            "resumed": torch.load(tmp / "probe1" / "rank0.pt", weights_only=False)}


def test_ema_is_identical_on_both_ranks_and_equals_hand_computation(runs):
    """Property: with 2 processes both ranks hold the same EMA network (frozen: no gradient, so DDP leaves it
    alone), equal to s <- d_n s + (1 - d_n) w over the (shared) training weights after each step,
    d_n = min(0.9, (1 + n) / (10 + n))."""
    r0, r1 = runs["ranks"]
    assert r0["world"] == r1["world"] == 2 and r0["num_updates"] == r1["num_updates"] == 4
    assert not r0["ema_requires_grad"] and not r1["ema_requires_grad"]
    _assert_equal_states(r0["shadow"], r1["shadow"])
    for w0, w1 in zip(r0["after_step"], r1["after_step"]):
        _assert_equal_states(w0, w1)
    _assert_equal_states(r0["shadow"], _hand_ema(r0["initial"], r0["after_step"], 1), rtol=1e-6, atol=1e-7)


def test_posthoc_ema_is_identical_on_both_ranks_and_written_once(runs):
    """Property: with 2 processes both ranks hold the same power-function EMAs, equal to
    s <- beta_n s + (1 - beta_n) w, beta_n = (1 - 1/n)^(gamma + 1) (gamma 16.97 and 6.94 for sigma_rel 0.05, 0.10),
    over the training weights after each step; rank 0 alone writes one snapshot per profile at steps 2 and 4."""
    r0, r1 = runs["ranks"]
    for s0, s1 in zip(r0["phema"], r1["phema"]):
        _assert_equal_states(s0, s1)
    for gamma, shadow in zip((16.9722, 6.9372), r0["phema"]):
        assert set(shadow) == {"net." + k for k in r0["after_step"][0]}  # the trained network, not the EMA one
        hand = {k: v.double() for k, v in r0["after_step"][0].items() if v.is_floating_point()}
        for n, weights in enumerate(r0["after_step"][1:], start=2):
            beta = (1 - 1 / n) ** (gamma + 1)
            hand = {k: beta * hand[k] + (1 - beta) * weights[k].double() for k in hand}
        _assert_equal_states({k: shadow["net." + k].double() for k in hand}, hand, rtol=1e-5, atol=1e-6)
    names = sorted(p.name for p in (runs["run2"] / "posthoc_ema").iterdir())
    assert names == [f"phema-{step:09d}-{s:.6f}.pt" for step in (2, 4) for s in (0.05, 0.1)]


def test_validation_leaves_training_weights_unchanged(runs):
    """Property: on every rank the weights entering step 3 (after validation at step 2) are those after step 2."""
    events = _events(runs["run2"])
    assert [e.step for e in events.Scalars("val/loss")] == [1, 3]
    for rank in runs["ranks"]:
        _assert_equal_states(rank["before_batch"][2], rank["after_step"][1])


def test_one_checkpoint_with_both_weights(runs):
    """Property: the 2-process run writes one step-4 checkpoint whose state_dict holds the ranks' EMA network as
    ema.* and the training weights as net.*, and nothing else."""
    assert len(list((runs["run2"] / "checkpoints").glob("*step=4*"))) == 1
    ckpt = torch.load(runs["ckpt"], map_location="cpu", weights_only=True)
    ema, net = _part(ckpt["state_dict"], "ema."), _part(ckpt["state_dict"], "net.")
    assert len(ema) + len(net) == len(ckpt["state_dict"]) and "ema_state_dict" not in ckpt
    _assert_equal_states(ema, runs["ranks"][0]["shadow"])
    _assert_equal_states(net, runs["ranks"][0]["after_step"][-1])
    assert ckpt["callbacks"]["EMA"]["num_updates"] == 4


def test_resume_continues_ema_counter_and_shadow(runs):
    """Property: the resumed run starts from the checkpoint's counter (4) and EMA network, and its updates 5 and 6
    use the decays of n = 5, 6."""
    resumed, ckpt = runs["resumed"], torch.load(runs["ckpt"], map_location="cpu", weights_only=True)
    assert resumed["initial_updates"] == 4 and resumed["num_updates"] == 6
    ema = _part(ckpt["state_dict"], "ema.")
    _assert_equal_states(resumed["initial_shadow"], ema)
    _assert_equal_states(resumed["initial"], _part(ckpt["state_dict"], "net."))
    expected = _hand_ema(ema, resumed["after_step"], 5)
    _assert_equal_states(resumed["shadow"], expected, rtol=1e-6, atol=1e-7)


def test_sample_grid_does_not_depend_on_the_number_of_processes(runs):
    """Property: the step-4 grid (EMA weights, seeds 0..6) drawn by 2 processes equals the one drawn by 1."""
    two = np.asarray(Image.open(runs["run2"] / "samples" / "step_00000004.png"))
    one = np.asarray(Image.open(runs["run1"] / "samples" / "step_00000004.png"))
    assert two.shape == one.shape and two.dtype == np.uint8
    assert np.array_equal(two, one)
    assert sorted(p.name for p in (runs["run2"] / "samples").iterdir()) == [
        "step_00000000.png", "step_00000002.png", "step_00000004.png"]


def test_fid_does_not_depend_on_the_number_of_processes(runs):
    """Property: Inception FID and KID of the step-4 EMA weights are identical from 2 processes (on both ranks) and
    from 1 (the same seed chunks, their features added in seed order), against 12 reference images counted once."""
    r0, r1 = runs["ranks"]
    assert r0["fid"] == r1["fid"] and r0["kid"] == r1["kid"]
    events2, events1 = _events(runs["run2"]), _events(runs["run1"])
    for tag, value in (("val/fid@11", r0["fid"]), ("val/kid@11", r0["kid"][0])):
        two = {e.step: e.value for e in events2.Scalars(tag)}
        one = {e.step: e.value for e in events1.Scalars(tag)}
        assert set(two) == {0, 4} and 4 in one
        assert two[4] == pytest.approx(value, rel=1e-6)
        assert one[4] == two[4]
    assert r0["fid"] > 0
    [cached] = (runs["tmp"] / "cache").iterdir()
    reference = torch.load(cached, weights_only=True)
    assert reference["count"] == 12 and reference["features"].shape == (12, 2048)
    assert reference["key"].endswith(InceptionV3(str(runs["weights"])).identity)


def test_tensorboard_holds_every_tag_in_one_run(runs):
    """Property: the 2-process run has one event file holding loss, lr, grad norm, EMA decay, samples, FID (with
    its protocol text) and the hyper-parameters."""
    assert len(list(runs["run2"].glob("events.out.tfevents.*"))) == 1
    events = _events(runs["run2"])
    tags = events.Tags()
    assert {"train/loss", "val/loss", "train/grad_norm", "train/lr", "train/ema_decay", "val/fid@11"} <= set(
        tags["scalars"])
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]
    assert "val/fid@11/text_summary" in tags["tensors"] and "val/kid@11" in tags["scalars"]
    decays = [e.value for e in events.Scalars("train/ema_decay")]
    assert decays == pytest.approx([warmup_decay(RATE, n) for n in range(1, 5)])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
