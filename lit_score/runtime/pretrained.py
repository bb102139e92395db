"""Export folders read back: ``config.json`` (everything needed to rebuild the model) and ``model.safetensors``
(the weights to sample with), without any YAML; ``lit_score.interop.export`` writes them. No Lightning here."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lit_score.diffusion.denoiser import Preconditioning
from lit_score.diffusion.losses import Loss
from lit_score.diffusion.sdes import SDE
from lit_score.errors import CheckpointError
from lit_score.runtime.upgrade import upgrade_model_config

FORMAT = "lit-score"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, EXPERIMENT_NAME = "config.json", "model.safetensors", "README.md", "experiment.yaml"


class PretrainedError(CheckpointError):
    """An export folder that cannot be read or does not fit its config (the message names the file and the fix)."""


@dataclass
class Pretrained:
    net: nn.Module
    sde: SDE
    loss: Loss
    precond: Preconditioning
    config: dict[str, Any]


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


def loss_name(loss: Any) -> str:
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


def export_hyperparameters(folder: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an export says of its model, as a checkpoint's hyper-parameters say it: the options it fixes
    (:func:`model_options`), its ``data_space`` and, when recorded, its ``sampler``, ``likelihood`` and ``guidance``."""
    config = read_config(folder) if config is None else config
    return {**model_options(folder, config),
            **{k: config.get(k) for k in ("data_space", "sampler", "likelihood", "guidance")}}


# -- command line ---------------------------------------------------------------------------------------------------
