"""Exponential moving average of the weights, swapped in for validation, test, predict and sampling.

Lightning 2.6's ``EMAWeightAveraging`` keeps a fixed decay (no warm-up, no half-life), swaps only for validation,
overwrites the training weights when fit ends and is not exception-safe, so this is a plain ``Callback``.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

CHECKPOINT_KEY = "ema_state_dict"
WEIGHTS_NOTE = {"state_dict": "training weights (resume from these)",
                CHECKPOINT_KEY: "EMA weights (validation, sampling and export use these)"}


def warmup_decay(rate: float, num_updates: int) -> float:
    """Official score_sde decay of update n (1-based): min(rate, (1 + n) / (10 + n))."""
    return min(rate, (1 + num_updates) / (10 + num_updates))


def halflife_decay(batch_images: int, halflife_kimg: float, seen_images: int, rampup_ratio: float | None) -> float:
    """EDM decay: 0.5 ** (batch / half-life), the half-life in images capped at rampup_ratio * images seen so far."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, seen_images * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0].shape[0]
    raise TypeError(f"EMA with halflife_kimg needs batches that are tensors or tuples of tensors, got {type(batch)}")


class EMA(L.Callback):
    """Shadow weights s <- decay s + (1 - decay) w after every optimizer step, over parameters and float buffers
    (other buffers are copied).

    Args:
        rate: the decay (score_sde's ``ema_rate``; 0.9999 for the paper's CIFAR-10 runs).
        warmup: use the official warm-up ``min(rate, (1 + n) / (10 + n))`` at update n.
        halflife_kimg: instead of ``rate``, EDM's half-life in thousands of images (global batch per update).
        rampup_ratio: with ``halflife_kimg``, cap the half-life at this fraction of the images seen (EDM: 0.05).
        buffers: average buffers too (the official implementation averages parameters only).
    """

    def __init__(self, rate: float = 0.9999, warmup: bool = True, halflife_kimg: float | None = None,
                 rampup_ratio: float | None = 0.05, buffers: bool = True) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
        if halflife_kimg is not None and halflife_kimg <= 0:
            raise ValueError(f"EMA halflife_kimg must be positive, got {halflife_kimg}")
        if rampup_ratio is not None and rampup_ratio <= 0:
            raise ValueError(f"EMA rampup_ratio must be positive or null, got {rampup_ratio}")
        self.rate, self.warmup, self.halflife_kimg = rate, warmup, halflife_kimg
        self.rampup_ratio, self.buffers = rampup_ratio, buffers
        self.num_updates = 0
        self.num_images = 0
        self.shadow: dict[str, Tensor] | None = None
        self.swapped = False
        self._last_step = -1

    # -- the average ----------------------------------------------------------------------------------------
    def _targets(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        state = pl_module.state_dict()
        if not self.buffers:
            names = {name for name, _ in pl_module.named_parameters()}
            state = {k: v for k, v in state.items() if k in names}
        return state

    def decay(self, batch_images: int = 0) -> float:
        """Decay of the next update."""
        n = self.num_updates + 1
        if self.halflife_kimg is not None:
            return halflife_decay(batch_images, self.halflife_kimg, self.num_images, self.rampup_ratio)
        return warmup_decay(self.rate, n) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule, batch_images: int = 0) -> float:
        """Fold the module's current weights into the average; returns the decay used."""
        if self.swapped:
            raise RuntimeError("EMA.update called while the EMA weights are swapped into the model")
        decay = self.decay(batch_images)
        targets = self._targets(pl_module)
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in targets.items()}
        pairs = [(self.shadow[name], value) for name, value in targets.items()]
        floats = [(s, v.to(s.dtype)) for s, v in pairs if s.is_floating_point()]
        if floats:  # one multi-tensor kernel rather than one per tensor
            torch._foreach_lerp_([s for s, _ in floats], [v for _, v in floats], 1.0 - decay)
        for s, v in pairs:
            if not s.is_floating_point():
                s.copy_(v)
        self.num_updates += 1
        self.num_images += batch_images
        return decay

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        assert self.shadow is not None
        for name, value in self._targets(pl_module).items():
            s = self.shadow[name]
            tmp = value.clone()
            value.copy_(s)
            s.copy_(tmp)
        self.swapped = not self.swapped

    def _to_device(self, pl_module: L.LightningModule) -> None:
        if self.shadow is not None:
            targets = self._targets(pl_module)
            missing = set(targets) - set(self.shadow)
            if missing:
                raise KeyError(f"EMA weights lack {sorted(missing)[:5]}; they were made for another model")
            self.shadow = {k: v.to(targets[k].device) for k, v in self.shadow.items() if k in targets}

    def apply(self, pl_module: L.LightningModule) -> None:
        """Put the EMA weights into the model (the training weights are kept in their place)."""
        if self.shadow is None:
            rank_zero_warn("EMA has no averaged weights yet (nothing trained and no checkpoint loaded); "
                           "using the model's own weights")
            return
        if not self.swapped:
            self._to_device(pl_module)
            self._swap(pl_module)

    def restore(self, pl_module: L.LightningModule) -> None:
        """Put the training weights back."""
        if self.swapped:
            self._swap(pl_module)

    @contextlib.contextmanager
    def averaged(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The EMA weights inside the block, the previous weights after it, also on exceptions."""
        was_swapped = self.swapped
        self.apply(pl_module)
        try:
            yield
        finally:
            if not was_swapped:
                self.restore(pl_module)

    def ema_state_dict(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The EMA weights, keyed like ``pl_module.state_dict()``, on the CPU."""
        if self.shadow is None:
            raise RuntimeError("EMA has no averaged weights yet")
        source = self._targets(pl_module) if self.swapped else self.shadow
        return {k: v.detach().cpu().clone() for k, v in source.items()}

    # -- Lightning hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in self._targets(pl_module).items()}
        self._to_device(pl_module)

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

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "num_images": self.num_images, "rate": self.rate,
                "warmup": self.warmup, "halflife_kimg": self.halflife_kimg}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.num_images = int(state_dict.get("num_images", 0))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.shadow is None:
            return
        checkpoint[CHECKPOINT_KEY] = self.ema_state_dict(pl_module)
        if self.swapped:  # saved mid-validation: the module holds the EMA weights, the shadow the training ones
            checkpoint["state_dict"].update({k: v.detach().cpu().clone() for k, v in self.shadow.items()})
        checkpoint["weights"] = dict(WEIGHTS_NOTE)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.shadow = {k: v.clone() for k, v in checkpoint[CHECKPOINT_KEY].items()}
            self.swapped = False
        else:
            rank_zero_warn("the checkpoint holds no EMA weights; the average starts from its training weights")


