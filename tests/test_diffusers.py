"""NCSN++ (VE) to and from diffusers' UNet2DModel + ScoreSdeVeScheduler, DDPM-type VP networks to and from its
DDPMPipeline: diffusers' own forward pass is the oracle, for the network and for the model's denoiser."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import require

from lit_score.diffusion.denoiser import NoisePrediction, ScorePrediction
from lit_score.interop.diffusers import (diffusers_problems, export_diffusers, import_diffusers, import_main,
                                         precond_problems, unet_config, _defaults)
from lit_score.runtime.pretrained import PretrainedError, load_pretrained
from lit_score.runtime.module import ScoreModel
from lit_score.networks import NCSNpp

diffusers = require("diffusers")

VE = {"num_channels": 3, "progressive": "output_skip", "progressive_input": "input_skip", "dropout": 0.0,
      "centered": False}
TINY = {  # no attention but the middle one (3 levels, 4 norm groups everywhere)
    "plain": {"nf": 16, "ch_mult": [1, 1, 1], "num_res_blocks": 2, "attn_resolutions": [], "image_size": 16},
    # attention in the skip blocks needs >= 128 channels (diffusers normalises it with 32 groups)
    "attention": {"nf": 128, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8], "image_size": 16},
}
SIGMAS = torch.tensor([0.01, 0.7, 25.0])
DDPMPP = "lit_score.networks.DDPMpp"
VP = {"class_path": "lit_score.diffusion.sdes.VPSDE", "init_args": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000}}
VE_SDE = {"class_path": "lit_score.diffusion.sdes.VESDE",
          "init_args": {"sigma_min": 0.01, "sigma_max": 50.0, "N": 1000}}
DENOISER = "lit_score.diffusion.denoiser."
SCORE_PREDICTION = {"class_path": DENOISER + "ScorePrediction",
                    "init_args": {"scale_by_sigma": True, "log_label": True}}
NOISE_PREDICTION = {"class_path": DENOISER + "NoisePrediction", "init_args": {"log_label": False}}
DSM = {"class_path": "lit_score.diffusion.losses.DSMLoss", "init_args": {}}


def ncsnpp_args(**kw) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in {**_defaults(), **VE, **kw}.items()}


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (NCSN++'s init zeroes the last layers, which would hide their mapping), matrices with
    variance 1 / fan-in so that activations stay O(1) and float32 rounding stays at its null level."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.3
            p.copy_(scale * torch.randn(p.shape, generator=g))
            if "norm" in name.lower() and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


def inputs(size: int) -> torch.Tensor:
    return torch.rand(len(SIGMAS), 3, size, size, generator=torch.Generator().manual_seed(1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def lit_checkpoint(tmp: Path, args: dict, sde: dict | None = None, class_path: str = "lit_score.networks.NCSNpp",
                   precond: dict | None = None, loss: dict | None = None) -> tuple[Path, NCSNpp]:
    """A lit-score checkpoint as the CLI saves it: random weights for the trained network (``net.*``) and other
    random ones for the EMA network (``ema.*``, the weights to sample with), which it returns. ``precond`` None:
    the loss's default (ScorePrediction under the VE SDE, NoisePrediction under the VP SDE, for DSMLoss)."""
    net = randomise(NCSNpp(**args))
    trained = randomise(NCSNpp(**args), seed=100)
    state = {**{f"net.{k}": v for k, v in trained.state_dict().items()},
             **{f"ema.{k}": v for k, v in net.state_dict().items()}}
    torch.save({"hyper_parameters": {"net": {"class_path": class_path, "init_args": args}, "sde": sde or VE_SDE,
                                     "loss": loss or DSM, "precond": precond},
                "state_dict": state, "global_step": 5}, tmp / "ve.ckpt")
    return tmp / "ve.ckpt", net


