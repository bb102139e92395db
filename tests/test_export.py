"""`lit-score export`: a folder that rebuilds the model without YAML, for from_pretrained, predict and lit-score-eval."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_score.interop.export import export_checkpoint, export_main
from lit_score.runtime.pretrained import PretrainedError, load_pretrained
from lit_score.diffusion.losses import DSMLoss
from lit_score.runtime.module import ScoreModel
from lit_score.networks import DDPMpp
from test_predict import LIT_SCORE, ROOT, SAMPLERS, TINY, predict, run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    run(["fit", "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"], tmp)
    return tmp / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-digits"
    assert export_main([str(checkpoint), str(out)]) == 0
    return out


def outputs(net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    labels = torch.tensor([0.0, 250.5, 999.0])  # DDPM++: the timestep t (N - 1)
    with torch.no_grad():
        return net.eval()(x, labels)


def net_with(state: dict, prefix: str = "net.") -> DDPMpp:
    """The tiny network built by hand (not from any config the export wrote), with a checkpoint's weights."""
    net = DDPMpp(num_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0)
    net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return net


def test_export_rebuilds_the_ema_network_without_yaml(checkpoint, exported, one_thread):
    """Property: from_pretrained builds the checkpoint's network and SDE from config.json alone, with the EMA
    weights: its outputs equal those of the hand-built network given the checkpoint's EMA weights and differ
    from those with its raw weights. config.json says what ran (EMA rate and updates, step, experiment)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    model = ScoreModel.from_pretrained(str(exported))
    assert type(model.net) is DDPMpp and type(model.sde).__name__ == "VPSDE" and type(model.loss) is DSMLoss
    assert model.sde.beta_1 == pytest.approx(20.0) and model.sde.N == 1000
    ours = outputs(model.net)
    torch.testing.assert_close(ours, outputs(net_with(ckpt["state_dict"], "ema.")), rtol=0, atol=0)
    assert (ours - outputs(net_with(ckpt["state_dict"]))).abs().max() > 1e-4
    config = json.loads((exported / "config.json").read_text())
    assert config["weights"] == "ema" and config["global_step"] == 2 and config["loss"]["class_path"] == "lit_score.diffusion.losses.DSMLoss"
    assert config["ema"]["rate"] == 0.999 and config["ema"]["num_updates"] == 2
    assert config["data"] == {"num_channels": 1, "image_size": 8, "centered": True}
    assert config["data_space"] == {"shape": [1, 8, 8], "centered": True, "num_levels": 256}
    assert model.data_space.to_dict() == config["data_space"]
    assert config["experiment"]["name"] == "quickstart" and (exported / "experiment.yaml").is_file()
    card = (exported / "README.md").read_text()
    assert "ScoreModel.from_pretrained" in card and "upload_folder" in card and "step 2" in card


@pytest.mark.slow  # two CLI predicts in processes (~12 s): runs in make test-slow (CI)
def test_predict_from_the_folder_equals_predict_from_the_checkpoint(checkpoint, exported, tmp_path):
    """Property: `lit-score predict --ckpt_path FOLDER` writes the same images, with the same seeds and sampler,
    as from the .ckpt's EMA weights."""
    options, nfe = SAMPLERS["edm_heun"]
    from_ckpt = predict(checkpoint, tmp_path, "ckpt", options)
    from_folder = predict(exported, tmp_path, "folder", options)
    assert from_ckpt["nfe"] == from_folder["nfe"] == nfe
    np.testing.assert_array_equal(from_ckpt["samples"], from_folder["samples"])
    assert from_folder["samples"].std() > 10  # images, not a constant


EVAL = """
evaluation:
  num_samples: 8
  is_splits: 2
  kid_subset_size: 4
  batch_size: 8
  shard_size: 8
  sampler: {class_path: lit_score.sampling.EDMSampler, init_args: {steps: 2}}
  features: {class_path: lit_score.metrics.RandomConvFeatures, init_args: {num_features: 16}}
  classifier: {class_path: lit_score.metrics.RandomConvFeatures, init_args: {num_features: 10, seed: 1}}
  bpd: false
  cache_dir: CACHE
"""


