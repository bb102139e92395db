"""Convert the checkpoints released with yang-song/score_sde_pytorch into lit-score (Lightning) checkpoints.

An official ``checkpoint_N.pth`` holds ``{'model', 'ema', 'optimizer', 'step'}``: ``model`` is the state_dict of
an ``nn.DataParallel``-wrapped NCSNpp (keys prefixed ``module.``, plus a ``sigmas`` buffer), ``ema`` is
``{'decay', 'num_updates', 'shadow_params'}`` with ``shadow_params`` the averaged trainable parameters as a list
in ``parameters()`` order. The converted ``.ckpt`` is a lit-score checkpoint as training writes it: the raw
weights as the network ``net.*`` and the EMA weights as the EMA network ``ema.*`` of its ``state_dict``, the EMA
callback's state, ``global_step`` and the model's hyper-parameters (network, SDE, loss and the preconditioning
under which the official network computes what it was trained to: ``ScorePrediction(scale_by_sigma=True,
log_label=True)`` for NCSN++ cont. (VE), ``NoisePrediction()`` for DDPM++ cont. (VP, sub-VP), ``SMLDLevels`` /
``DDPMSteps`` for the discrete objectives), so that

    lit-score predict --config experiments/<experiment>.yaml --ckpt_path converted.ckpt
    ScoreModel.load_from_checkpoint("converted.ckpt")

sample with the EMA weights. Files are read with ``torch.load(weights_only=True)`` only: a pickle that would
build arbitrary Python objects (and so could run code) is refused.

    python -m lit_score.interop.score_sde checkpoint_26.pth --experiment cifar10_ncsnpp_deep_continuous_ve --out x.ckpt
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor

from lit_score.diffusion.sdes import VESDE
from lit_score.errors import CheckpointError
from lit_score.runtime.checkpoint_io import sha256
from lit_score.runtime.module import ScoreModel
from lit_score.runtime.upgrade import EMA, NET, score_sde_precond

CONVERSION_KEY = "lit_score_conversion"


@dataclass(frozen=True)
class OfficialConfig:
    """A released score_sde config and the lit-score experiment that reproduces its model and SDE."""

    official: str  # score_sde_pytorch configs/<official>.py
    experiment: str  # experiments/<experiment>.yaml
    paper: str = ""  # what the paper reports for it


OFFICIAL_CONFIGS: dict[str, OfficialConfig] = {c.official: c for c in (
    OfficialConfig("ve/cifar10_ncsnpp_continuous", "cifar10_ncsnpp_continuous_ve"),
    OfficialConfig("ve/cifar10_ncsnpp_deep_continuous", "cifar10_ncsnpp_deep_continuous_ve", "FID 2.20, IS 9.89"),
    OfficialConfig("vp/cifar10_ddpmpp_continuous", "cifar10_ddpmpp_continuous_vp"),
    OfficialConfig("vp/cifar10_ddpmpp_deep_continuous", "cifar10_ddpmpp_deep_continuous_vp"),
    OfficialConfig("subvp/cifar10_ddpmpp_continuous", "cifar10_ddpmpp_continuous_subvp"),
    OfficialConfig("subvp/cifar10_ddpmpp_deep_continuous", "cifar10_ddpmpp_deep_continuous_subvp"),
    OfficialConfig("ve/ffhq_256_ncsnpp_continuous", "ffhq256_ncsnpp_continuous_ve"),
    OfficialConfig("ve/celebahq_256_ncsnpp_continuous", "celebahq256_ncsnpp_continuous_ve"),
    OfficialConfig("ve/church_ncsnpp_continuous", "lsun_church_ncsnpp_continuous_ve"),
    OfficialConfig("ve/bedroom_ncsnpp_continuous", "lsun_bedroom_ncsnpp_continuous_ve"),
)}


class ConversionError(CheckpointError):
    """An official checkpoint that cannot be read, or does not fit the chosen experiment."""


def experiment_for(name: str) -> str:
    """Our experiment name for an official config name (``ve/cifar10_ncsnpp_deep_continuous``) or our own name."""
    key = name.removeprefix("configs/").removesuffix(".py")
    return OFFICIAL_CONFIGS[key].experiment if key in OFFICIAL_CONFIGS else name


def _refused_global(message: str) -> str | None:
    """The Python object a weights-only unpickler refused to build, as named in torch's message."""
    match = re.search(r"GLOBAL\s+([\w.]+)", message)
    return match.group(1) if match else None