def sigma_view(x: torch.Tensor, sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat = x / s(t), sigma(t), s(t)) of x_t = x at times t, in float64."""
    t = t.double()
    s = sde.scale(t)
    return x.double() / s[:, None, None, None], sde.sigma(t), s


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("precond", [SCORE_PREDICTION, None], ids=["explicit", "default"])
def test_export_to_diffusers_and_back(name, precond, tmp_path, one_thread):
    """Property: diffusers' ScoreSdeVePipeline loads the exported folder and its UNet2DModel computes our NCSN++'s
    score at small, middle and large sigma: the network given log sigma (ScorePrediction's c_noise) divided by sigma
    (max relative difference <= 1e-5 in float32; the null level, float32 rounding, is ~1e-6), and the score of the
    model's denoiser (Tweedie's formula on D, in float64: the same bound); the exported weights are the EMA network's;
    its scheduler has the SDE's sigmas and N. Importing it back gives the same weights, the SDE and
    ScorePrediction(scale_by_sigma=True, log_label=True) as the config's precond."""
    args = ncsnpp_args(**TINY[name])
    ckpt, net = lit_checkpoint(tmp_path, args, precond=precond)
    export_diffusers(ckpt, tmp_path / "pipe")
    pipe = diffusers.ScoreSdeVePipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(pipe.unet).__name__ == "UNet2DModel" and type(pipe.scheduler).__name__ == "ScoreSdeVeScheduler"
    assert (pipe.scheduler.config.sigma_min, pipe.scheduler.config.sigma_max,
            pipe.scheduler.config.num_train_timesteps) == (0.01, 50.0, 1000)
    x = inputs(16)
    with torch.no_grad():
        ours, theirs = net(x, SIGMAS.log()) / SIGMAS[:, None, None, None], pipe.unet.eval()(x, SIGMAS).sample
    assert relative(theirs, ours) <= 1e-5
    import_diffusers(tmp_path / "pipe", tmp_path / "back")
    back = load_pretrained(tmp_path / "back")
    assert back.config["net"]["init_args"] == args and back.config["sde"]["init_args"] == {
        "sigma_min": 0.01, "sigma_max": 50.0, "N": 1000}
    assert back.config["precond"] == SCORE_PREDICTION and type(back.precond) is ScorePrediction
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in back.net.state_dict().items())
    model = ScoreModel.from_pretrained(str(tmp_path / "back")).double().eval()
    t = model.sde.t_from_sigma(SIGMAS.double())
    with torch.no_grad():
        score = model.score_fn(x.double(), t)
    assert relative(theirs.double(), score) <= 1e-5


def test_import_a_unet_made_by_diffusers(tmp_path, one_thread, capsys):
    """Property: a score-SDE UNet2DModel configured and saved by diffusers itself (with ScoreSdeVeScheduler)
    imports with `lit-score import-diffusers` and, through ScoreModel.from_pretrained, computes the same
    outputs (<= 1e-5 relative) as diffusers' forward pass."""
    unet = randomise(diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(128, 128),
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"), up_block_types=("AttnSkipUpBlock2D",
                                                                                     "SkipUpBlock2D"),
        time_embedding_type="fourier", mid_block_scale_factor=math.sqrt(2.0), norm_eps=1e-6, attention_head_dim=None,
        center_input_sample=False), seed=3)
    scheduler = diffusers.ScoreSdeVeScheduler(num_train_timesteps=500, sigma_min=0.02, sigma_max=80.0)
    diffusers.ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / "pipe"))
    assert import_main([str(tmp_path / "pipe"), str(tmp_path / "lit")]) == 0
    for path in (tmp_path / "lit").iterdir():  # shareable: ordinary modes, no path of this machine
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask(), path.name
        assert str(tmp_path) not in path.read_bytes().decode(errors="replace"), path.name
    model = ScoreModel.from_pretrained(str(tmp_path / "lit")).eval()
    assert (model.sde.sigma_min, model.sde.sigma_max, model.sde.N) == (0.02, 80.0, 500)
    assert model.net.attn_resolutions == (8,) and model.net.nf == 128
    assert type(model.precond) is ScorePrediction and model.precond.scale_by_sigma and model.precond.log_label
    x = inputs(16)
    with torch.no_grad():
        theirs = unet(x, SIGMAS).sample
        assert relative(model.net(x, SIGMAS.log()) / SIGMAS[:, None, None, None], theirs) <= 1e-5
        D = model.double().denoiser()
        x_hat, sigma, _ = sigma_view(x, model.sde, model.sde.t_from_sigma(SIGMAS.double()))
        assert relative(theirs.double(), (D(x_hat, sigma) - x_hat) / sigma[:, None, None, None] ** 2) <= 1e-5