def test_lit_score_eval_of_the_folder_equals_that_of_the_checkpoint(checkpoint, exported, tmp_path, one_thread):
    """Property: lit-score-eval --ckpt_path FOLDER gives
    the FID, KID and IS of the .ckpt's EMA weights under the tiny network options, with the same seeds."""
    from lit_score.evaluate.cli import run as evaluate

    (tmp_path / "eval.yaml").write_text(EVAL.replace("CACHE", str(tmp_path / "cache")))
    common = ["--config", "experiments/quickstart.yaml", "--config", str(tmp_path / "eval.yaml"),
              "--data.init_args.image_size", "8", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    from_ckpt = evaluate([*common, *TINY[:6], "--ckpt_path", str(checkpoint), "--evaluation.out_dir",
                          str(tmp_path / "ckpt")])
    from_folder = evaluate([*common, *TINY[:6], "--ckpt_path", str(exported), "--evaluation.out_dir", str(tmp_path / "folder")])
    assert from_ckpt["complete"] and from_folder["complete"] and from_folder["nfe"] == from_ckpt["nfe"] == 3
    for key in ("fid", "kid_mean", "inception_score"):
        assert from_folder[key] == from_ckpt[key], key


def test_raw_weights_when_the_checkpoint_has_no_ema(checkpoint, tmp_path, capsys, one_thread):
    """Property: a checkpoint without EMA weights exports its raw weights and says so."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    assert export_main([str(tmp_path / "no_ema.ckpt"), str(tmp_path / "raw")]) == 0
    assert "no EMA weights" in capsys.readouterr().out
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["weights"] == "raw"
    torch.testing.assert_close(outputs(load_pretrained(tmp_path / "raw").net), outputs(net_with(ckpt["state_dict"])),
                               rtol=0, atol=0)
    with pytest.raises(PretrainedError, match="has no EMA weights.*--weights raw"):
        export_checkpoint(tmp_path / "no_ema.ckpt", tmp_path / "other", weights="ema")
    with pytest.raises(PretrainedError, match="exists.*--overwrite"):
        export_checkpoint(tmp_path / "no_ema.ckpt", tmp_path / "raw")


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_weights_ema_raw_and_auto_of_this_and_a_release_0_1_checkpoint(checkpoint, tmp_path, capsys, one_thread):
    """Property: `lit-score export CKPT DIR --weights ema` (the one command that writes EMA safetensors) writes the
    checkpoint's EMA network (ema.* of its state_dict; a 0.1 checkpoint's own EMA key), `--weights raw` its trained
    network (net.*), and the default (auto) the EMA network."""
    from safetensors.torch import load_file

    release = ROOT / "tests" / "fixtures" / "release_0_1" / "vp_dsm.ckpt"
    ours, theirs = torch.load(checkpoint, weights_only=True), torch.load(release, weights_only=True)
    cases = {"ours": (checkpoint, _part(ours["state_dict"], "ema."), _part(ours["state_dict"], "net.")),
             "release_0_1": (release, _part(theirs["ema_state_dict"], "net."), _part(theirs["state_dict"], "net."))}
    for name, (path, ema, raw) in cases.items():
        assert any(not torch.equal(v, raw[k]) for k, v in ema.items()), name
        for weights, expected in (("ema", ema), ("auto", ema), ("raw", raw)):
            out = tmp_path / f"{name}_{weights}"
            assert export_main([str(path), str(out)] + (["--weights", weights] if weights != "auto" else [])) == 0
            written = load_file(out / "model.safetensors")
            assert written.keys() == expected.keys(), (name, weights)
            assert all(torch.equal(written[k], v) for k, v in expected.items()), (name, weights)
            assert json.loads((out / "config.json").read_text())["weights"] == ("raw" if weights == "raw" else "ema")
    capsys.readouterr()


def _copy(exported: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in exported.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_broken_folders_are_refused_naming_the_file_and_the_fix(exported, tmp_path, one_thread):
    """Property: a missing config.json or weights, weights of another network (wrong shape, missing keys) and
    a diffusers folder each stop with one line naming the file and what to do."""
    no_config = _copy(exported, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(PretrainedError, match=r"no_config/config.json is missing.*lit-score export"):
        load_pretrained(no_config)
    no_weights = _copy(exported, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match=r"no_weights/model.safetensors is missing"):
        load_pretrained(no_weights)
    wider = _copy(exported, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    config["net"]["init_args"]["nf"] = 16
    (wider / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"wider/model.safetensors: all_modules\.\d+\.\w+ has shape .* needs"):
        load_pretrained(wider)
    deeper = _copy(exported, tmp_path / "deeper")
    config["net"]["init_args"].update(nf=8, num_res_blocks=2)
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"deeper/model.safetensors does not fit .* missing key"):
        load_pretrained(deeper)
    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    (diffusers / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(PretrainedError, match="diffusers UNet2DModel.*import-diffusers"):
        load_pretrained(diffusers)


@pytest.mark.slow  # a CLI start (~7 s)
def test_predict_refuses_a_folder_without_config_in_one_line(tmp_path):
    """Property: the CLI reports a bad export folder in one line, without a traceback, before sampling."""
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([LIT_SCORE, "predict", "--config", "experiments/quickstart.yaml", *TINY,
                           "--ckpt_path", str(tmp_path / "empty")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "empty/config.json is missing" in proc.stderr and "lit-score export" in proc.stderr
