"""Converting score_sde_pytorch checkpoints: official layout in, a lit-score checkpoint that `lit-score predict`
samples from out; every misfit named; pickles that carry code refused."""
import math
import os
from pathlib import Path

import pytest
import torch

from lit_score.cli.lightning_cli import run_cli
from lit_score.interop.score_sde import (CONVERSION_KEY, OFFICIAL_CONFIGS, ConversionError, convert, convert_file,
                               experiment_for, load_official, main)
from lit_score.evaluate.experiment import load_experiment
from lit_score.cli.resources import experiments_dir
from lit_score.runtime.module import ScoreModel

TINY = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lit_score.callbacks.EMA
      init_args: {{rate: 0.999}}
model:
  net:
    class_path: lit_score.networks.NCSNpp
    init_args: {{nf: 16, ch_mult: [1, 2], num_res_blocks: {blocks}, attn_resolutions: [8], dropout: 0.0,
                scale_by_sigma: true}}
  sde:
    class_path: lit_score.diffusion.sdes.VESDE
    init_args: {{sigma_min: 0.01, sigma_max: 10.0, N: 20}}
  sampler:
    class_path: lit_score.sampling.EDMSampler
    init_args: {{steps: 3}}
data:
  class_path: lit_score.data.DigitsDataModule
  init_args: {{image_size: 16, num_samples: 6, sample_batch_size: 3}}
"""


def tiny_config(tmp_path: Path, blocks: int = 1) -> Path:
    path = tmp_path / f"tiny_{blocks}.yaml"
    path.write_text(TINY.format(blocks=blocks))
    return path


def official_checkpoint(model: ScoreModel, sigma_max: float = 10.0, seed: int = 0) -> dict:
    """What score_sde's save_checkpoint writes for this network: a DataParallel state_dict ('module.' prefix and the
    'sigmas' buffer), the EMA state_dict (shadow_params: trainable parameters in order), the optimizer, the step."""
    g = torch.Generator().manual_seed(seed)
    net = model.net
    with torch.no_grad():
        raw = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in net.state_dict().items()}
    state = {f"module.{k}": v for k, v in raw.items()}
    sde = model.sde
    state["module.sigmas"] = torch.exp(torch.linspace(math.log(sigma_max), math.log(sde.sigma_min), sde.N))
    shadow = [raw[name] + 0.05 * torch.randn(p.shape, generator=g)
              for name, p in net.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4).state_dict()
    return {"optimizer": optimizer, "model": state,
            "ema": {"decay": 0.999, "num_updates": 1234, "shadow_params": shadow}, "step": 1234}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    config = tiny_config(tmp)
    model = load_experiment(config).model
    official = official_checkpoint(model)
    source = tmp / "checkpoint_26.pth"
    torch.save(official, source)
    out = tmp / "converted.ckpt"
    convert_file(source, config, out)
    return tmp, config, model, official, source, out


def test_converted_checkpoint_holds_raw_and_ema_weights_step_and_experiment(tiny):
    """state_dict = the official raw weights under 'net.', ema_state_dict = shadow_params mapped by parameter order
    (frozen Fourier W and buffers from the raw weights), global_step = step; it loads with weights_only=True."""
    tmp, config, model, official, source, out = tiny
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1234
    raw = {k.removeprefix("module."): v for k, v in official["model"].items() if k != "module.sigmas"}
    assert set(ckpt["state_dict"]) == {f"net.{k}" for k in raw} == set(ckpt["ema_state_dict"])
    for k, v in raw.items():
        assert torch.equal(ckpt["state_dict"][f"net.{k}"], v)
    trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
    for name, s in zip(trainable, official["ema"]["shadow_params"], strict=True):
        assert torch.equal(ckpt["ema_state_dict"][f"net.{name}"], s)
    assert torch.equal(ckpt["ema_state_dict"]["net.all_modules.0.W"], raw["all_modules.0.W"])
    assert ckpt["callbacks"]["EMA"]["num_updates"] == 1234 and ckpt["callbacks"]["EMA"]["rate"] == 0.999
    assert ckpt[CONVERSION_KEY]["experiment"] == config.stem and ckpt[CONVERSION_KEY]["config"] == str(config)


def test_lit_score_predict_samples_with_the_converted_ema_weights(tiny):
    """`lit-score predict --config <yaml> --ckpt_path <converted>` runs, and its samples are exactly those of the
    network holding the official EMA weights (the EMA callback swaps them in), not the raw ones."""
    tmp, config, model, official, source, out = tiny
    cli = run_cli(["predict", "--config", str(config), "--ckpt_path", str(out),
                   "--trainer.default_root_dir", str(tmp)])
    predictions = cli.trainer.predict_loop.predictions
    samples = torch.cat([p["samples"] for p in predictions])
    seeds = torch.cat([p["seeds"] for p in predictions])
    assert samples.shape == (6, 1, 16, 16) and torch.isfinite(samples).all()

    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    reference = load_experiment(config).model.eval()
    reference.load_state_dict(ckpt["ema_state_dict"])
    for p in predictions:  # the same batches, so the same arithmetic
        assert torch.equal(reference.sample(p["seeds"]).samples, p["samples"])
    reference.load_state_dict(ckpt["state_dict"])
    assert not torch.allclose(reference.sample(seeds[:3]).samples, samples[:3], atol=1e-3)


def test_cli_converts_and_prints_the_predict_command(tiny, capsys):
    """`python -m lit_score.interop.score_sde SRC --experiment YAML --out OUT` exits 0 and says how to sample."""
    tmp, config, model, official, source, out = tiny
    assert main([str(source), "--experiment", str(config), "--out", str(tmp / "again.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "lit-score predict --config" in printed and "step 1234" in printed
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(tmp / "again.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_architecture_is_refused_naming_keys_and_shapes(tmp_path):
    """A deeper network's checkpoint (extra blocks, shifted shapes) fails with the mismatching keys named."""
    model = load_experiment(tiny_config(tmp_path, blocks=1)).model
    deeper = load_experiment(tiny_config(tmp_path, blocks=2)).model
    with pytest.raises(ConversionError) as err:
        convert(official_checkpoint(deeper), model)
    message = str(err.value)
    assert "does not fit NCSNpp" in message and "not in the network" in message and "all_modules." in message
    assert "shape mismatches" in message and " vs ours " in message


