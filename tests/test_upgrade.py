"""Configs of lit-score 0.1 (checkpoint hyper-parameters, export configs, experiment YAMLs) read as today's:
class paths renamed, the loss as an object, and what the SDE, the loss and the network flags made of the network's
output as one preconditioning, whose denoiser equals the 0.1 score function written out here from its definitions."""
from __future__ import annotations

import pytest
import torch

from lit_score.cli.config import ConfigError, compose
from lit_score.diffusion.denoiser import NetworkDenoiser
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE
from lit_score.runtime.module import ScoreModel
from lit_score.runtime.upgrade import upgrade_checkpoint, upgrade_model_config

NET = "lit_score.networks.NCSNpp"


def old_config(sde: str, loss, scale_by_sigma: bool, embedding: str, **sde_args) -> dict:
    return {"net": {"class_path": NET, "init_args": {"num_channels": 1, "image_size": 8, "nf": 8, "ch_mult": [1, 2],
                                                     "num_res_blocks": 1, "attn_resolutions": [],
                                                     "embedding_type": embedding, "scale_by_sigma": scale_by_sigma}},
            "sde": {"class_path": f"lit_score.sdes.{sde}", "init_args": sde_args}, "loss": loss, "lr": 1e-3}


def build(config: dict) -> ScoreModel:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ScoreModel, "model", fail_untyped=False)
    return parser.instantiate(parser.parse_object({"model": config})).model


def old_score(config: dict, net, sde, x, t):
    """0.1's score: the label by the SDE (sigma, 999 t, the SMLD level's sigma or t (N - 1) for DDPM) and the
    network's log for Fourier embeddings, the output divided by the label under scale_by_sigma, then the SDE's
    rule (VE: the output; VP-type: -output / std, DDPM: std of the step)."""
    args, loss = config["net"]["init_args"], config["loss"] or "dsm"
    loss = loss if isinstance(loss, str) else loss["class_path"].rpartition(".")[2].lower().removesuffix("loss")
    if isinstance(sde, VESDE):
        if loss == "smld":
            level = torch.round((1 - t) * (sde.N - 1)).long()
            label = sde.discrete_sigmas[sde.N - 1 - level]
        else:
            label = sde.sigma(t)
    else:
        label = t * (sde.N - 1) if loss == "ddpm" else t * 999
    out = net(x, label.log() if args["embedding_type"] == "fourier" else label)
    if args["scale_by_sigma"]:
        out = out / label[:, None, None, None]
    if isinstance(sde, VESDE):
        return out
    std = sde.sqrt_1m_alphas_cumprod[sde.timestep(t)] if loss == "ddpm" else sde.marginal_prob(x, t)[1]
    return -out / std[:, None, None, None]


CASES = [  # (sde, loss, scale_by_sigma, embedding, expected preconditioning)
    ("VESDE", "dsm", True, "fourier", "ScorePrediction"),
    ("VESDE", None, False, "positional", "ScorePrediction"),
    ("VPSDE", {"class_path": "lit_score.losses.DSMLoss", "init_args": {}}, False, "positional", "NoisePrediction"),
    ("subVPSDE", "dsm", False, "fourier", "NoisePrediction"),
    ("VESDE", "smld", True, "fourier", "SMLDLevels"),
    ("VPSDE", "ddpm", False, "positional", "DDPMSteps"),
]


