"""Converting score_sde_pytorch checkpoints: official layout in, a lit-score checkpoint of today's form (raw weights
as `net.*`, EMA weights as `ema.*`, hyper-parameters with score_sde's preconditioning) that `lit-score predict` and
ScoreModel.load_from_checkpoint sample from out; every misfit named; pickles that carry code refused."""
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
from lit_score.runtime.upgrade import EMA, NET

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
    init_args: {{nf: 16, ch_mult: [1, 2], num_res_blocks: {blocks}, attn_resolutions: [8], dropout: 0.0}}
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
    """state_dict = the official raw weights under 'net.' and the EMA network under 'ema.': shadow_params mapped by
    parameter order (frozen Fourier W and buffers from the raw weights); global_step = step; the EMA callback's
    state as it saves it; hyper-parameters of today (class paths, the network without scale_by_sigma, the
    preconditioning written out); no 0.1 keys; it loads with weights_only=True."""
    tmp, config, model, official, source, out = tiny
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1234
    raw = {k.removeprefix("module."): v for k, v in official["model"].items() if k != "module.sigmas"}
    assert set(ckpt["state_dict"]) == {NET + k for k in raw} | {EMA + k for k in raw}
    for k, v in raw.items():
        assert torch.equal(ckpt["state_dict"][NET + k], v)
    trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
    for name, s in zip(trainable, official["ema"]["shadow_params"], strict=True):
        assert torch.equal(ckpt["state_dict"][EMA + name], s)
    assert torch.equal(ckpt["state_dict"][EMA + "all_modules.0.W"], raw["all_modules.0.W"])
    from lit_score.callbacks.ema import EMA as EMACallback
    assert set(ckpt["callbacks"]["EMA"]) == set(EMACallback().state_dict())
    assert ckpt["callbacks"]["EMA"]["num_updates"] == 1234 and ckpt["callbacks"]["EMA"]["rate"] == 0.999
    assert ckpt["callbacks"]["EMA"]["warmup"] is True
    assert "ema_state_dict" not in ckpt and "weights" not in ckpt
    hparams = ckpt["hyper_parameters"]
    assert hparams["net"]["class_path"] == "lit_score.networks.NCSNpp"
    assert "scale_by_sigma" not in hparams["net"]["init_args"]
    assert hparams["sde"] == {"class_path": "lit_score.diffusion.sdes.VESDE",
                              "init_args": {"sigma_min": 0.01, "sigma_max": 10.0, "N": 20}}
    assert hparams["loss"]["class_path"] == "lit_score.diffusion.losses.DSMLoss"
    assert hparams["precond"] == {"class_path": "lit_score.diffusion.denoiser.ScorePrediction",
                                  "init_args": {"scale_by_sigma": True, "log_label": True}}
    assert ckpt[CONVERSION_KEY]["experiment"] == config.stem and ckpt[CONVERSION_KEY]["config"] == str(config)


def test_lit_score_predict_samples_with_the_converted_ema_weights(tiny):
    """`lit-score predict --config <yaml> --ckpt_path <converted>` runs, and its samples are exactly those of the
    model whose EMA network holds the official EMA weights (the weights it samples with), not the raw ones; so are
    those of ScoreModel.load_from_checkpoint(<converted>), without the YAML."""
    tmp, config, model, official, source, out = tiny
    cli = run_cli(["predict", "--config", str(config), "--ckpt_path", str(out),
                   "--trainer.default_root_dir", str(tmp)])
    predictions = cli.trainer.predict_loop.predictions
    samples = torch.cat([p["samples"] for p in predictions])
    seeds = torch.cat([p["seeds"] for p in predictions])
    assert samples.shape == (6, 1, 16, 16) and torch.isfinite(samples).all()

    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    reference = load_experiment(config).model.eval()
    reference.add_ema()
    reference.load_state_dict(ckpt["state_dict"])
    loaded = ScoreModel.load_from_checkpoint(out).eval()
    assert loaded.ema is not None and repr(loaded.precond) == "ScorePrediction(scale_by_sigma=True, log_label=True)"
    for p in predictions:  # the same batches, so the same arithmetic
        assert torch.equal(reference.sample(p["seeds"]).samples, p["samples"])
        assert torch.equal(loaded.sample(p["seeds"]).samples, p["samples"])
    raw = load_experiment(config).model.eval()  # no EMA network: samples with the raw weights
    raw.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if k.startswith(NET)})
    assert not torch.allclose(raw.sample(seeds[:3]).samples, samples[:3], atol=1e-3)