def test_wrong_sde_and_wrong_ema_are_refused(tmp_path):
    """sigmas trained with another sigma_max, and an EMA with a parameter missing, each get a named error."""
    model = load_experiment(tiny_config(tmp_path)).model
    with pytest.raises(ConversionError, match=r"sigma_max=50.*sigma_max=10"):
        convert(official_checkpoint(model, sigma_max=50.0), model)
    broken = official_checkpoint(model)
    broken["ema"]["shadow_params"] = broken["ema"]["shadow_params"][:-1]
    with pytest.raises(ConversionError, match="EMA has .* shadow parameters but the network has"):
        convert(broken, model)


class RunsCode:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_carries_code_is_refused_and_nothing_runs(tmp_path):
    """torch.load(weights_only=True) refuses the os.system global; our error says why and names it; no code ran."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint_evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "step": RunsCode(marker)}, evil)
    with pytest.raises(ConversionError) as err:
        load_official(evil)
    message = str(err.value)
    assert "refused" in message and "could run arbitrary code" in message and "weights_only=True" in message
    assert "system" in message
    assert not marker.exists()
    assert main([str(evil), "--experiment", "cifar10_ncsnpp_continuous_ve", "--out", str(tmp_path / "x.ckpt")]) == 2
    assert not (tmp_path / "x.ckpt").exists() and not marker.exists()


def test_unreadable_and_foreign_files_are_named(tmp_path):
    """A missing file, a non-checkpoint and a dict without 'model' each get an error saying which."""
    with pytest.raises(ConversionError, match="not found"):
        load_official(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        load_official(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="expected a dict with 'model'"):
        load_official(tmp_path / "other.pth")


def test_every_official_config_names_an_existing_experiment():
    """Each supported official config maps to a YAML in experiments/ (official names are accepted too)."""
    for name, official in OFFICIAL_CONFIGS.items():
        assert (experiments_dir() / f"{official.experiment}.yaml").is_file(), name
        assert experiment_for(f"configs/{name}.py") == official.experiment
    assert experiment_for("cifar10_ncsnpp_deep_continuous_ve") == "cifar10_ncsnpp_deep_continuous_ve"


@pytest.mark.slow
@pytest.mark.parametrize("official", sorted(OFFICIAL_CONFIGS), ids=lambda s: s.replace("/", "_"))
def test_full_size_official_layouts_convert(official, tmp_path):
    """Every paper-size architecture converts from its official layout (sigmas of its SDE included)."""
    model = load_experiment(OFFICIAL_CONFIGS[official].experiment).model
    sigma_max = getattr(model.sde, "sigma_max", 50.0)
    ckpt = convert(official_checkpoint(model, sigma_max=sigma_max), model)
    assert len(ckpt["ema_state_dict"]) == len(model.state_dict())