def test_what_diffusers_cannot_express_is_named(tmp_path, one_thread):
    """Property: each option UNet2DModel cannot express is refused naming the part and why; DDPM++ and VP too."""
    ok = ncsnpp_args(**TINY["plain"])
    assert diffusers_problems(ok) == []
    cases = {
        "num_channels=1": dict(num_channels=1),
        "attention at resolution(s) [8] with fewer than 128 channels": dict(attn_resolutions=[8]),
        "the U-Net path (resblock_type='biggan', progressive='none'": dict(progressive="none"),
        "skip_rescale=False": dict(skip_rescale=False),
        "ch_mult[0] must be 1": dict(ch_mult=[2, 1, 1]),
        "the norm groups": dict(ch_mult=[1, 2, 2]),
        "fir_kernel=[1, 1]": dict(fir_kernel=[1, 1]),
        "embedding_type='positional'": dict(embedding_type="positional"),
    }
    for needle, change in cases.items():
        problems = diffusers_problems({**ok, **change})
        assert len(problems) == 1 and needle in problems[0], (change, problems)
    ckpt, _ = lit_checkpoint(tmp_path, {**ok, "num_channels": 1})
    with pytest.raises(PretrainedError, match="cannot express this network: num_channels=1"):
        export_diffusers(ckpt, tmp_path / "pipe")
    ckpt, _ = lit_checkpoint(tmp_path, ok, sde=VP)
    with pytest.raises(PretrainedError, match="cannot express this network: the SDE is lit_score.diffusion.sdes.VPSDE.*VE SDE only"):
        export_diffusers(ckpt, tmp_path / "pipe")
    official_ddpmpp = {**_defaults(DDPMPP), **TINY["plain"], "num_channels": 3}
    ckpt, _ = lit_checkpoint(tmp_path, official_ddpmpp, sde=VP, class_path=DDPMPP)
    with pytest.raises(PretrainedError, match="resblock_type='biggan': the resampling BigGAN ResNets have a 1x1 "
                                              "shortcut.*skip_rescale=True"):
        export_diffusers(ckpt, tmp_path / "pipe")
    ddpm = ddpm_args()
    assert diffusers_problems(ddpm) == []
    plain_cases = {
        "attention at [8]: diffusers' AttnUpBlock2D attends after every up ResNet": dict(attn_resolutions=[8]),
        "the norm groups [4, 8]": dict(nf=16),
        "resamp_with_conv=False": dict(resamp_with_conv=False),
    }
    for needle, change in plain_cases.items():
        problems = diffusers_problems({**ddpm, **change})
        assert len(problems) == 1 and needle in problems[0], (change, problems)
    ckpt, _ = lit_checkpoint(tmp_path, ddpm, class_path=DDPMPP)  # with the VE SDE
    with pytest.raises(PretrainedError, match="the SDE is lit_score.diffusion.sdes.VESDE: a DDPM-type UNet2DModel goes with "
                                              "diffusers' DDPMScheduler"):
        export_diffusers(ckpt, tmp_path / "pipe")


def precond(name: str, **init_args) -> dict:
    return {"class_path": DENOISER + name, "init_args": init_args}