def load_official(path: str | Path) -> dict[str, Any]:
    """The official checkpoint at ``path`` read with ``torch.load(weights_only=True)``, as ``{'model', 'ema', ...}``.

    A bare state_dict (every value a tensor) is read as ``{'model': it}``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"official checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(str(err))
        if name is None:
            raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
        raise ConversionError(
            f"refused to load {path}: it contains pickled Python objects other than tensors and plain containers"
            f" (it references {name}), which could run arbitrary code when unpickled. lit-score only reads checkpoints with "
            f"torch.load(weights_only=True); an official score_sde checkpoint_N.pth never needs more. If you trust "
            f"the file, re-save its tensors (model, ema, step) as plain dicts and convert that.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
    if isinstance(loaded, Mapping) and "model" not in loaded and loaded and all(
            isinstance(v, Tensor) for v in loaded.values()):
        return {"model": dict(loaded)}
    if not isinstance(loaded, Mapping) or "model" not in loaded:
        keys = sorted(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ConversionError(f"{path} is not a score_sde checkpoint: expected a dict with 'model' (and 'ema', "
                              f"'step'), got {keys}")
    return dict(loaded)


def _limit(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_sigmas(sigmas: Tensor, model: ScoreModel) -> None:
    """The official ``sigmas`` buffer (exp(linspace(log sigma_max, log sigma_min, num_scales))) against our SDE."""
    sde = model.sde
    if sigmas.dim() != 1 or len(sigmas) != sde.N:
        raise ConversionError(f"the checkpoint was trained with {len(sigmas)} noise scales (its 'sigmas' buffer) "
                              f"but the experiment's SDE has N={sde.N}; choose the experiment of its config")
    if isinstance(sde, VESDE):
        top, bottom = float(sigmas[0]), float(sigmas[-1])
        if not (math.isclose(top, sde.sigma_max, rel_tol=1e-3) and math.isclose(bottom, sde.sigma_min, rel_tol=1e-3)):
            raise ConversionError(f"the checkpoint was trained with sigma_max={top:g}, sigma_min={bottom:g} (its "
                                  f"'sigmas' buffer) but the experiment's VESDE has sigma_max={sde.sigma_max:g}, "
                                  f"sigma_min={sde.sigma_min:g}; choose the experiment of its config")


def network_weights(official: Mapping[str, Any], model: ScoreModel) -> dict[str, Tensor]:
    """The official ``model`` state_dict mapped onto ``model.net``: every key and shape checked, all mismatches named."""
    state = official["model"]
    if not isinstance(state, Mapping):
        raise ConversionError(f"the checkpoint's 'model' is a {type(state).__name__}, not a state_dict")
    ours = model.net.state_dict()
    theirs: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key == "sigmas":
            check_sigmas(value, model)
            continue
        theirs[key] = value
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    wrong = [f"{k} {tuple(theirs[k].shape)} vs ours {tuple(ours[k].shape)}"
             for k in ours if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or wrong:
        lines = [f"the checkpoint's network does not fit {type(model.net).__name__} of the chosen experiment "
                 f"({len(theirs)} tensors in the checkpoint, {len(ours)} in the network):"]
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}): {_limit(wrong)}")
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {_limit(missing)}")
        if unexpected:
            lines.append(f"  not in the network ({len(unexpected)}): {_limit(unexpected)}")
        lines.append("Is this the checkpoint of another config (deep vs not, CIFAR-10 vs 256x256, NCSN++ vs DDPM++)?")
        raise ConversionError("\n".join(lines))
    return {k: theirs[k].to(ours[k].dtype).contiguous() for k in ours}


def ema_weights(official: Mapping[str, Any], model: ScoreModel, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The EMA ``shadow_params`` (trainable parameters in order) as a full network state_dict; frozen parameters
    (the Fourier embedding's W) and buffers are the raw weights, which the official EMA never averaged."""
    ema = official["ema"]
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
        raise ConversionError(f"the checkpoint's 'ema' is not an ExponentialMovingAverage state_dict with "
                              f"'shadow_params'; it has {sorted(ema)[:10] if isinstance(ema, Mapping) else type(ema)}")
    shadow = list(ema["shadow_params"])
    trainable = [(name, p) for name, p in model.net.named_parameters() if p.requires_grad]
    if len(shadow) != len(trainable):
        raise ConversionError(f"the checkpoint's EMA has {len(shadow)} shadow parameters but the network has "
                              f"{len(trainable)} trainable parameters; they must correspond one to one, in order")
    out = dict(raw)
    wrong = []
    for (name, p), s in zip(trainable, shadow):
        if not isinstance(s, Tensor) or tuple(s.shape) != tuple(p.shape):
            wrong.append(f"#{len(out)} {name}: {tuple(getattr(s, 'shape', ()))} vs ours {tuple(p.shape)}")
            continue
        out[name] = s.to(p.dtype).contiguous()
    if wrong:
        raise ConversionError(f"EMA shadow parameters do not fit the network's parameters in order: {_limit(wrong)}")
    return out


