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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from lit_score.runtime.pretrained import (CARD_NAME, CONFIG_NAME, EXPERIMENT_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME,
                                         PretrainedError, loss_name)
from lit_score.runtime.upgrade import EMA, sampling_state, upgrade_checkpoint


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


def has_ema(checkpoint: dict[str, Any]) -> bool:
    """Whether an (upgraded) checkpoint holds an EMA network (``ema.*`` in its state dict)."""
    return any(k.startswith(EMA) for k in checkpoint.get("state_dict") or {})


def network_state(checkpoint: dict[str, Any], weights: str) -> dict[str, Tensor]:
    """The network's tensors (prefix stripped) of an upgraded checkpoint: its EMA network's (``ema``), its trained
    network's (``raw``) or the weights it samples with (``auto``: the EMA network's when it has one)."""
    state_dict = checkpoint.get("state_dict") or {}
    if weights == "raw":  # the trained network: the state without the EMA network
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(EMA)}
    elif weights == "ema" and not has_ema(checkpoint):
        raise PretrainedError("the checkpoint has no EMA weights (trained without the EMA callback); use --weights raw")
    state = sampling_state(state_dict)
    if not state:
        raise PretrainedError(f"the checkpoint has no {weights} network weights in its state_dict")
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
        weights = "ema" if has_ema(checkpoint) else "raw"
    elif weights == "ema" and not has_ema(checkpoint):
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
`{net['class_path']}` under `{sde['class_path']}` {json.dumps(sde.get('init_args') or {})}, loss `{loss_name(config['loss'])}`,
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