EDM = {"class_path": "lit_score.diffusion.losses.EDMLoss", "init_args": {}}
SMLD = {"class_path": "lit_score.diffusion.losses.SMLDLoss", "init_args": {}}
DDPM = {"class_path": "lit_score.diffusion.losses.DDPMLoss", "init_args": {}}


def test_what_the_network_output_means_is_read_from_the_preconditioning(tmp_path, one_thread):
    """Property: the skip (score-SDE) form exports only under ScorePrediction(scale_by_sigma=True, log_label=True),
    the plain (DDPM) form only under NoisePrediction(log_label=False) with N = 1000 (DDPMScheduler's timestep
    (N - 1) t is then NoisePrediction's label 999 t); anything else is refused in one line naming the
    preconditioning and why, whatever loss chose it (explicitly or as its default)."""
    assert precond_problems(ScorePrediction(), plain=False) == [] == precond_problems(NoisePrediction(), plain=True)
    assert precond_problems(NoisePrediction(), plain=False) and precond_problems(ScorePrediction(), plain=True)
    ve, vp = ncsnpp_args(**TINY["plain"]), ddpm_args()
    ve_refused = "cannot express this network: the preconditioning {}: UNet2DModel's score-SDE form"
    vp_refused = "cannot express this network: the preconditioning {}: UNet2DModel with DDPMScheduler predicts"
    cases = [
        (ve, None, precond("ScorePrediction", scale_by_sigma=False, log_label=True), DSM,
         ve_refused.format(r"ScorePrediction\(scale_by_sigma=False, log_label=True\)")),
        (ve, None, precond("ScorePrediction", scale_by_sigma=True, log_label=False), DSM,
         ve_refused.format(r"ScorePrediction\(scale_by_sigma=True, log_label=False\)")),
        (ve, None, None, EDM, ve_refused.format(r"EDMPrecond\(sigma_data=0.5\)")),
        (ve, None, precond("VEPrecond"), EDM, ve_refused.format(r"VEPrecond\(\)")),
        (ve, None, None, SMLD, ve_refused.format(r"SMLDLevels\(scale_by_sigma=True, log_label=True\)")),
        (vp, VP, precond("NoisePrediction", log_label=True), DSM,
         vp_refused.format(r"NoisePrediction\(log_label=True\)")),
        (vp, VP, None, DDPM, vp_refused.format(r"DDPMSteps\(log_label=False\)")),
        (vp, VP, None, EDM, vp_refused.format(r"EDMPrecond\(sigma_data=0.5\)")),
        (vp, {**VP, "init_args": {**VP["init_args"], "N": 500}}, None, DSM,
         r"cannot express this network: N=500: DDPMScheduler's timestep of t is \(N - 1\) t"),
    ]
    for args, sde, given, loss, message in cases:
        ckpt, _ = lit_checkpoint(tmp_path, args, sde=sde, class_path=DDPMPP if args is vp else
                                 "lit_score.networks.NCSNpp", precond=given, loss=loss)
        with pytest.raises(PretrainedError, match=message):
            export_diffusers(ckpt, tmp_path / "pipe")
        assert not (tmp_path / "pipe").exists()


def ddpm_args(**kw) -> dict:
    """DDPM++ with DDPM ResNets and no skip rescale (what UNet2DModel's plain blocks are), 1-channel 8x8 images."""
    return {**_defaults(DDPMPP), "resblock_type": "ddpm", "skip_rescale": False, "attn_resolutions": [], "nf": 128,
            "ch_mult": [1, 1], "num_res_blocks": 1, "image_size": 8, "num_channels": 1, "dropout": 0.0, **kw}


