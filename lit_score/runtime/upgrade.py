"""Checkpoints, export configs and experiment YAMLs of earlier lit-score releases, read as today's.

Release 0.1 kept the modules flat (``lit_score.sdes``, ``lit_score.losses``, ...), let the SDE, the loss and network
flags (``scale_by_sigma``, the Fourier embedding's log) say what the network outputs, and stored the EMA weights
under a checkpoint key of their own. Today the package has floors, the model has one preconditioning and the EMA
is a network beside ``net`` (``ema.*`` in the state dict). Everything here is plain dicts: no Lightning.
"""
from __future__ import annotations

import copy
from typing import Any

MOVED = {  # 0.1 module -> today's
    "lit_score.sdes": "lit_score.diffusion.sdes",
    "lit_score.losses": "lit_score.diffusion.losses",
    "lit_score.preconditioning": "lit_score.diffusion.denoiser",
    "lit_score.likelihood": "lit_score.diffusion.likelihood",
    "lit_score.densities": "lit_score.diffusion.densities",
    "lit_score.module": "lit_score.runtime.module",
    "lit_score.tools": "lit_score.callbacks.toy2d",
    "lit_score.preemption": "lit_score.callbacks.preemption",
    "lit_score.resume": "lit_score.callbacks.resume",
    "lit_score.evaluate.inception_score": "lit_score.metrics.inception_score",
}
LOSS_NAMES = {"dsm": "DSMLoss", "smld": "SMLDLoss", "ddpm": "DDPMLoss", "edm": "EDMLoss"}  # losses named by string before 0.1
EMA_WEIGHTS_KEY = "ema_state_dict"  # where 0.1 checkpoints keep the EMA weights (keys like the state dict's)
NET, EMA = "net.", "ema."  # the model's two networks in its state dict
DENOISER = "lit_score.diffusion.denoiser."


def upgrade_class_path(path: str) -> str:
    """Today's dotted path of a class that a 0.1 config names."""
    module, _, name = path.rpartition(".")
    return f"{MOVED.get(module, module)}.{name}" if module else path


def _upgrade_class_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: upgrade_class_path(v) if k == "class_path" and isinstance(v, str) else _upgrade_class_paths(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_upgrade_class_paths(v) for v in value]
    return value


def _loss(loss: Any, options: dict[str, Any]) -> dict[str, Any]:
    """A loss as class_path/init_args; a name (or none) takes its options from beside it, as early checkpoints."""
    if loss is None:
        loss = "dsm"
    if not isinstance(loss, str):
        return loss
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSS_NAMES)} (or a class_path)")
    keys = ("eps", "reduce_mean", "likelihood_weighting") if loss == "dsm" else ("reduce_mean",)
    return {"class_path": f"lit_score.diffusion.losses.{LOSS_NAMES[loss]}",
            "init_args": {k: options[k] for k in keys if k in options}}


def score_sde_precond(sde: str, loss: str, scale_by_sigma: bool, fourier: bool) -> dict[str, Any]:
    """The preconditioning (class_path/init_args) of score_sde's parametrisation, as 0.1 and the official code
    read the network's output: by the SDE and loss classes (dotted paths), the network's ``scale_by_sigma`` and
    whether it embeds with Fourier features (the log of the label)."""
    if loss.endswith(".SMLDLoss"):
        return {"class_path": DENOISER + "SMLDLevels", "init_args": {"scale_by_sigma": scale_by_sigma,
                                                                    "log_label": fourier}}
    if loss.endswith(".DDPMLoss"):
        name, args = "DDPMSteps", {"log_label": fourier}
    elif sde.endswith(".VESDE"):
        name, args = "ScorePrediction", {"scale_by_sigma": scale_by_sigma, "log_label": fourier}
    else:
        name, args = "NoisePrediction", {"log_label": fourier}
    if scale_by_sigma and name != "ScorePrediction":
        raise ValueError(f"the network has scale_by_sigma: true under {sde.rpartition('.')[2]} with "
                         f"{loss.rpartition('.')[2]}, which lit-score never trained; set it false in the config")
    return {"class_path": DENOISER + name, "init_args": args}


def upgrade_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model's options (checkpoint hyper-parameters or an export's config) with today's class paths, the loss
    as an object and the parametrisation as one ``precond``; today's configs come back unchanged."""
    config = _upgrade_class_paths(copy.deepcopy(config))
    if not isinstance(config.get("net"), dict) or not isinstance(config.get("sde"), dict):
        return config  # no configs to read (e.g. a model built in Python)
    loss = config["loss"] = _loss(config.get("loss"), config)
    net_args = config["net"].get("init_args", {}) if isinstance(config["net"], dict) else {}
    loss_args = loss.setdefault("init_args", {})
    if "precond" in config and "scale_by_sigma" not in net_args and "precond" not in loss_args:
        return config  # today's
    scale_by_sigma = bool(net_args.pop("scale_by_sigma", False))
    precond = loss_args.pop("precond", None)
    if precond is None and not loss["class_path"].endswith(".EDMLoss"):
        precond = score_sde_precond(config["sde"]["class_path"], loss["class_path"], scale_by_sigma,
                                  net_args.get("embedding_type", "fourier") == "fourier")
    elif scale_by_sigma:
        raise ValueError("the network has scale_by_sigma: true under a preconditioning, which scales the output "
                         "itself; set it false in the config")
    config["precond"] = config.get("precond") or precond
    return config


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A 0.1 checkpoint as today's (the same dict, changed in place): upgraded hyper-parameters, and the EMA
    weights moved from their own key into the state dict as the ``ema`` network."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict):
        checkpoint["hyper_parameters"] = upgrade_model_config(hparams)
    ema = checkpoint.pop(EMA_WEIGHTS_KEY, None)
    if ema is not None:
        state = checkpoint.setdefault("state_dict", {})
        state.update({EMA + k[len(NET):]: v for k, v in ema.items() if k.startswith(NET)})
    checkpoint.pop("weights", None)  # 0.1's note on the two keys
    return checkpoint


def sampling_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The network weights to sample with from a model's state dict: the EMA network's when it has one, else the
    trained network's; keys without the prefix."""
    prefix = EMA if any(k.startswith(EMA) for k in state_dict) else NET
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
