"""The EMA callback in one process: the model's EMA network as a hand-computed average, checkpoints, resume, and the
EMA network as the weights that validation, sampling and predict use, with no swap."""
from __future__ import annotations

import copy
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_score.callbacks.ema import EMA
from lit_score.data_space import DataSpace
from lit_score.diffusion.ema import halflife_decay, warmup_decay
from lit_score.diffusion.sdes import VPSDE
from lit_score.networks import ScoreMLP
from lit_score.runtime.module import ScoreModel
from lit_score.sampling import EDMSampler

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(L.LightningModule):
    """Linear + BatchNorm (a float buffer to average and an integer one to copy), plain SGD, and the model's side of
    the EMA callback (``net``, ``ema``, and ScoreModel's ``add_ema`` and ``sampling_net``)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        self.ema: nn.Module | None = None
        self.validation_weights: list[dict[str, torch.Tensor]] = []

    add_ema = ScoreModel.add_ema  # the model's side of the EMA, ScoreModel's own code
    sampling_net = ScoreModel.sampling_net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.validation_weights.append({k: v.clone() for k, v in self.sampling_net.state_dict().items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


class Recorder(L.Callback):
    """The training weights (``net``) after every optimizer step and before every training batch."""

    def __init__(self):
        self.after_step, self.before_batch = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before_batch.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


def _trainer(tmp_path, callbacks, **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    return L.Trainer(callbacks=callbacks, **(defaults | kw))


def _hand_ema(initial, trajectory, decays, averaged=None):
    """s <- d s + (1 - d) w over the float tensors (those in ``averaged``, default all), others copied."""
    shadow = {k: v.clone() for k, v in initial.items()}
    for weights, decay in zip(trajectory, decays):
        for k, v in weights.items():
            mean = v.is_floating_point() and (averaged is None or k in averaged)
            shadow[k] = shadow[k] * decay + v * (1 - decay) if mean else v.clone()
    return shadow


def _assert_states(actual, expected, exact=False):
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, **({"rtol": 0, "atol": 0} if exact else {}))


def test_decay_formulas():
    """Property: score_sde's warm-up min(rate, (1+n)/(10+n)) and EDM's half-life with ramp-up."""
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 10**6) == 0.9999
    assert halflife_decay(512, 500, 10**9, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert halflife_decay(512, 500, 10_240, 0.05) == pytest.approx(0.5 ** (512 / 512))
    with pytest.raises(ValueError, match="rate"):
        EMA(rate=1.5)


def test_ema_network_equals_hand_computation_and_validation_sees_it(tmp_path):
    """Property: fit gives the model a frozen EMA network, and after each step ema <- d_n ema + (1 - d_n) net with
    the warm-up decay (integer buffers copied); only net is optimised; validation runs on the EMA network and
    leaves the training weights as they were."""
    torch.manual_seed(0)
    model, ema, rec = Tiny(), EMA(rate=0.9), Recorder()
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = _trainer(tmp_path, [ema, rec], max_steps=6, val_check_interval=3, check_val_every_n_epoch=None,
                       limit_val_batches=1)
    trainer.fit(model, _data(), _data(4))
    assert model.ema is not None and model.ema is not model.net
    assert not any(p.requires_grad for p in model.ema.parameters())
    [group] = trainer.optimizers[0].param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model.net.parameters()}
    decays = [warmup_decay(0.9, n) for n in range(1, 7)]
    assert ema.num_updates == 6
    _assert_states(model.ema.state_dict(), _hand_ema(initial, rec.after_step, decays))
    # validation after step 3: the EMA network's weights, the training weights before step 4 unchanged
    _assert_states(model.validation_weights[0], _hand_ema(initial, rec.after_step[:3], decays[:3]))
    _assert_states(rec.before_batch[3], rec.after_step[2], exact=True)
    _assert_states(model.net.state_dict(), rec.after_step[-1], exact=True)


def test_without_buffers_parameters_are_averaged_and_buffers_copied(tmp_path):
    """Property: buffers=False (the official EMA) averages the parameters only; the EMA network's buffers (BatchNorm's
    running statistics and count) are the training network's."""
    torch.manual_seed(0)
    model, rec = Tiny(), Recorder()
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    _trainer(tmp_path, [EMA(rate=0.8, warmup=False, buffers=False), rec], max_steps=3).fit(model, _data())
    params = {name for name, _ in model.net.named_parameters()}
    _assert_states(model.ema.state_dict(), _hand_ema(initial, rec.after_step, [0.8] * 3, averaged=params))
    assert torch.equal(model.ema.state_dict()["1.running_mean"], rec.after_step[-1]["1.running_mean"])
    assert not torch.equal(model.ema.state_dict()["0.weight"], rec.after_step[-1]["0.weight"])


