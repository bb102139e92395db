"""What TensorBoard shows of a run: a custom-scalars layout for score models and the run's hyper-parameters.

The layout (TensorBoard's "Custom Scalars" tab) puts loss and val loss together, FID@n against the step with n,
the sampler and the reference set in the chart's title, then grad norm, EMA decay and learning rate. The HParams
tab gets the data set, image size, batch size, devices, EMA rate, SDE, sampler and NFE, with the FID, KID and the
losses as its metrics (their last values: the final FID).
"""
from __future__ import annotations

import re
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from .ema import EMA
from .fid import FID
from lit_score.progress import planned_nfe


def _name(obj: Any) -> str:
    return type(obj).__name__ if obj is not None else "none"


def _plain(value: Any) -> bool | int | float | str:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _flatten(params: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}, 'c': [{'d': 2}]} -> {'a/b': 1, 'c/0/d': 2}`` (namespaces and dataclasses as dicts)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if is_dataclass(v) and not isinstance(v, type):
            v = asdict(v)
        elif isinstance(v, Namespace):
            v = vars(v)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        elif isinstance(v, list) and all(isinstance(item, Mapping) for item in v):
            for i, item in enumerate(v):
                out.update(_flatten(item, f"{key}/{i}"))
        else:
            out[key] = v
    return out


def sampler_summary(module: L.LightningModule, sampler: Any) -> tuple[str, int | None]:
    """The sampler's class name with its main settings, and its planned NFE per image."""
    sampler = module.sampler_in_use(sampler) if hasattr(module, "sampler_in_use") else sampler
    settings = {k: v for k, v in vars(sampler).items() if isinstance(v, (bool, int, float, str)) and v is not None}
    shown = ", ".join(f"{k}={v}" for k, v in list(settings.items())[:4])
    return f"{_name(sampler)}({shown})", planned_nfe(sampler, getattr(module, "sde", None))


def fid_title(fid: FID, module: L.LightningModule) -> str:
    """``val/fid@10k: 10000 EMA samples, EDMSampler(...) at 35 NFE, vs 50000 training images (InceptionV3)``."""
    sampler, nfe = sampler_summary(module, fid.sampler)
    reference = fid.reference
    against = f"{reference.count} training images" if reference is not None else "the training images"
    return (f"{fid.tag}: {fid.num_samples} EMA samples, {sampler} at {nfe if nfe else 'adaptive'} NFE, vs "
            f"{against} ({_name(fid.features)})")


def run_hparams(trainer: L.Trainer, module: L.LightningModule) -> dict[str, bool | int | float | str]:
    """The run's settings for the HParams tab: data, batch, devices, EMA, SDE, sampler and NFE, model options."""
    data = trainer.datamodule
    out: dict[str, Any] = {}
    if data is not None:
        out["data/dataset"] = getattr(data, "dataset_name", None) or type(data).__name__
        path = getattr(getattr(data, "plugin", None), "path", None) or getattr(data, "path", None)
        if path:
            out["data/path"] = str(path)
        for key in ("image_size", "num_channels", "centered", "batch_size"):
            if getattr(data, key, None) is not None:
                out[f"data/{key}"] = getattr(data, key)
        if isinstance(out.get("data/batch_size"), int):
            out["data/global_batch_size"] = out["data/batch_size"] * trainer.world_size * \
                trainer.accumulate_grad_batches
    out.update({"trainer/devices": trainer.num_devices, "trainer/num_nodes": trainer.num_nodes,
                "trainer/world_size": trainer.world_size, "trainer/accelerator": _name(trainer.accelerator),
                "trainer/precision": str(trainer.precision), "trainer/max_steps": trainer.max_steps})
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    out["ema/rate"] = ema.rate if ema is not None else "no EMA"
    if ema is not None and ema.halflife_kimg is not None:
        out["ema/halflife_kimg"] = ema.halflife_kimg
    sde = getattr(module, "sde", None)
    if sde is not None:
        out["sde"] = _name(sde)
        out.update({f"sde/{k}": v for k, v in vars(sde).items() if isinstance(v, (bool, int, float))})
    if hasattr(module, "sampler_in_use"):
        out["sampler"], nfe = sampler_summary(module, None)
        out["sampler/nfe"] = nfe if nfe is not None else "adaptive"
    for fid in (cb for cb in trainer.callbacks if isinstance(cb, FID)):
        out[f"{fid.tag}/sampler"], nfe = sampler_summary(module, fid.sampler)
        out[f"{fid.tag}/nfe"] = nfe if nfe is not None else "adaptive"
        out[f"{fid.tag}/features"] = _name(fid.features)
    hparams = {k: v for k, v in _flatten(dict(getattr(module, "hparams", {}))).items()
               if k.split("/")[0] not in ("net", "sde", "sampler", "likelihood")}
    out.update({f"model/{k}": v for k, v in hparams.items()})
    return {k: _plain(v) for k, v in out.items()}


def layout(trainer: L.Trainer, module: L.LightningModule) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: category -> chart title -> ["Multiline", [tag regexes]]."""
    fids = [cb for cb in trainer.callbacks if isinstance(cb, FID)]
    charts = {"loss and val loss": ["Multiline", ["train/loss", "val/loss"]]}
    for fid in fids:
        charts[fid_title(fid, module)] = ["Multiline", [re.escape(fid.tag)]]
        if fid.kid_subset_size is not None:
            charts[fid_title(fid, module).replace("fid@", "kid@", 1)] = ["Multiline", [re.escape(fid.kid_tag)]]
    optimisation = {"grad norm": ["Multiline", ["train/grad_norm"]],
                    "EMA decay": ["Multiline", ["train/ema_decay"]],
                    "learning rate": ["Multiline", ["train/lr", "lr-.*"]]}
    return {"1. score model": charts, "2. optimisation": optimisation}


class Dashboard(L.Callback):
    """Writes the custom-scalars layout and the hyper-parameters (with the FID as metric) to every
    TensorBoardLogger when training starts (rank 0). ``lit-score fit`` adds it (``--dashboard.enabled false``
    leaves TensorBoard with Lightning's defaults)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        from torch.utils.tensorboard.summary import hparams

        params = run_hparams(trainer, pl_module)
        metrics = {cb.tag: 0.0 for cb in trainer.callbacks if isinstance(cb, FID)}
        metrics.update({cb.kid_tag: 0.0 for cb in trainer.callbacks
                        if isinstance(cb, FID) and cb.kid_subset_size is not None})
        metrics.update({"val/loss": 0.0, "train/loss": 0.0})
        charts = layout(trainer, pl_module)
        for logger in loggers:
            logger.experiment.add_custom_scalars(charts)
            writer = logger.experiment._get_file_writer()
            for summary in hparams(params, metrics):
                writer.add_summary(summary)
            logger.experiment.flush()
