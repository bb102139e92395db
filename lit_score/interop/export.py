"""Self-describing exports: a folder with the network's weights (``model.safetensors``), everything needed to
rebuild the model (``config.json``) and a model card (``README.md``), loadable without any YAML.

    lit-score export runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart
    ScoreModel.from_pretrained("exported/quickstart")          # or --ckpt_path exported/quickstart

No Lightning here: the checkpoint is read with ``torch.load`` and the classes are built by jsonargparse.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lit_score.diffusion.denoiser import Preconditioning
from lit_score.diffusion.losses import Loss
from lit_score.diffusion.sdes import SDE
from lit_score.errors import CheckpointError
from lit_score.runtime.upgrade import upgrade_checkpoint, upgrade_model_config

FORMAT = "lit-score"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, EXPERIMENT_NAME = "config.json", "model.safetensors", "README.md", "experiment.yaml"
EMA_KEY = "ema_state_dict"  # lit_score.callbacks.ema.CHECKPOINT_KEY (not imported: callbacks import Lightning)
NET_PREFIX = "net."


class PretrainedError(CheckpointError):
    """An export folder that cannot be read or does not fit its config (the message names the file and the fix)."""


@dataclass
class Pretrained:
    net: nn.Module
    sde: SDE
    loss: Loss
    precond: Preconditioning
    config: dict[str, Any]


def lit_score_version() -> str:
    try:
        return version("lit-score")
    except PackageNotFoundError:
        return "unknown"


# -- export ---------------------------------------------------------------------------------------------------------
def _read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    if not ckpt_path.is_file():
        raise PretrainedError(f"checkpoint not found: {ckpt_path}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported in one line
        raise PretrainedError(f"cannot read {ckpt_path} as a lit-score checkpoint: {type(err).__name__}: {err}")
    try:
        return upgrade_checkpoint(checkpoint)
    except ValueError as err:
        raise PretrainedError(f"{ckpt_path}: {err}")


def _ema_settings(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    states = checkpoint.get("callbacks") or {}
    return next((dict(v) for k, v in states.items() if str(k).split("{")[0] == "EMA"), None)


def _experiment(ckpt_path: Path) -> dict[str, Any] | None:
    """The run the checkpoint came from: LightningCLI saves the full config next to ``checkpoints/``."""
    run_config = ckpt_path.resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        return None
    import yaml

    with open(run_config) as f:
        config = yaml.safe_load(f) or {}
    logger = (config.get("trainer") or {}).get("logger") or {}
    init_args = logger.get("init_args") or {} if isinstance(logger, dict) else {}
    return {"name": init_args.get("name"), "run_dir": str(run_config.parent), "config": EXPERIMENT_NAME,
            "checkpoint": ckpt_path.name}


def network_state(checkpoint: dict[str, Any], weights: str) -> dict[str, Tensor]:
    """The network's tensors (``net.`` stripped) of a checkpoint's ``ema`` or ``raw`` weights."""
    key = EMA_KEY if weights == "ema" else "state_dict"
    state = {k[len(NET_PREFIX):]: v for k, v in (checkpoint.get(key) or {}).items() if k.startswith(NET_PREFIX)}
    if not state:
        raise PretrainedError(f"the checkpoint has no network weights under {key!r}")
    return state


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, weights: str = "auto",
                      overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir/{model.safetensors, config.json, README.md}`` (and the run's ``experiment.yaml`` when it
    is next to the checkpoint) from a lit-score checkpoint; ``weights``: ``ema``, ``raw`` or ``auto`` (EMA when
    the checkpoint has them). Returns the config."""
    from safetensors.torch import save_file

    if weights not in ("auto", "ema", "raw"):
        raise PretrainedError(f"weights must be auto, ema or raw, got {weights!r}")
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    checkpoint = _read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [k for k in ("net", "sde") if not isinstance(hparams.get(k), dict) or "class_path" not in hparams[k]]
    if missing:
        raise PretrainedError(f"{ckpt_path} does not record its {' and '.join(missing)} as class_path/init_args "
                              "(it was not saved by the lit-score CLI); load it with your YAML and save it again")
    if weights == "auto":
        weights = "ema" if EMA_KEY in checkpoint else "raw"
    elif weights == "ema" and EMA_KEY not in checkpoint:
        raise PretrainedError(f"{ckpt_path} has no EMA weights (trained without the EMA callback); use --weights raw")
    if (out_dir / CONFIG_NAME).exists() and not overwrite:
        raise PretrainedError(f"{out_dir / CONFIG_NAME} exists; choose another folder or pass --overwrite")
    state = network_state(checkpoint, weights)
    net = hparams["net"]
    init_args = net.get("init_args") or {}
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lit_score_version": lit_score_version(),
        "net": net, "sde": hparams["sde"], "loss": hparams["loss"], "precond": hparams.get("precond"),
        "data": {k: init_args.get(k) for k in ("num_channels", "image_size", "centered")},
        "data_space": hparams.get("data_space"),  # shape, range, quantisation (None: an older checkpoint)
        "weights": weights, "ema": _ema_settings(checkpoint) if weights == "ema" else None,
        "global_step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0)),
        "experiment": _experiment(ckpt_path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS_NAME),
              metadata={"format": "pt", "weights": weights})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if config["experiment"]:
        shutil.copyfile(Path(config["experiment"]["run_dir"]) / "config.yaml", out_dir / EXPERIMENT_NAME)
    (out_dir / CARD_NAME).write_text(model_card(config, out_dir.name))
    return config