@pytest.mark.parametrize("sde_name,loss,scale_by_sigma,embedding,precond", CASES)
def test_old_parametrisations_become_preconditionings_with_the_same_score(sde_name, loss, scale_by_sigma, embedding,
                                                                            precond, one_thread):
    """Property: each 0.1 combination of SDE, loss and network flags becomes the named preconditioning, and the
    model's score equals 0.1's, written out above from its definitions, at times across (0, 1]."""
    sde_args = {"N": 50}
    config = old_config(sde_name, loss, scale_by_sigma, embedding, **sde_args)
    upgraded = upgrade_model_config(config)
    assert upgraded["precond"]["class_path"] == f"lit_score.diffusion.denoiser.{precond}"
    assert upgraded["sde"]["class_path"] == f"lit_score.diffusion.sdes.{sde_name}"
    assert "scale_by_sigma" not in upgraded["net"]["init_args"]
    assert config["net"]["init_args"]["scale_by_sigma"] == scale_by_sigma  # the input is left as it was
    model = build(upgraded).eval()
    torch.manual_seed(0)
    for p in model.net.parameters():  # a network whose output depends on its label
        p.data.normal_(0, 0.2)
    sde = {"VESDE": VESDE, "VPSDE": VPSDE, "subVPSDE": subVPSDE}[sde_name](N=50)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1.0, 0.7, 0.31, 0.05, 0.01])
    with torch.no_grad():
        ours = NetworkDenoiser(model.net, model.precond, model.sde).score(x, t)
        theirs = old_score(config, model.net, sde, x, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_a_loss_precond_becomes_the_model_precond_and_todays_configs_pass_unchanged():
    """Property: 0.1's DSMLoss(precond=VPPrecond) becomes model.precond; an EDMLoss without one keeps the loss's
    default (None); a config already in today's form is returned as it is."""
    config = old_config("VESDE", {"class_path": "lit_score.losses.DSMLoss", "init_args": {
        "precond": {"class_path": "lit_score.preconditioning.VPPrecond", "init_args": {"M": 1000}}}}, False, "fourier")
    upgraded = upgrade_model_config(config)
    assert upgraded["precond"] == {"class_path": "lit_score.diffusion.denoiser.VPPrecond", "init_args": {"M": 1000}}
    assert "precond" not in upgraded["loss"]["init_args"]
    edm = upgrade_model_config(old_config("VESDE", {"class_path": "lit_score.losses.EDMLoss"}, False, "positional"))
    assert edm["precond"] is None and edm["loss"]["class_path"] == "lit_score.diffusion.losses.EDMLoss"
    assert upgrade_model_config(upgraded) == upgraded


def test_loss_names_and_impossible_flags_give_clear_answers():
    """Property: losses named by string (with their options beside them) become class_path configs; an unknown
    name and scale_by_sigma where 0.1 never used it are one-line errors naming the fix."""
    upgraded = upgrade_model_config({**old_config("VPSDE", "dsm", False, "positional"), "reduce_mean": False,
                                     "eps": 1e-3})
    assert upgraded["loss"] == {"class_path": "lit_score.diffusion.losses.DSMLoss",
                                "init_args": {"eps": 1e-3, "reduce_mean": False}}
    with pytest.raises(ValueError, match="unknown loss 'sm'; known: dsm, smld, ddpm, edm"):
        upgrade_model_config(old_config("VPSDE", "sm", False, "positional"))
    with pytest.raises(ValueError, match="scale_by_sigma: true under VPSDE"):
        upgrade_model_config(old_config("VPSDE", "dsm", True, "positional"))
    with pytest.raises(TypeError, match="loss is an object now"):
        ScoreModel(torch.nn.Identity(), VPSDE(), loss="dsm")


def test_checkpoint_ema_weights_become_the_ema_network():
    """Property: 0.1's EMA weights (their own key, net.* names) become state_dict ema.* entries; the note on the
    two keys goes; the training weights stay."""
    w, e = torch.ones(2), torch.zeros(2)
    checkpoint = {"state_dict": {"net.w": w}, "ema_state_dict": {"net.w": e}, "weights": {"state_dict": "..."}}
    upgraded = upgrade_checkpoint(checkpoint)
    assert set(upgraded) == {"state_dict"}
    assert upgraded["state_dict"]["net.w"] is w and upgraded["state_dict"]["ema.w"] is e


def test_old_yaml_class_paths_are_renamed_with_a_note_and_scale_by_sigma_is_refused(tmp_path, capsys):
    """Property: a user's 0.1 YAML composes with today's class paths and says so in one line on stderr; one that
    sets the network's scale_by_sigma stops with a one-line error saying where it went."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  sde:\n    class_path: lit_score.sdes.VESDE\n")
    (document,) = compose(old)
    assert "lit_score.diffusion.sdes.VESDE" in document and "lit_score.sdes.VESDE" not in document
    assert "lit_score.sdes.VESDE -> lit_score.diffusion.sdes.VESDE" in capsys.readouterr().err
    today = tmp_path / "today.yaml"
    today.write_text("model:\n  sde:\n    class_path: lit_score.diffusion.sdes.VESDE\n")
    assert compose(today) == [str(today)] and capsys.readouterr().err == ""
    flag = tmp_path / "flag.yaml"
    flag.write_text("model:\n  net:\n    init_args:\n      scale_by_sigma: true\n")
    with pytest.raises(ConfigError, match="scale_by_sigma moved to the preconditioning"):
        compose(flag)
