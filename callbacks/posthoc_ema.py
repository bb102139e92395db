"""Post-hoc EMA during training (Karras et al. 2024, section 3): power-function EMA profiles of the weights, updated
once per optimizer step and snapshotted into the run directory; ``lit-score posthoc-ema`` reconstructs any EMA
length from the snapshots (see ``lit_score.diffusion.ema``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
from torch import Tensor

from lit_score.diffusion.ema import CHECKPOINT_KEY, SNAPSHOT_DIR, PowerEMA, save_snapshot
from lit_score.runtime.upgrade import EMA


class PostHocEMA(L.Callback):
    """Tracks the power-function EMAs of ``sigma_rels`` over every floating-point tensor of the module's trained
    state (its EMA network left out) and writes each profile to ``<run dir>/posthoc_ema/phema-<step>-<sigma_rel>.pt``
    every ``every_n_steps`` optimizer steps and at the end of training.

    The profiles are updated after every optimizer step (once per accumulated batch), from weights that DDP keeps
    identical on every rank, so every rank holds the same averages; rank 0 writes the snapshots. The averages and the
    update count are in the Lightning checkpoint, so a resumed run continues them exactly.

    Args:
        sigma_rels: the tracked widths (EDM2: 0.05 and 0.10).
        every_n_steps: optimizer steps between snapshots (EDM2 snapshots every 8 Mimg).
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), every_n_steps: int = 10000) -> None:
        if every_n_steps < 1:
            raise ValueError(f"PostHocEMA every_n_steps must be >= 1, got {every_n_steps}")
        self.ema = PowerEMA(sigma_rels)
        self.every_n_steps = int(every_n_steps)
        self._last_step = -1
        self._last_snapshot = -1

    @property
    def sigma_rels(self) -> list[float]:
        return self.ema.sigma_rels

    def directory(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / SNAPSHOT_DIR

    def _state(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The trained weights: the module's state without its EMA network's (``ema.*``)."""
        return {k: v for k, v in pl_module.state_dict().items() if not k.startswith(EMA)}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema.shadows is not None:
            device = next(iter(self._state(pl_module).values())).device
            self.ema.shadows = [{k: v.to(device) for k, v in s.items()} for s in self.ema.shadows]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        self.ema.update(self._state(pl_module))
        if self.ema.num_updates % self.every_n_steps == 0:
            self.snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema.shadows is not None and self._last_snapshot != self.ema.num_updates:
            self.snapshot(trainer)

    def snapshot(self, trainer: L.Trainer) -> None:
        """Write every profile's current average (rank 0); called on every rank."""
        self._last_snapshot = self.ema.num_updates
        directory = self.directory(trainer)  # on every rank: trainer.log_dir broadcasts under DDP
        if trainer.is_global_zero and self.ema.shadows is not None:
            for sigma_rel, shadow in zip(self.ema.sigma_rels, self.ema.shadows):
                save_snapshot(directory, self.ema.num_updates, sigma_rel, shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.ema.num_updates, "sigma_rels": list(self.ema.sigma_rels),
                "every_n_steps": self.every_n_steps, "last_snapshot": self._last_snapshot}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(s) for s in state_dict["sigma_rels"]] != self.ema.sigma_rels:
            raise ValueError(f"the checkpoint's post-hoc EMA tracks sigma_rel {state_dict['sigma_rels']}, this run "
                             f"{self.ema.sigma_rels}: resume with the same PostHocEMA sigma_rels")
        self.ema.num_updates = int(state_dict["num_updates"])
        self._last_snapshot = int(state_dict.get("last_snapshot", -1))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.ema.shadows is not None:
            checkpoint[CHECKPOINT_KEY] = [{k: v.detach().cpu().clone() for k, v in s.items()}
                                          for s in self.ema.shadows]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.ema.shadows = [{k: v.clone() for k, v in s.items()} for s in checkpoint[CHECKPOINT_KEY]]


__all__ = ["PostHocEMA"]