def model_card(config: dict[str, Any], name: str) -> str:
    """A short README.md: what the model is, how to load, sample and share it."""
    net, sde, data = config["net"], config["sde"], config["data"]
    weights = "EMA weights" if config["weights"] == "ema" else "raw training weights (the checkpoint had no EMA)"
    ema = config.get("ema") or {}
    ema_line = f" (EMA rate {ema.get('rate')}, {ema.get('num_updates')} updates)" if ema else ""
    experiment = config.get("experiment") or {}
    source = f" of the experiment `{experiment['name']}` (its full config: `{EXPERIMENT_NAME}`)" if experiment else ""
    centered = "[-1, 1]" if data.get("centered") else "[0, 1]"
    return f"""---
library_name: lit-score
tags: [score-based, diffusion, sde]
---
# {name}

A score-based generative model (Song et al. 2021) trained with lit-score {config['lit_score_version']}:
`{net['class_path']}` under `{sde['class_path']}` {json.dumps(sde.get('init_args') or {})}, loss `{_loss_name(config['loss'])}`,
{data.get('num_channels')}x{data.get('image_size')}x{data.get('image_size')} images in {centered}.
`{WEIGHTS_NAME}` holds the {weights}{ema_line} at training step {config['global_step']}{source};
`{CONFIG_NAME}` holds the network's and the SDE's arguments.

## Load and sample

```python
import torch
from lit_score.runtime.module import ScoreModel
from lit_score.sampling import EDMSampler

model = ScoreModel.from_pretrained("{name}").eval()
images = model.sample(torch.arange(16), sampler=EDMSampler(steps=18)).samples  # one image per seed, in {centered}
```

Or from the command line, with an experiment YAML for the data and the sampler (the network, SDE and loss come
from this folder): `lit-score predict --config experiments/quickstart.yaml --ckpt_path {name}`.

## Share

```python
from huggingface_hub import upload_folder
upload_folder(repo_id="USER/{name}", folder_path="{name}", repo_type="model")
```
"""