def ema_callback(trainer: L.Trainer) -> EMA | None:
    """The trainer's EMA callback, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


@contextlib.contextmanager
def ema_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """The EMA weights inside the block when the trainer has an EMA callback; the model's own otherwise."""
    ema = ema_callback(trainer)
    with ema.averaged(pl_module) if ema is not None else contextlib.nullcontext():
        yield


def load_ema_state_dict(checkpoint_path: str, prefix: str = "") -> dict[str, Tensor]:
    """The EMA weights of a checkpoint, only those under ``prefix`` (e.g. ``"net."``), with the prefix removed."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if CHECKPOINT_KEY not in checkpoint:
        raise KeyError(f"{checkpoint_path} has no {CHECKPOINT_KEY!r}: it was not trained with the EMA callback")
    state = {k[len(prefix):]: v for k, v in checkpoint[CHECKPOINT_KEY].items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"{checkpoint_path} has no EMA weights under the prefix {prefix!r}")
    return state


def export_ema(checkpoint_path: str, output_path: str, prefix: str = "net.") -> None:
    """Write a checkpoint's EMA weights (the network's, ``prefix`` stripped) to a safetensors file."""
    from safetensors.torch import save_file

    state = load_ema_state_dict(checkpoint_path, prefix)
    save_file({k: v.contiguous() for k, v in state.items()}, output_path, metadata={"source": str(checkpoint_path)})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m lit_score.callbacks.ema CHECKPOINT.ckpt OUTPUT.safetensors")
    export_ema(sys.argv[1], sys.argv[2])