def test_checkpoint_resume_continues_counter_and_ema_network(tmp_path):
    """Property: a checkpoint holds the training weights as net.* and the EMA network as ema.* in its state_dict (no
    other weights); resuming from it continues the counter (decays of updates 4, 5, 6) and the EMA network from the
    saved one."""
    torch.manual_seed(0)
    first, model = EMA(rate=0.95), Tiny()
    trainer = _trainer(tmp_path / "b", [first], max_steps=3)
    trainer.fit(model, _data())
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert "ema_state_dict" not in saved and "weights" not in saved
    net = {k[4:]: v for k, v in saved["state_dict"].items() if k.startswith("net.")}
    ema = {k[4:]: v for k, v in saved["state_dict"].items() if k.startswith("ema.")}
    assert len(net) + len(ema) == len(saved["state_dict"])
    _assert_states(net, model.net.state_dict(), exact=True)
    _assert_states(ema, model.ema.state_dict(), exact=True)
    assert saved["callbacks"]["EMA"]["num_updates"] == 3

    resumed, rec, again = EMA(rate=0.95), Recorder(), Tiny()
    _trainer(tmp_path / "c", [resumed, rec], max_steps=6).fit(again, _data(), ckpt_path=ckpt)
    _assert_states(rec.before_batch[0], net, exact=True)
    assert resumed.num_updates == 6 and len(rec.after_step) == 3
    _assert_states(again.ema.state_dict(), _hand_ema(ema, rec.after_step, [warmup_decay(0.95, n) for n in (4, 5, 6)]))


def test_halflife_counts_global_images_per_optimizer_step(tmp_path):
    """Property: with gradient accumulation the EMA updates once per optimizer step, counting every image."""
    torch.manual_seed(0)
    ema = EMA(halflife_kimg=0.01, rampup_ratio=None)
    _trainer(tmp_path, [ema], max_steps=3, accumulate_grad_batches=2).fit(Tiny(), _data(24))
    assert ema.num_updates == 3 and ema.num_images == 3 * 2 * 4
    assert ema.decay(8) == pytest.approx(0.5 ** (8 / 10))


def test_the_callback_refuses_a_model_without_an_ema_network():
    plain = L.LightningModule()
    plain.net = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="add_ema"):
        EMA().setup(None, plain, "fit")


# -- ScoreModel: the EMA network is the weights to sample with ------------------------------------------------------
VECTORS = DataSpace((4,), centered=False, num_levels=None)


def _score_model(net: nn.Module | None = None) -> ScoreModel:
    torch.manual_seed(0)
    return ScoreModel(net or ScoreMLP(num_channels=4, hidden=16, depth=1), VPSDE(), lr=0.05, warmup=0,
                      sampler=EDMSampler(steps=2), data_space=VECTORS)


def _vectors(n: int, seed: int) -> DataLoader:
    return DataLoader(torch.rand(n, 4, generator=torch.Generator().manual_seed(seed)), batch_size=4)


def _save(trainer: L.Trainer, path):
    """The trainer's checkpoint (a model built in Python saves its network and SDE as None: it reads with
    weights_only=True)."""
    trainer.save_checkpoint(path)
    return path