def official_precond(model: ScoreModel) -> dict[str, Any]:
    """The preconditioning (class_path/init_args) under which the official network of ``model`` computes what
    score_sde trained it to (its ``get_score_fn``): the VE networks divide by sigma (scale_by_sigma), the VP and
    sub-VP ones predict the noise; Fourier embeddings see the log of the label."""
    fourier = getattr(model.net, "embedding_type", "fourier") == "fourier"
    return score_sde_precond(_class_path(model.sde), _class_path(model.loss), isinstance(model.sde, VESDE), fourier)


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _as_config(obj: object) -> dict[str, Any]:
    """class_path/init_args of a loss or preconditioning (their attributes are their arguments)."""
    return {"class_path": _class_path(obj), "init_args": {k: v for k, v in vars(obj).items() if not k.startswith("_")}}


def hyper_parameters(model: ScoreModel) -> dict[str, Any]:
    """The model's hyper-parameters as a checkpoint of today's lit-score holds them (class_path/init_args of the
    network, SDE and loss, and the preconditioning written out), checked to be score_sde's parametrisation."""
    expected = official_precond(model)
    if _as_config(model.precond) != expected:
        name, args = expected["class_path"].rpartition(".")[2], expected["init_args"]
        expected_repr = f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
        raise ConversionError(
            f"the experiment's preconditioning {model.precond!r} is not what the official {type(model.net).__name__} "
            f"computes under {type(model.sde).__name__} with {type(model.loss).__name__}: {expected_repr} (score_sde's "
            "parametrisation); leave model.precond unset or set it to that")
    hparams = dict(model.hparams)
    missing = [k for k in ("net", "sde") if not isinstance(hparams.get(k), Mapping) or "class_path" not in hparams[k]]
    if missing:
        raise ConversionError(f"the model does not record its {' and '.join(missing)} as class_path/init_args: build "
                              "it from an experiment YAML (lit_score.evaluate.experiment.load_experiment), as "
                              "convert_file does")
    if not isinstance(hparams.get("loss"), Mapping):  # unset in the YAML: the default DSMLoss()
        hparams["loss"] = _as_config(model.loss)
    hparams["precond"] = _as_config(model.precond)
    return hparams