def test_cli_converts_and_prints_the_predict_command(tiny, capsys):
    """`python -m lit_score.interop.score_sde SRC --experiment YAML --out OUT` exits 0 and says how to sample."""
    tmp, config, model, official, source, out = tiny
    assert main([str(source), "--experiment", str(config), "--out", str(tmp / "again.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "lit-score predict --config" in printed and "step 1234" in printed
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(tmp / "again.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


VARIANT = """
model:
  net:
    class_path: lit_score.networks.{net}
    init_args: {{nf: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0, image_size: 16,
                num_channels: 1{net_args}}}
  sde:
    class_path: lit_score.diffusion.sdes.{sde}
    init_args: {{N: {N}}}
  loss:
    class_path: lit_score.diffusion.losses.{loss}
{precond}data:
  class_path: lit_score.data.DigitsDataModule
  init_args: {{image_size: 16, num_samples: 6}}
"""
DENOISER = "lit_score.diffusion.denoiser."
FOURIER_VP = "{class_path: lit_score.diffusion.denoiser.NoisePrediction, init_args: {log_label: true}}"
VARIANTS = {  # (network, SDE, loss, extra network args, the YAML's precond) -> score_sde's parametrisation of it
    "ncsnpp_cont_ve": (("NCSNpp", "VESDE", "DSMLoss", "", ""), "ScorePrediction",
                       {"scale_by_sigma": True, "log_label": True}),
    "ddpmpp_cont_vp": (("DDPMpp", "VPSDE", "DSMLoss", "", ""), "NoisePrediction", {"log_label": False}),
    "ddpmpp_cont_subvp": (("DDPMpp", "subVPSDE", "DSMLoss", "", ""), "NoisePrediction", {"log_label": False}),
    "ddpmpp_fourier_vp": (("DDPMpp", "VPSDE", "DSMLoss", ", embedding_type: fourier", FOURIER_VP), "NoisePrediction",
                          {"log_label": True}),
    "ncsn_smld": (("NCSNpp", "VESDE", "SMLDLoss", "", ""), "SMLDLevels", {"scale_by_sigma": True, "log_label": True}),
    "ddpm_discrete": (("DDPMpp", "VPSDE", "DDPMLoss", "", ""), "DDPMSteps", {"log_label": False}),
}


def variant_config(tmp_path: Path, net: str, sde: str, loss: str, net_args: str = "", precond: str = "") -> Path:
    path = tmp_path / f"{net}_{sde}_{loss}.yaml"
    n = 10 if loss != "DSMLoss" else 20
    path.write_text(VARIANT.format(net=net, sde=sde, loss=loss, net_args=net_args, N=n,
                                   precond=f"  precond: {precond}\n" if precond else ""))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hyper_parameters_name_score_sde_parametrisation(variant, tmp_path):
    """Each official kind of network converts with its preconditioning written out: NCSN++ cont. (VE)
    ScorePrediction(scale_by_sigma=True, log_label=True), DDPM++ cont. (VP, sub-VP) NoisePrediction (the log of
    999 t for Fourier embeddings), the discrete NCSN objective SMLDLevels, DDPM's DDPMSteps; the checkpoint
    rebuilds the same model with ScoreModel.load_from_checkpoint (its score equal to the converter's model with the
    EMA weights)."""
    (net, sde, loss, net_args, given), name, init_args = VARIANTS[variant]
    model = load_experiment(variant_config(tmp_path, net, sde, loss, net_args, given)).model
    sigma_max = model.sde.sigma_max if sde == "VESDE" else 50.0
    ckpt = convert(official_checkpoint(model, sigma_max=sigma_max), model)
    assert ckpt["hyper_parameters"]["precond"] == {"class_path": DENOISER + name, "init_args": init_args}
    assert ckpt["hyper_parameters"]["sde"]["class_path"] == f"lit_score.diffusion.sdes.{sde}"
    assert "scale_by_sigma" not in ckpt["hyper_parameters"]["net"]["init_args"]
    torch.save(ckpt, tmp_path / "converted.ckpt")
    loaded = ScoreModel.load_from_checkpoint(tmp_path / "converted.ckpt").eval()
    assert type(loaded.precond).__name__ == name and vars(loaded.precond) == init_args
    model.add_ema()
    model.load_state_dict(ckpt["state_dict"])
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(loaded.score_fn(x, t), model.eval().score_fn(x, t))


def test_a_preconditioning_other_than_score_sde_is_refused(tmp_path):
    """An experiment whose preconditioning is not what the official network computes (here NCSN++ under the VE SDE
    without scale_by_sigma, EDM's, and a Fourier DDPM++ fed 999 t rather than its log) is refused naming both."""
    for given, named in (("{class_path: lit_score.diffusion.denoiser.ScorePrediction, init_args: {scale_by_sigma: "
                          "false}}", r"ScorePrediction\(scale_by_sigma=False, log_label=True\)"),
                         ("{class_path: lit_score.diffusion.denoiser.EDMPrecond}", r"EDMPrecond\(sigma_data=0.5\)")):
        model = load_experiment(variant_config(tmp_path, "NCSNpp", "VESDE", "DSMLoss", precond=given)).model
        with pytest.raises(ConversionError, match=rf"preconditioning {named} is not what the official NCSNpp "
                                                  r"computes under VESDE with DSMLoss: ScorePrediction\(scale_by_sigma"
                                                  r"=True, log_label=True\)"):
            convert(official_checkpoint(model), model)
    model = load_experiment(variant_config(tmp_path, "DDPMpp", "VPSDE", "DSMLoss", ", embedding_type: fourier")).model
    with pytest.raises(ConversionError, match=r"preconditioning NoisePrediction\(log_label=False\) is not what the "
                                              r"official DDPMpp computes under VPSDE with DSMLoss: "
                                              r"NoisePrediction\(log_label=True\)"):
        convert(official_checkpoint(model), model)


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
    assert {k for k in ckpt["state_dict"] if k.startswith(EMA)} == {EMA + k for k in model.net.state_dict()}
    precond = ckpt["hyper_parameters"]["precond"]
    if official.startswith("ve/"):
        assert precond == {"class_path": DENOISER + "ScorePrediction",
                           "init_args": {"scale_by_sigma": True, "log_label": True}}
    else:
        assert precond == {"class_path": DENOISER + "NoisePrediction", "init_args": {"log_label": False}}