class States(L.Callback):
    """net and ema around validation."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    def _keep(self, when, pl_module):
        self.records[when] = {name: {k: v.clone() for k, v in getattr(pl_module, name).state_dict().items()}
                              for name in ("net", "ema")}

    def on_validation_start(self, trainer, pl_module):
        self._keep("before", pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._keep("after", pl_module)


def test_the_ema_network_is_what_validation_sampling_and_predict_use(tmp_path):
    """Property: after a fit, net and ema differ; val/loss is the EMA network's loss and validation leaves both
    networks as they were; model.sample and predict from the checkpoint (a fresh model, which gets its EMA network from
    the checkpoint's ema.*) sample exactly what a model whose only network holds the EMA weights samples, and not
    what the trained weights sample."""
    model, states = _score_model(), States()
    trainer = _trainer(tmp_path, [EMA(rate=0.5, warmup=False), states], max_steps=3, val_check_interval=3,
                       check_val_every_n_epoch=None, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(model, _vectors(12, 0), _vectors(4, 1))
    ema_state = model.ema.state_dict()
    assert any(not torch.equal(v, model.net.state_dict()[k]) for k, v in ema_state.items())
    for name in ("net", "ema"):
        _assert_states(states.records["after"][name], states.records["before"][name], exact=True)
    x = next(iter(_vectors(4, 1)))
    with torch.no_grad():
        ema_loss = model.compute_loss(x, torch.Generator().manual_seed(0), net=model.ema)
        net_loss = model.compute_loss(x, torch.Generator().manual_seed(0))
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(ema_loss), rel=1e-6)
    assert abs(float(ema_loss) - float(net_loss)) > 1e-4

    seeds = torch.arange(6)
    only_ema, only_net = _score_model(copy.deepcopy(model.ema)), _score_model(copy.deepcopy(model.net))
    expected = only_ema.sample(seeds).samples
    assert torch.equal(model.eval().sample(seeds).samples, expected)
    assert not torch.allclose(only_net.sample(seeds).samples, expected)

    ckpt = _save(trainer, tmp_path / "fit.ckpt")
    fresh = _score_model()
    [out] = _trainer(tmp_path, []).predict(fresh, DataLoader(seeds, batch_size=6), ckpt_path=ckpt)
    assert torch.equal(out["samples"], expected)
    _assert_states(fresh.ema.state_dict(), ema_state, exact=True)
    _assert_states(fresh.net.state_dict(), model.net.state_dict(), exact=True)


def test_a_checkpoint_without_ema_weights_starts_the_ema_network_from_its_training_weights(tmp_path):
    """Property: resuming with the EMA callback from a checkpoint without ema.* starts the EMA from its net.*."""
    model = _score_model()
    trainer = _trainer(tmp_path, [], max_steps=2)
    trainer.fit(model, _vectors(8, 0))
    ckpt = _save(trainer, tmp_path / "plain.ckpt")
    assert not any(k.startswith("ema.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    resumed, rec = _score_model(), Recorder()
    with pytest.warns(UserWarning, match="no EMA weights"):
        _trainer(tmp_path, [EMA(rate=0.5, warmup=False), rec], max_steps=3).fit(resumed, _vectors(8, 0),
                                                                               ckpt_path=ckpt)
    _assert_states(resumed.ema.state_dict(), _hand_ema(rec.before_batch[0], rec.after_step, [0.5]))


def test_lit_score_export_ema_names_its_replacement(tmp_path):
    """`lit-score export-ema` (release 0.1) answers in one line with the command that replaced it."""
    proc = subprocess.run([sys.executable, "-m", "lit_score", "export-ema", "last.ckpt", "ema.safetensors"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "lit-score: error: `lit-score export-ema` was replaced by `lit-score export CHECKPOINT OUT_DIR --weights ema`"]


def test_a_model_with_ema_weights_fit_without_the_ema_callback_says_they_stay(tmp_path):
    """Property: fitting a model that has an EMA network without the EMA callback warns that the weights to sample
    with stay as loaded (they would otherwise silently lag the trained network)."""
    model = _score_model()
    model.add_ema()
    with pytest.warns(UserWarning, match="no EMA callback: it stays as loaded"):
        _trainer(tmp_path, [], max_steps=1).fit(model, _vectors(4, 0))