def ema_callback_state(ema: Mapping[str, Any], global_step: int) -> tuple[str, dict[str, Any]]:
    """(state key, state) of lit-score's EMA callback continuing the official EMA: its decay as the rate, its update
    count (the step when it has none) and the official warm-up when it counted updates."""
    from lit_score.callbacks.ema import EMA as EMACallback

    num_updates = ema.get("num_updates")
    callback = EMACallback(rate=float(ema.get("decay", 0.9999)), warmup=num_updates is not None)
    callback.num_updates = global_step if num_updates is None else _as_int(num_updates, "EMA num_updates")
    return callback.state_key, callback.state_dict()


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1:
        return int(value.item())
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    raise ConversionError(f"the checkpoint's {what} should be an integer, got {value!r}")


def convert(official: Mapping[str, Any], model: ScoreModel, experiment: str | None = None,
            config_path: str | Path | None = None, source: str | None = None,
            source_sha256: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint dict for ``model`` (a ScoreModel built from the matching experiment) from an official
    checkpoint dict: the raw weights as ``net.*``, the EMA weights as ``ema.*``, the model's hyper-parameters with
    score_sde's preconditioning; raises ``ConversionError`` naming every key or shape that does not fit."""
    hparams = hyper_parameters(model)
    raw = network_weights(official, model)
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": _as_int(official.get("step", 0), "'step'"),
        "pytorch-lightning_version": L.__version__,
        "state_dict": {NET + k: v for k, v in raw.items()},
        "hyper_parameters": hparams,
        "callbacks": {},
    }
    if "ema" in official:
        checkpoint["state_dict"].update({EMA + k: v for k, v in ema_weights(official, model, raw).items()})
        key, state = ema_callback_state(official["ema"], checkpoint["global_step"])
        checkpoint["callbacks"][key] = state
    checkpoint[CONVERSION_KEY] = {
        "source": source, "source_sha256": source_sha256, "experiment": experiment,
        "config": str(config_path) if config_path is not None else None,
        "has_ema": "ema" in official, "ema_decay": float(official["ema"].get("decay", float("nan")))
        if "ema" in official else None,
    }
    return checkpoint


def convert_file(source: str | Path, experiment: str | Path, out: str | Path,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``source`` (weights only), build the experiment's model (a name in ``experiments/``, an official config
    name or a YAML path, with command-line style ``overrides``), convert, and write ``out``; returns the checkpoint."""
    from lit_score.evaluate.experiment import experiment_path, load_experiment

    official = load_official(source)
    name = experiment_for(str(experiment))
    path = experiment_path(name)
    model = load_experiment(path, overrides).model
    checkpoint = convert(official, model, experiment=path.stem, config_path=path, source=str(source),
                         source_sha256=sha256(source))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)
    return checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lit_score.interop.score_sde CHECKPOINT --experiment NAME --out OUT.ckpt [--model.x y ...]``."""
    known = "\n".join(f"  {c.official:40s} -> {c.experiment}" for c in OFFICIAL_CONFIGS.values())
    parser = argparse.ArgumentParser(
        prog="python -m lit_score.interop.score_sde", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a score_sde_pytorch checkpoint_N.pth into a lit-score checkpoint.",
        epilog=f"Official configs and their experiments:\n{known}\n\nFurther arguments (e.g. --model.sde.init_args.N "
               f"2000) override the experiment's config as on the lit-score command line.")
    parser.add_argument("checkpoint", help="official checkpoint_N.pth")
    parser.add_argument("--experiment", required=True,
                        help="experiment name (experiments/<name>.yaml), official config name or YAML path")
    parser.add_argument("--out", required=True, help="where to write the lit-score .ckpt")
    args, overrides = parser.parse_known_args(argv)
    try:
        checkpoint = convert_file(args.checkpoint, args.experiment, args.out, overrides)
    except (ConversionError, FileNotFoundError) as err:
        print(f"lit_score.interop.score_sde: error: {err}", file=sys.stderr)
        return 2
    info = checkpoint[CONVERSION_KEY]
    print(f"wrote {args.out}: step {checkpoint['global_step']}, {len(checkpoint['state_dict'])} tensors, "
          f"EMA {'decay ' + format(info['ema_decay'], 'g') if info['has_ema'] else 'absent'}; sample with\n"
          f"  lit-score predict --config {info['config']} --ckpt_path {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