@pytest.mark.parametrize("precond", [NOISE_PREDICTION, None], ids=["explicit", "default"])
def test_export_a_ddpm_type_vp_network_to_diffusers_and_back(precond, tmp_path, one_thread):
    """Property: a DDPM-type VP network under NoisePrediction exports to a DDPMPipeline whose UNet2DModel computes
    its noise prediction (<= 1e-5 relative) at timesteps t (N - 1): the network given the label 999 t as it is, and
    the noise (x_hat - D) / sigma of the model's denoiser (in float64: the same bound); its DDPMScheduler has the
    VP SDE's discrete betas; it imports back as DDPMpp + VPSDE under NoisePrediction(log_label=False) with the same
    weights."""
    args = ddpm_args()
    ckpt, net = lit_checkpoint(tmp_path, args, sde=VP, class_path=DDPMPP, precond=precond)
    export_diffusers(ckpt, tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    from lit_score.diffusion.sdes import VPSDE
    torch.testing.assert_close(pipe.scheduler.betas, VPSDE(0.1, 20.0, 1000).discrete_betas.float(), rtol=1e-6, atol=0)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 250.5, 999.0])
    with torch.no_grad():
        assert relative(pipe.unet.eval()(x, t).sample, net(x, t)) <= 1e-5
    import_diffusers(tmp_path / "pipe", tmp_path / "back")
    back = load_pretrained(tmp_path / "back")
    assert back.config["net"] == {"class_path": DDPMPP, "init_args": args}
    assert back.config["sde"]["class_path"] == "lit_score.diffusion.sdes.VPSDE"
    assert back.config["sde"]["init_args"] == pytest.approx({"beta_min": 0.1, "beta_max": 20.0, "N": 1000})
    assert back.config["precond"] == NOISE_PREDICTION and type(back.precond) is NoisePrediction
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in back.net.state_dict().items())
    model = ScoreModel.from_pretrained(str(tmp_path / "back")).double().eval()
    labels = torch.tensor([1.0, 250.5, 999.0])  # t > 0: sigma(0) = 0
    x_hat, sigma, _ = sigma_view(x, model.sde, labels.double() / 999)
    with torch.no_grad():
        theirs = pipe.unet(x, labels).sample.double()
        eps = (x_hat - model.denoiser()(x_hat, sigma)) / sigma[:, None, None, None]
    assert relative(theirs, eps) <= 1e-5


def test_unets_without_an_ncsnpp_form_are_refused(tmp_path):
    """Property: importing a UNet2DModel that is not the score-SDE form names what differs."""
    base = {"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 16],
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "time_embedding_type": "positional"}
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(base))
    with pytest.raises(PretrainedError, match="no lit-score form: blocks .*skip blocks.*DownBlock2D / UpBlock2D"):
        import_diffusers(tmp_path, tmp_path / "out")
    skip = {**base, "down_block_types": ["SkipDownBlock2D"] * 2, "up_block_types": ["SkipUpBlock2D"] * 2,
            "time_embedding_type": "fourier", "mid_block_scale_factor": math.sqrt(2), "norm_num_groups": 4}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(skip))
    with pytest.raises(PretrainedError, match="no lit-score form: .*norm_eps=1e-05 where lit-score has 1e-06"):
        import_diffusers(tmp_path, tmp_path / "out")


def test_a_ddpm_scheduler_of_other_than_1000_steps_is_refused(tmp_path, one_thread):
    """Property: a DDPM pipeline of N != 1000 timesteps is refused on import (its timestep (N - 1) t is not
    NoisePrediction's label 999 t), naming N; 1000 imports."""
    unet = diffusers.UNet2DModel(**unet_config(ddpm_args()))
    for n in (500, 1000):
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=n, beta_start=0.1 / n, beta_end=20.0 / n)
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / f"pipe{n}"))
    with pytest.raises(PretrainedError, match="N=500 timesteps: DDPMScheduler's timestep of t is"):
        import_diffusers(tmp_path / "pipe500", tmp_path / "out500")
    import_diffusers(tmp_path / "pipe1000", tmp_path / "out1000")
    assert load_pretrained(tmp_path / "out1000").config["sde"]["init_args"]["N"] == 1000


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
