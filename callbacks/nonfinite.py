"""Optimizer steps that survive a non-finite loss or gradient: skipped, or with the non-finite gradient entries
replaced as EDM does (Karras et al. 2022; NVlabs/edm training_loop.py applies nan_to_num before every step).

The check runs in ``on_before_optimizer_step``: after the backward passes of the step (under AMP's GradScaler, after
it unscaled the gradients) and before gradient clipping and ``optimizer.step()``. The loss comes from
``on_before_backward``, since ``training_step``'s output reaches callbacks only after the step: a loss such as
``loss + nan`` is non-finite while its gradients are finite, so both are checked.
"""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from lit_score.errors import NonFiniteError

MODES = ("skip", "replace")
# EDM's replacements: NaN -> 0, +inf -> 1e5, -inf -> -1e5.
NAN, POSINF, NEGINF = 0.0, 1e5, -1e5


class NonFinite(L.Callback):
    """Before every optimizer step, checks the step's loss (every backward pass since the last step) and the norm of
    its gradients on every rank; when one is not finite on any rank, every rank treats the step alike:

    * ``mode="skip"``: every gradient is dropped (``.grad = None``), so the optimizer steps no parameter: the weights
      and Adam's moments and step count stay as they were. Lightning still counts the step (``global_step``, the
      learning-rate schedule, callbacks that act after each step such as EMA).
    * ``mode="replace"``: EDM's filter: non-finite gradient entries become NaN -> 0, +inf -> 1e5, -inf -> -1e5 and the
      step is taken (gradient clipping, if set, comes after).

    ``train/nonfinite_steps`` logs how many steps met a non-finite value so far; after ``max_consecutive`` of them in a
    row the run stops with a :class:`lit_score.errors.NonFiniteError` naming the steps. The counts are in the
    checkpoint, so a resumed run continues them.

    Under ``16-mixed`` (AMP's GradScaler) the scaler has already looked at the gradients: it skips every step with
    non-finite gradients and lowers its scale, the normal way of finding its scale. Those steps are the scaler's and
    are not counted; a non-finite loss is, and that step is skipped by the scaler in either mode.

    Args:
        mode: ``"skip"`` or ``"replace"`` (EDM's), as above.
        max_consecutive: consecutive non-finite steps that stop the run; ``None`` never stops.
    """

    def __init__(self, mode: Literal["skip", "replace"] = "skip", max_consecutive: int | None = 10) -> None:
        if mode not in MODES:
            raise ValueError(f"NonFinite mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_consecutive is not None and max_consecutive < 1:
            raise ValueError(f"NonFinite max_consecutive must be >= 1 or null, got {max_consecutive}")
        self.mode, self.max_consecutive = mode, max_consecutive
        self.total = 0
        self.consecutive = 0
        self.first_step = -1  # trainer.global_step of the first step of the current run of non-finite steps
        self.found = ""  # what was non-finite at the last such step
        self._loss_bad: Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_bad = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        device = trainer.strategy.root_device
        no = torch.zeros((), dtype=torch.bool, device=device)
        loss_bad = no if self._loss_bad is None else self._loss_bad.to(device)
        self._loss_bad = None
        grad_bad = no
        if params and not scaled:
            grad_bad = ~torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])).to(device)
        flags = trainer.strategy.reduce(torch.stack([loss_bad, grad_bad]).float(), reduce_op="sum")
        loss_bad, grad_bad = (flags > 0).tolist()  # the same on every rank: one rank's NaN moves all
        if loss_bad or grad_bad:
            self._count(trainer.global_step, " and ".join(
                what for what, bad in (("loss", loss_bad), ("gradient norm", grad_bad)) if bad))
            if self.mode == "skip":
                for p in params:
                    p.grad = None
            elif grad_bad:
                for p in params:
                    torch.nan_to_num(p.grad, nan=NAN, posinf=POSINF, neginf=NEGINF, out=p.grad)
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False)
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(self.message(trainer.global_step))

    def _count(self, step: int, found: str) -> None:
        if self.consecutive == 0:
            self.first_step = step
        self.consecutive += 1
        self.total += 1
        self.found = found

    def message(self, step: int) -> str:
        """The one-line reason the run stops at ``step`` (trainer.global_step)."""
        where = (f"at trainer.global_step {step}" if self.consecutive == 1 else
                 f"at {self.consecutive} consecutive optimizer steps (trainer.global_step {self.first_step} to {step})")
        return (f"training met a non-finite {self.found} {where}, {self.total} such step(s) in all; lower the learning "
                "rate (model.lr) or lengthen its warm-up (model.warmup), clip gradients (trainer.gradient_clip_val), "
                "train in bf16-mixed or 32-true precision rather than 16-mixed, check the data for NaN or inf, or "
                "resume from an earlier checkpoint (NonFinite max_consecutive sets how many such steps in a row stop "
                "a run)")

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive, "first_step": self.first_step,
                "found": self.found}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict["total"])
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.first_step = int(state_dict.get("first_step", -1))
        self.found = str(state_dict.get("found", ""))
