"""The NonFinite callback with a real Trainer, a tiny ScoreModel, its Adam and the EMA callback: a NaN planted into one
step's loss or gradients is skipped (weights and Adam's state bit for bit as before the step, the counter at 1) or
replaced as EDM does; consecutive ones stop the run in one line; the counts survive a resume; bf16-mixed, 16-mixed
(AMP's GradScaler on CPU, through Lightning's MixedPrecision plugin) and 2 DDP processes with the NaN on one rank.

Run as a script (``python test_nonfinite.py OUT``), the file is the DDP side: 2 gloo processes that write rank<r>.pt.
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
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lit_score.callbacks import EMA, NonFinite
from lit_score.data_space import DataSpace
from lit_score.diffusion.sdes import VPSDE
from lit_score.errors import NonFiniteError, run_reporting_errors
from lit_score.networks import ScoreMLP
from lit_score.runtime.module import ScoreModel

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
VECTORS = DataSpace((4,), centered=False, num_levels=None)
NAN_LOSS = "loss * nan"  # a NaN loss and NaN gradients
NAN_IN_LOSS = "loss + nan"  # a NaN loss, finite gradients
BAD_GRAD = "nan, inf, -inf in a gradient"  # after the backward pass (and DDP's all-reduce), a finite loss


class Planted(ScoreModel):
    """A ScoreModel whose optimizer step ``trainer.global_step == k`` meets ``plant[k]`` (on rank ``rank`` only, if
    set); it keeps the gradients it planted and those the optimizer was given."""

    plant: dict[int, str] = {}
    rank: int | None = None

    def _planted(self) -> str | None:
        mine = self.rank is None or self.rank == self.global_rank
        return self.plant.get(self.trainer.global_step) if mine else None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        what = self._planted()
        return loss * float("nan") if what == NAN_LOSS else loss + float("nan") if what == NAN_IN_LOSS else loss

    def on_after_backward(self) -> None:
        if self._planted() == BAD_GRAD:
            grad = self.net.inp.weight.grad
            grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
            self.planted = grad.detach().clone().numpy()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.given = {k: p.grad.detach().clone() for k, p in self.net.named_parameters() if p.grad is not None}
        super().on_before_optimizer_step(optimizer)


class Recorder(L.Callback):
    """The training weights before each batch; after each step the weights, the EMA network, Adam's state and (under
    AMP's GradScaler) the scale."""

    def __init__(self) -> None:
        self.before, self.after, self.ema, self.adam, self.scale = [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(clone(pl_module.net.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(clone(pl_module.net.state_dict()))
        self.ema.append(clone(pl_module.ema.state_dict()) if pl_module.ema is not None else {})
        opt = trainer.optimizers[0]
        names = {p: n for n, p in pl_module.net.named_parameters()}
        self.adam.append({f"{names[p]}.{k}": v for p in opt.param_groups[0]["params"]
                          for k, v in clone(opt.state[p]).items()})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale.append(scaler.get_scale() if scaler is not None else None)


def clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


def model(plant: dict[int, str], rank: int | None = None) -> Planted:
    torch.manual_seed(0)
    net = Planted(ScoreMLP(num_channels=4, hidden=16, depth=1), VPSDE(), lr=0.05, warmup=0, data_space=VECTORS)
    net.plant, net.rank = plant, rank
    return net


def trainer(root, steps: int, callbacks: list, devices: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                     **kwargs)


def data() -> DataLoader:
    return DataLoader(torch.rand(32, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)


def fit(tmp_path, plant: dict[int, str], steps: int, nonfinite: NonFinite, ckpt_path=None,
        **kwargs) -> tuple[Recorder, Planted, L.Trainer]:
    rec, net = Recorder(), model(plant)
    run = trainer(tmp_path, steps, [nonfinite, EMA(rate=0.9), rec], **kwargs)
    run.fit(net, data(), ckpt_path=ckpt_path)
    return rec, net, run


def assert_skipped_exactly(rec: Recorder, skipped: set[int]) -> None:
    """The steps in ``skipped`` left the weights and Adam's state bit for bit as they were; the others trained; all
    finite."""
    for step, (before, after) in enumerate(zip(rec.before, rec.after)):
        assert same(before, after) == (step in skipped), step
        assert finite(after) and finite(rec.ema[step]) and finite(rec.adam[step]), step
        if step in skipped and step > 0:
            assert same(rec.adam[step], rec.adam[step - 1]), step


@pytest.mark.parametrize("plant", [NAN_LOSS, NAN_IN_LOSS])
def test_skip_leaves_weights_and_adam_state_of_the_bad_step_unchanged(tmp_path, plant):
    """Property: the step with a NaN loss (NaN gradients, or finite ones) changes no weight and none of Adam's
    moments or step count, the other steps train, all stays finite and ``train/nonfinite_steps`` is 1; gradient
    clipping (after the callback) meets no gradient."""
    callback = NonFinite("skip")
    rec, net, run = fit(tmp_path, {2: plant}, 5, callback, gradient_clip_val=1.0)
    assert_skipped_exactly(rec, {2})
    assert [float(a["inp.weight.step"]) for a in rec.adam] == [1, 2, 2, 3, 4]
    assert callback.total == 1 and callback.consecutive == 0
    assert float(run.callback_metrics["train/nonfinite_steps"]) == 1
    # Lightning counts the skipped step: the EMA callback folds the (unchanged) weights in as after any step.
    ema = next(cb for cb in run.callbacks if isinstance(cb, EMA))
    assert ema.num_updates == 5 and run.global_step == 5


def test_replace_is_edms_nan_to_num_of_the_planted_gradient(tmp_path):
    """Property: the optimizer is given the planted gradient with NaN -> 0, +inf -> 1e5, -inf -> -1e5 (numpy's
    nan_to_num, the oracle), the other gradients as they were, and takes the step; the counter is 1."""
    callback = NonFinite("replace")
    rec, net, run = fit(tmp_path, {4: BAD_GRAD}, 5, callback)
    expected = np.nan_to_num(net.planted, nan=0.0, posinf=1e5, neginf=-1e5)
    np.testing.assert_array_equal(net.given["inp.weight"].numpy(), expected)
    assert np.isnan(net.planted).any() and np.isinf(net.planted).any() and np.isfinite(expected).all()
    assert all(torch.isfinite(g).all() for g in net.given.values())
    assert_skipped_exactly(rec, set())
    assert [float(a["inp.weight.step"]) for a in rec.adam] == [1, 2, 3, 4, 5]
    assert callback.total == 1 and float(run.callback_metrics["train/nonfinite_steps"]) == 1


def test_consecutive_non_finite_steps_stop_the_run_in_one_line(tmp_path, capsys):
    """Property: the third NaN loss in a row stops the run with a NonFiniteError that the command line prints in one
    line (status 2) naming the steps, the count and what to change; the weights stay finite and unchanged."""
    callback, rec = NonFinite("skip", max_consecutive=3), Recorder()
    run = trainer(tmp_path, 8, [callback, EMA(rate=0.9), rec])
    status = run_reporting_errors(lambda: run.fit(model({1: NAN_LOSS, 2: NAN_LOSS, 3: NAN_LOSS}), data()))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines[-2].startswith("lit-score: error: training met a non-finite loss and gradient "
                                                "norm at 3 consecutive optimizer steps (trainer.global_step 1 to 3), "
                                                "3 such step(s) in all; lower the learning rate (model.lr)"), lines
    assert "--traceback" in lines[-1] and run.global_step == 3
    assert_skipped_exactly(rec, {1, 2})
    with pytest.raises(NonFiniteError, match=r"at trainer.global_step 1, 1 such"):
        trainer(tmp_path, 4, [NonFinite(max_consecutive=1)]).fit(model({1: NAN_IN_LOSS}), data())


def test_a_resumed_run_continues_the_counts(tmp_path):
    """Property: the counts are in the checkpoint: a run that saved at step 3 after a NaN loss at step 2, resumed
    with another at step 3, stops at 2 consecutive (steps 2 to 3), 2 in all."""
    first = NonFinite(max_consecutive=2)
    _, _, run = fit(tmp_path / "a", {2: NAN_LOSS}, 3, first)
    run.save_checkpoint(tmp_path / "step3.ckpt")
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=True)["callbacks"]["NonFinite"]
    assert saved["total"] == saved["consecutive"] == 1 and saved["first_step"] == 2
    resumed = NonFinite(max_consecutive=2)
    with pytest.raises(NonFiniteError, match=r"at 2 consecutive optimizer steps \(trainer.global_step 2 to 3\), 2 "):
        fit(tmp_path / "b", {3: NAN_IN_LOSS}, 6, resumed, ckpt_path=tmp_path / "step3.ckpt")
    assert resumed.total == 2


def test_bf16_mixed_skips_the_bad_step(tmp_path):
    """Property: under bf16-mixed on CPU (no grad scaler) the step with a NaN loss is skipped as in 32-bit."""
    callback = NonFinite()
    rec, _, run = fit(tmp_path, {1: NAN_LOSS}, 3, callback, precision="bf16-mixed")
    assert getattr(run.precision_plugin, "scaler", None) is None
    assert_skipped_exactly(rec, {1})
    assert callback.total == 1


@pytest.mark.parametrize("mode", ["skip", "replace"])
def test_16_mixed_leaves_gradient_overflow_to_the_grad_scaler_and_counts_a_nan_loss(tmp_path, mode):
    """Property: under 16-mixed with AMP's GradScaler (on CPU through Lightning's MixedPrecision plugin, since
    ``precision="16-mixed"`` on CPU falls back to bf16-mixed) the scaler skips the step with inf gradients and halves
    its scale, uncounted; a NaN loss is counted, and that step is skipped too, in either mode."""
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1000)
    callback = NonFinite(mode)
    rec, _, run = fit(tmp_path, {1: BAD_GRAD, 3: NAN_LOSS}, 5, callback,
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert run.precision_plugin.scaler is scaler
    assert_skipped_exactly(rec, {1, 3})
    assert rec.scale == [16.0, 8.0, 8.0, 4.0, 4.0]
    assert callback.total == 1 and float(run.callback_metrics["train/nonfinite_steps"]) == 1


# -- 2 DDP processes ---------------------------------------------------------------------------------------------------
def ddp_side(out: Path) -> None:
    """Rank 1 alone meets a gradient NaN (after the all-reduce) at step 1 and a NaN loss with finite gradients at
    step 3; each rank writes its weights around every step and its counter."""
    callback, rec, net = NonFinite("skip"), Recorder(), model({1: BAD_GRAD, 3: NAN_IN_LOSS}, rank=1)
    run = trainer(out, 5, [callback, rec], devices=2)
    run.fit(net, data())
    torch.save({"before": rec.before, "after": rec.after, "adam": rec.adam, "total": callback.total,
                "final": clone(net.net.state_dict())}, out / f"rank{run.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_skip_the_same_steps_when_one_rank_meets_a_nan(tmp_path):
    """Property: with 2 gloo processes and the NaN on rank 1 only, both ranks skip steps 1 and 3 (weights and Adam's
    state unchanged), train the others, count 2 and end with identical weights."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        for step, (before, after) in enumerate(zip(rank["before"], rank["after"])):
            assert same(before, after) == (step in (1, 3)), step
        assert same(rank["adam"][1], rank["adam"][0]) and same(rank["adam"][3], rank["adam"][2])
        assert rank["total"] == 2
    assert same(ranks[0]["final"], ranks[1]["final"])


if __name__ == "__main__":
    ddp_side(Path(sys.argv[1]))
