"""Self-describing exports: a folder with the network's weights (``model.safetensors``), everything needed to
rebuild the model (``config.json``) and a model card (``README.md``), loadable without any YAML.

    lit-score export runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart
    ScoreModel.from_pretrained("exported/quickstart")          # or --ckpt_path exported/quickstart

No Lightning here: the checkpoint is read with ``torch.load`` and the classes are built by jsonargparse.
"""
from __future__ import annotations

import argparse
import json
import os
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


def _run_config(ckpt_path: Path) -> dict[str, Any] | None:
    """The full config of the run the checkpoint came from (LightningCLI saves it next to ``checkpoints/``)."""
    run_config = ckpt_path.resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        return None
    import yaml

    with open(run_config) as f:
        config = yaml.safe_load(f)
    return config if isinstance(config, dict) else None


def _experiment(ckpt_path: Path, run_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """What config.json says of the run: its name, the file that holds its config and the checkpoint's file name
    (no path: the folder is shared)."""
    if run_config is None:
        return None
    logger = (run_config.get("trainer") or {}).get("logger") or {}
    init_args = logger.get("init_args") or {} if isinstance(logger, dict) else {}
    return {"name": init_args.get("name"), "config": EXPERIMENT_NAME, "checkpoint": ckpt_path.name}


def _is_absolute_path(value: Any) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~"))


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what belongs to the machine and run that made it: every absolute path is null (the
    logger's save_dir is ``runs``), and the logger's version and ``ckpt_path`` are null, so that the config trains or
    samples anew anywhere (``data.init_args.path`` then has to be given, as in the folder experiments)."""
    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return None if _is_absolute_path(node) else node

    clean = scrub(config)
    if "ckpt_path" in clean:
        clean["ckpt_path"] = None
    logger = (clean.get("trainer") or {}).get("logger")
    for item in logger if isinstance(logger, list) else [logger]:
        init_args = item.get("init_args") if isinstance(item, dict) else None
        if isinstance(init_args, dict):
            if "version" in init_args:
                init_args["version"] = None
            if "save_dir" in init_args and init_args["save_dir"] is None:
                init_args["save_dir"] = "runs"
    return clean


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then renamed), with the mode of
    any new file (0644 under the usual umask 022): readers never see half a file, and the export is shareable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """Write ``out_dir/{model.safetensors, config.json, README.md}`` (and the run's config as ``experiment.yaml``,
    without this machine's paths and the run's version, when it is next to the checkpoint) from a lit-score
    checkpoint; ``weights``: ``ema``, ``raw`` or ``auto`` (EMA when the checkpoint has them). Returns the config."""
    import yaml
    from safetensors.torch import save

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
    run_config = _run_config(ckpt_path)
    net = hparams["net"]
    init_args = net.get("init_args") or {}
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lit_score_version": lit_score_version(),
        "net": net, "sde": hparams["sde"], "loss": hparams["loss"], "precond": hparams.get("precond"),
        "data": {k: init_args.get(k) for k in ("num_channels", "image_size", "centered")},
        "data_space": hparams.get("data_space"),  # shape, range, quantisation (None: an older checkpoint)
        "guidance": hparams.get("guidance"),  # a class-conditional model's default guidance (None: unguided)
        "weights": weights, "ema": _ema_settings(checkpoint) if weights == "ema" else None,
        "global_step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0)),
        "experiment": _experiment(ckpt_path, run_config),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file(out_dir / WEIGHTS_NAME, save({k: v.contiguous() for k, v in state.items()},
                                            metadata={"format": "pt", "weights": weights}))
    write_file(out_dir / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    if run_config is not None:
        experiment = yaml.safe_dump(portable_config(run_config), sort_keys=False)
        write_file(out_dir / EXPERIMENT_NAME, experiment.encode())
    else:  # an earlier export's, overwritten
        (out_dir / EXPERIMENT_NAME).unlink(missing_ok=True)
    write_file(out_dir / CARD_NAME, model_card(config, out_dir.name).encode())
    return config


def _data_description(config: dict[str, Any]) -> tuple[tuple[int, ...] | None, bool, str]:
    """The shape of one sample (None when the config does not say), whether it is centered, and its range."""
    space, data = config.get("data_space") or {}, config.get("data") or {}
    if space.get("shape"):
        shape = tuple(int(s) for s in space["shape"])
    elif data.get("num_channels") and data.get("image_size"):
        shape = (int(data["num_channels"]), int(data["image_size"]), int(data["image_size"]))
    else:
        shape = None
    centered = bool(space.get("centered", data.get("centered")))
    return shape, centered, "[-1, 1]" if centered else "[0, 1]"


def model_card(config: dict[str, Any], name: str) -> str:
    """A short README.md: what the model is, and how to sample it (Python and ``lit-score predict`` on this folder,
    no YAML) and share it. Its statements on ranges are those of ``ScoreModel.sample`` (the sampler's output, not
    clamped) and of ``DataSpace.to_uint8`` (clamped to the data range, then quantised)."""
    net, sde = config["net"], config["sde"]
    weights = {"ema": "EMA weights", "raw": "raw training weights (the checkpoint had no EMA)"}.get(
        config.get("weights"), f"{config.get('weights')} weights")
    ema = config.get("ema") or {}
    ema_line = f" (EMA rate {ema.get('rate')}, {ema.get('num_updates')} updates)" if ema else ""
    experiment = config.get("experiment") or {}
    source = (f" of the experiment `{experiment['name']}` (its full config: `{EXPERIMENT_NAME}`)"
              if experiment.get("name") else "")
    shape, centered, value_range = _data_description(config)
    if shape is not None and len(shape) == 3:
        c, h, w = shape
        data_line = f"{c}x{h}x{w} images, as floats in {value_range}"
        scale = "2 k / 255 - 1" if centered else "k / 255"
        shape_text = f"(16, {c}, {h}, {w})"
        convert = (f"images = model.data_space.to_uint8(x)  # uint8 {shape_text}, 0..255: x clamped to "
                   f"{value_range}, then rounded")
        ranges = (f"`x` is the sampler's output as it is, on the data's scale ({value_range}: pixel value k is "
                  f"{scale}) but **not clamped**: a model that is not fully trained returns values outside "
                  f"{value_range}, far outside for a poor one. `images` are 8-bit images: `x` clamped to "
                  f"{value_range} and rounded to 256 levels (`lit_score.data_space.to_uint8`).")
        cli_out = ("`samples.npz` (`samples`: those uint8 images, N x H x W x C in 0..255; `seeds`; `nfe`, the network "
                   "evaluations per image) and `samples.png`, a grid of them")
    else:  # vectors (e.g. the 2-D toys): continuous data without a fixed range
        data_line = f"samples of shape {tuple(shape) if shape else '(...)'}"
        shape_text = f"(16, {', '.join(str(d) for d in shape)})" if shape else "(16, ...)"
        convert = ""
        ranges = "`x` is the sampler's output as it is, not clamped to any range."
        cli_out = "`samples.npz` (`samples`: float32, as `x`; `seeds`; `nfe`) and `samples.png`, a scatter plot"
    convert_line = f"\n{convert}" if convert else ""
    space = config.get("data_space") or {}
    if (net.get("init_args") or {}).get("num_classes") and _is_classifier(net):
        return _classifier_card(config, name, net, sde, weights, ema_line, source, data_line, space)
    classes = _classes_text(space, name, config.get("guidance"))
    return f"""---
library_name: lit-score
tags: [score-based, diffusion, sde]
---
# {name}

A score-based generative model (Song et al. 2021) trained with lit-score {config.get('lit_score_version')}:
`{net['class_path']}` under `{sde['class_path']}` {json.dumps(sde.get('init_args') or {})}, loss `{loss_name(config['loss'])}`,
{data_line}.
`{WEIGHTS_NAME}` holds the {weights}{ema_line} at training step {config.get('global_step')}{source};
`{CONFIG_NAME}` holds the network's, the SDE's and the loss's arguments and the data space (shape, range, levels).
{classes}
## Sample

From the folder that holds `{name}/`:

```python
import torch
from lit_score.runtime.module import ScoreModel
from lit_score.sampling import EDMSampler

model = ScoreModel.from_pretrained("{name}").eval()
result = model.sample(torch.arange(16), sampler=EDMSampler(steps=18))  # one sample per seed 0..15
x = result.samples  # float {shape_text}: the sampler's output, not clamped{convert_line}
```

{ranges}

From the command line, with no YAML (the network, SDE, loss and data shape come from `{CONFIG_NAME}`):

```bash
lit-score predict --ckpt_path {name} --data.init_args.num_samples 16
```

It writes {cli_out}. `--model.sampler EDMSampler --model.sampler.steps 18` picks the sampler of the Python example.

## Share

```python
from huggingface_hub import upload_folder
upload_folder(repo_id="USER/{name}", folder_path="{name}", repo_type="model")
```
"""


def _is_classifier(net: dict[str, Any]) -> bool:
    return str(net.get("class_path", "")).endswith("NoiseClassifierNet")


def _classes_text(space: dict[str, Any], name: str, guidance: dict[str, Any] | None) -> str:
    """The model card's paragraph on a class-conditional model's classes; empty for an unconditional one."""
    if not space.get("num_classes"):
        return ""
    names = space.get("class_names") or [str(i) for i in range(space["num_classes"])]
    listed = ", ".join(f"{i} `{n}`" for i, n in enumerate(names[:20])) + (", ..." if len(names) > 20 else "")
    guided = (f" Its default guidance is `{guidance.get('class_path', '').rsplit('.', 1)[-1]}` "
              f"{json.dumps(guidance.get('init_args') or {})}." if isinstance(guidance, dict) else "")
    return f"""
It is class-conditional, with {space['num_classes']} classes: {listed}. Image i is drawn with the label its seed
draws from the training set's class frequencies, or with the class you give: `model.sample(seeds, class_label=3)`,
`--data.init_args.class_label 3` on the command line; `samples.npz` then also holds `labels`.{guided}
"""


def _classifier_card(config: dict[str, Any], name: str, net: dict[str, Any], sde: dict[str, Any], weights: str,
                     ema_line: str, source: str, data_line: str, space: dict[str, Any]) -> str:
    return f"""---
library_name: lit-score
tags: [score-based, diffusion, classifier-guidance]
---
# {name}

A noise-conditional classifier p_sigma(y | x) (Song et al. 2021, appendix I) trained with lit-score
{config.get('lit_score_version')}: `{net['class_path']}` under `{sde['class_path']}`, {space.get('num_classes')} classes,
{data_line}. `{WEIGHTS_NAME}` holds the {weights}{ema_line} at training step {config.get('global_step')}{source}.
It draws no samples: it guides a model of the same data,

```bash
lit-score predict --ckpt_path MODEL --model.guidance ClassifierGuidance --model.guidance.classifier {name} \\
  --model.guidance.scale 1 --data.init_args.class_label 3
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
