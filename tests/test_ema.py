"""The EMA callback in one process: the average, its swaps, checkpoints, resume and export."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_score.callbacks.ema import EMA, halflife_decay, load_ema_state_dict, warmup_decay
from lit_score.cli.tools import export_ema_main


class Tiny(L.LightningModule):
    """Linear + BatchNorm (a float buffer to average and an integer one to copy), plain SGD."""

    def __init__(self, fail_in_validation: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        self.fail_in_validation = fail_in_validation
        self.validation_weights: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.validation_weights.append({k: v.clone() for k, v in self.state_dict().items()})
        if self.fail_in_validation:
            raise RuntimeError("boom")

    def predict_step(self, batch, batch_idx):
        return {k: v.clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(L.Callback):
    """The training weights after every optimizer step and before every training batch."""

    def __init__(self):
        self.after_step, self.before_batch = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before_batch.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


def _trainer(tmp_path, callbacks, **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0)
    return L.Trainer(callbacks=callbacks, **(defaults | kw))


def _hand_ema(initial, trajectory, decays):
    shadow = {k: v.clone() for k, v in initial.items()}
    for weights, decay in zip(trajectory, decays):
        for k, v in weights.items():
            shadow[k] = shadow[k] * decay + v * (1 - decay) if v.is_floating_point() else v.clone()
    return shadow


def test_decay_formulas():
    """Property: score_sde's warm-up min(rate, (1+n)/(10+n)) and EDM's half-life with ramp-up."""
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 10**6) == 0.9999
    assert halflife_decay(512, 500, 10**9, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert halflife_decay(512, 500, 10_240, 0.05) == pytest.approx(0.5 ** (512 / 512))
    with pytest.raises(ValueError, match="rate"):
        EMA(rate=1.5)


def test_shadow_equals_hand_computation_and_validation_sees_it(tmp_path):
    """Property: after each step s <- d_n s + (1 - d_n) w with the warm-up decay (integer buffers copied);
    validation runs on the EMA weights and leaves the training weights as they were."""
    torch.manual_seed(0)
    model, ema, rec = Tiny(), EMA(rate=0.9), Recorder()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, [ema, rec], max_steps=6, val_check_interval=3, check_val_every_n_epoch=None,
                       limit_val_batches=1)
    trainer.fit(model, _data(), _data(4))
    decays = [warmup_decay(0.9, n) for n in range(1, 7)]
    expected = _hand_ema(initial, rec.after_step, decays)
    assert ema.num_updates == 6 and not ema.swapped
    for k, v in expected.items():
        torch.testing.assert_close(ema.shadow[k], v)
    # validation after step 3: EMA weights inside, training weights before step 4 unchanged
    val_expected = _hand_ema(initial, rec.after_step[:3], decays[:3])
    for k, v in val_expected.items():
        torch.testing.assert_close(model.validation_weights[0][k], v)
    for k, v in rec.after_step[2].items():
        assert torch.equal(rec.before_batch[3][k], v)
    for k, v in rec.after_step[-1].items():
        assert torch.equal(model.state_dict()[k], v), "fit must end with the training weights in the model"


def test_exception_in_validation_restores_training_weights(tmp_path):
    """Property: when validation raises, the model gets its training weights back."""
    torch.manual_seed(0)
    model, ema, rec = Tiny(fail_in_validation=True), EMA(rate=0.5), Recorder()
    trainer = _trainer(tmp_path, [ema, rec], max_steps=3, val_check_interval=3, check_val_every_n_epoch=None,
                       limit_val_batches=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, _data(), _data(4))
    assert not ema.swapped
    for k, v in rec.after_step[-1].items():
        assert torch.equal(model.state_dict()[k], v)
    assert not torch.equal(model.validation_weights[0]["net.0.weight"], rec.after_step[-1]["net.0.weight"])


def test_checkpoint_resume_continues_counter_and_shadow_and_exports(tmp_path, capsys):
    """Property: a checkpoint holds training weights in state_dict and EMA weights in ema_state_dict; resuming
    from it continues the counter (decays of updates 4, 5, 6) and the shadow from the saved one; export writes
    exactly the EMA weights."""
    torch.manual_seed(0)
    first, model = EMA(rate=0.95), Tiny()
    trainer = _trainer(tmp_path / "b", [first], max_steps=3)
    trainer.fit(model, _data())
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["weights"]) == {"state_dict", "ema_state_dict"}
    for k, v in model.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v)
        assert torch.equal(saved["ema_state_dict"][k], first.shadow[k])
    assert saved["callbacks"]["EMA"]["num_updates"] == 3

    resumed, rec = EMA(rate=0.95), Recorder()
    _trainer(tmp_path / "c", [resumed, rec], max_steps=6).fit(Tiny(), _data(), ckpt_path=ckpt)
    for k, v in saved["state_dict"].items():
        assert torch.equal(rec.before_batch[0][k], v)
    assert resumed.num_updates == 6 and len(rec.after_step) == 3
    expected = _hand_ema(saved["ema_state_dict"], rec.after_step, [warmup_decay(0.95, n) for n in (4, 5, 6)])
    for k, v in expected.items():
        torch.testing.assert_close(resumed.shadow[k], v)

    out = tmp_path / "ema.safetensors"
    assert export_ema_main([str(ckpt), str(out)]) == 0  # `lit-score export-ema CKPT OUT`
    exported = load_file(out)
    assert set(exported) == {k[4:] for k in saved["ema_state_dict"]}
    for k, v in exported.items():
        assert torch.equal(v, saved["ema_state_dict"]["net." + k])
    with pytest.raises(KeyError, match="prefix"):
        load_ema_state_dict(str(ckpt), prefix="nothing.")
    with pytest.raises(SystemExit):
        export_ema_main([str(tmp_path / "missing.ckpt"), str(out)])
    assert "checkpoint not found" in capsys.readouterr().err


def test_predict_from_checkpoint_uses_ema_weights(tmp_path):
    """Property: predicting with the EMA callback from a checkpoint runs on its EMA weights, then swaps back."""
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [EMA(rate=0.5)], max_steps=3)
    model = Tiny()
    trainer.fit(model, _data())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    ema = EMA(rate=0.5)
    fresh = Tiny()
    [out] = _trainer(tmp_path, [ema]).predict(fresh, DataLoader(torch.zeros(1, 3)), ckpt_path=ckpt)
    for k, v in saved["ema_state_dict"].items():
        assert torch.equal(out[k], v)
        assert torch.equal(fresh.state_dict()[k], saved["state_dict"][k])


def test_halflife_counts_global_images_per_optimizer_step(tmp_path):
    """Property: with gradient accumulation the EMA updates once per optimizer step, counting every image."""
    torch.manual_seed(0)
    ema = EMA(halflife_kimg=0.01, rampup_ratio=None)
    _trainer(tmp_path, [ema], max_steps=3, accumulate_grad_batches=2).fit(Tiny(), _data(24))
    assert ema.num_updates == 3 and ema.num_images == 3 * 2 * 4
    assert ema.decay(8) == pytest.approx(0.5 ** (8 / 10))


def test_averaged_block_swaps_in_and_back_also_on_exceptions():
    """Property: inside `averaged` the model holds the EMA weights; after it (even after an exception) the
    training weights, and nested blocks do not swap twice."""
    torch.manual_seed(0)
    model, ema = Tiny(), EMA(rate=0.5, warmup=False)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.ema_state_dict(model)
    assert not torch.equal(averaged["net.0.weight"], training["net.0.weight"])
    with pytest.raises(RuntimeError, match="inside"):
        with ema.averaged(model):
            with ema.averaged(model):
                assert torch.equal(model.state_dict()["net.0.weight"], averaged["net.0.weight"])
            assert torch.equal(model.state_dict()["net.0.weight"], averaged["net.0.weight"])
            raise RuntimeError("inside")
    assert not ema.swapped
    for k, v in training.items():
        assert torch.equal(model.state_dict()[k], v)
    torch.testing.assert_close(averaged["net.0.weight"], training["net.0.weight"] - 0.5)