# -- load -----------------------------------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of an export folder, checked to be a lit-score export."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedError(f"{folder} is not a folder; give the folder `lit-score export` wrote")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise PretrainedError(f"{path} is missing: {folder} is not a lit-score export; write one with "
                              f"`lit-score export CHECKPOINT {folder}`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PretrainedError(f"{path} is not valid JSON ({err}); export the checkpoint again")
    if config.get("format") != FORMAT:
        hint = (f"it is a diffusers {config['_class_name']}: convert it with `lit-score import-diffusers {folder} "
                "OUT_DIR`" if "_class_name" in config else "export the checkpoint with `lit-score export`")
        raise PretrainedError(f"{path} is not a lit-score config (no \"format\": \"{FORMAT}\"); {hint}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise PretrainedError(f"{path} has format_version {config['format_version']}, newer than this lit-score "
                              f"reads ({FORMAT_VERSION}); upgrade lit-score")
    for key in ("net", "sde"):
        if not isinstance(config.get(key), dict) or "class_path" not in config[key]:
            raise PretrainedError(f"{path} has no {key!r} with a class_path; export the checkpoint again")
    return config


def _loss_name(loss: Any) -> str:
    return loss.get("class_path", "?") if isinstance(loss, dict) else str(loss)


def build(config: dict[str, Any]) -> tuple[nn.Module, SDE, Loss, Preconditioning | None]:
    """The network, SDE, loss and preconditioning (None: the loss's default) of a config's class_path/init_args
    (``model_options``), with fresh weights."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    parser.add_argument("--sde", type=SDE)
    parser.add_argument("--loss", type=Loss)
    parser.add_argument("--precond", type=Preconditioning | None, default=None)
    try:
        parsed = parser.parse_object({k: config[k] for k in ("net", "sde", "loss", "precond")})
        built = parser.instantiate(parsed)
    except Exception as err:  # noqa: BLE001 - jsonargparse's message, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedError(f"cannot build the network, SDE, loss and preconditioning of {CONFIG_NAME}: {first}")
    return built.net, built.sde, built.loss, built.precond


def check_state(net: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise naming ``source`` when ``state``'s keys or shapes do not fit ``net``."""
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PretrainedError(
            f"{source} does not fit the network of {CONFIG_NAME}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}; keep the weights and the config.json written together")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise PretrainedError(
                f"{source}: {key} has shape {tuple(value.shape)} but the network of {CONFIG_NAME} needs "
                f"{tuple(expected[key].shape)}; keep the weights and the config.json written together")


def load_weights(folder: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise PretrainedError(f"{path} is missing; export the checkpoint again with `lit-score export`")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - reported in one line
        raise PretrainedError(f"cannot read {path} as safetensors: {err}; export the checkpoint again")


def load_pretrained(folder: str | Path) -> Pretrained:
    """The network (with its exported weights), SDE, loss and config of an export folder."""
    config = read_config(folder)
    state = load_weights(folder)
    net, sde, loss, precond = build(model_options(folder, config))
    check_state(net, state, str(Path(folder) / WEIGHTS_NAME))
    net.load_state_dict(state, strict=True)
    return Pretrained(net=net, sde=sde, loss=loss, precond=precond, config=config)


def model_options(folder: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model options an export fixes (network, SDE, loss, preconditioning), as ``--ckpt_path`` takes them
    from a checkpoint; exports of earlier releases are read as today's (``lit_score.runtime.upgrade``)."""
    config = read_config(folder) if config is None else config
    try:
        config = upgrade_model_config(config)
    except ValueError as err:
        raise PretrainedError(f"{Path(folder) / CONFIG_NAME}: {err}")
    return {k: config.get(k) for k in ("net", "sde", "loss", "precond")}


# -- command line ---------------------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    """``lit-score export CKPT OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="lit-score export", description=export_checkpoint.__doc__)
    parser.add_argument("checkpoint", help="a lit-score .ckpt")
    parser.add_argument("out_dir", help="folder to write model.safetensors, config.json and README.md to")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="auto (default): the EMA weights when the checkpoint has them, else the raw ones")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    args = parser.parse_args(list(argv))
    try:
        config = export_checkpoint(args.checkpoint, args.out_dir, args.weights, args.overwrite)
    except PretrainedError as err:
        print(f"lit-score export: error: {err}", file=sys.stderr)
        return 2
    note = "" if config["weights"] == "ema" else " (the checkpoint has no EMA weights: these are the raw ones)"
    print(f"wrote {config['weights']} weights of step {config['global_step']}{note} to {args.out_dir}")
    return 0
