"""Exponential moving average of the weights, kept in the model's own EMA network.

The EMA is a network the model owns (``ScoreModel.ema``, beside ``net``, as EDM): Lightning saves it as ``ema.*`` in
the checkpoint's ``state_dict``, and validation, test, predict, sampling, FID and export use it as the model's
``sampling_net``, with no swap. This callback gives the model that network when fit starts and folds ``net`` into it
after every optimizer step; it keeps only the decay rule and its counters.

Lightning 2.6's ``EMAWeightAveraging`` is not used: it keeps the average in the callback, swaps it into the model for
validation, saves it as the checkpoint's ``state_dict`` (the training weights aside) and copies it over the training
weights when fit ends, with a fixed decay (no warm-up, no half-life).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_score.diffusion.ema import halflife_decay, warmup_decay


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0].shape[0]
    raise TypeError(f"EMA with halflife_kimg needs batches that are tensors or tuples of tensors, got {type(batch)}")


class EMA(L.Callback):
    """After every optimizer step, ``ema <- decay ema + (1 - decay) net`` over the model's EMA network: parameters
    and floating-point buffers (other buffers are copied). The model (a ``ScoreModel``, or any module with ``net``,
    ``ema`` and ``add_ema()``) gets its EMA network, a copy of ``net``, when fit starts.

    Args:
        rate: the decay (score_sde's ``ema_rate``; 0.9999 for the paper's CIFAR-10 runs).
        warmup: use the official warm-up ``min(rate, (1 + n) / (10 + n))`` at update n.
        halflife_kimg: instead of ``rate``, EDM's half-life in thousands of images (global batch per update).
        rampup_ratio: with ``halflife_kimg``, cap the half-life at this fraction of the images seen (EDM: 0.05).
        buffers: average buffers too; false averages parameters only (as the official implementation) and copies
            the buffers.
    """

    def __init__(self, rate: float = 0.9999, warmup: bool = True, halflife_kimg: float | None = None,
                 rampup_ratio: float | None = 0.05, buffers: bool = True) -> None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate (of the EMA) must be in (0, 1), got {rate}")
        if halflife_kimg is not None and not halflife_kimg > 0:
            raise ValueError(f"halflife_kimg (of the EMA) must be > 0 or null, got {halflife_kimg}")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"rampup_ratio (of the EMA) must be > 0 or null, got {rampup_ratio}")
        self.rate, self.warmup, self.halflife_kimg = rate, warmup, halflife_kimg
        self.rampup_ratio, self.buffers = rampup_ratio, buffers
        self.num_updates = 0
        self.num_images = 0
        self._last_step = -1

    # -- the average ----------------------------------------------------------------------------------------
    def decay(self, batch_images: int = 0) -> float:
        """Decay of the next update."""
        n = self.num_updates + 1
        if self.halflife_kimg is not None:
            return halflife_decay(batch_images, self.halflife_kimg, self.num_images, self.rampup_ratio)
        return warmup_decay(self.rate, n) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule, batch_images: int = 0) -> float:
        """Fold ``pl_module.net``'s current weights into ``pl_module.ema``; returns the decay used."""
        ema = getattr(pl_module, "ema", None)
        if ema is None:
            raise RuntimeError("the model has no EMA network: EMA.setup gives it one when fit starts (add_ema())")
        decay = self.decay(batch_images)
        net_state, ema_state = pl_module.net.state_dict(), ema.state_dict()
        if net_state.keys() != ema_state.keys():
            different = sorted(net_state.keys() ^ ema_state.keys())
            raise KeyError(f"the EMA network does not match the network: {different[:5]}")
        params = {name for name, _ in pl_module.net.named_parameters()}
        averaged = [k for k, e in ema_state.items() if e.is_floating_point() and (self.buffers or k in params)]
        if averaged:  # one multi-tensor kernel rather than one per tensor
            torch._foreach_lerp_([ema_state[k] for k in averaged],
                                 [net_state[k].to(ema_state[k].dtype) for k in averaged], 1.0 - decay)
        for k in net_state.keys() - set(averaged):
            ema_state[k].copy_(net_state[k])
        self.num_updates += 1
        self.num_images += batch_images
        return decay

    # -- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the model its EMA network before a checkpoint is restored into it and before the optimizers."""
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "add_ema", None)):
            raise TypeError(f"the EMA callback needs a model with an EMA network (add_ema(), ema, net), such as "
                            f"ScoreModel; got {type(pl_module).__name__}")
        pl_module.add_ema()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # no optimizer step yet (gradient accumulation)
        self._last_step = trainer.global_step
        images = 0
        if self.halflife_kimg is not None:
            images = _batch_len(batch) * trainer.world_size * trainer.accumulate_grad_batches
        decay = self.update(pl_module, images)
        pl_module.log("train/ema_decay", decay, on_step=True, on_epoch=False, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "num_images": self.num_images, "rate": self.rate,
                "warmup": self.warmup, "halflife_kimg": self.halflife_kimg}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.num_images = int(state_dict.get("num_images", 0))
