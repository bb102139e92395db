"""Periodic FID of EMA samples against cached training-set statistics, logged as ``val/fid@<n>`` (and optionally
KID as ``val/kid@<n>``).

Every rank draws its share of the per-image seeds, chunk by chunk, and every rank adds the gathered features of
each chunk in seed order (``ordered_statistics``), so the value is the same to the bit for any number of processes. Every rank runs every step of it; nothing is rank-zero-only except
the writing.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lit_score.callbacks.preemption import stop_check, tensorboard_purge_step
from lit_score.callbacks.sampling import (batched, continues_run, draw, due, fast_dev_run,
                                         redone_after_resume_if_stopped)
from lit_score.metrics.features import FeatureExtractor
from lit_score.metrics.frechet import frechet_distance, metric_tag, ordered_statistics
from lit_score.metrics.kid import kernel_inception_distance
from lit_score.metrics.reference import ReferenceStatistics, reference_statistics
from lit_score.sampling.base import Sampler


class FID(L.Callback):
    """Every ``every_n_steps`` optimizer steps, FID of ``num_samples`` EMA samples (seeds ``first_seed``, ...).

    Args:
        features: the feature network (``lit_score.metrics.InceptionV3`` for comparable numbers,
            ``lit_score.metrics.RandomConvFeatures`` for cheap relative ones).
        sampler: a ``lit_score.sampling`` sampler; default: the model's own.
        batch_size: images sampled and embedded at once per rank.
        cache_dir: where reference statistics are cached (default ``$LIT_SCORE_CACHE/fid`` or
            ``~/.cache/lit-score/fid``).
        at_start: also evaluate when fit starts.
        kid_subset_size: also log KID (torch-fidelity's definition, ``kid_subsets`` subsets of this size, seed
            2020) between the first ``kid_features`` samples (seed order) and the first ``kid_features`` training
            images; default: no KID.

    The last value is kept in checkpoints: a run resumed (in its folder) at the step of an evaluation does not
    repeat it, and logs it again where TensorBoard hides what the stopped run logged from that step on.
    """

    def __init__(self, features: FeatureExtractor, num_samples: int = 50000, every_n_steps: int = 50000,
                 sampler: Sampler | None = None, batch_size: int = 250, first_seed: int = 0,
                 cache_dir: str | None = None, at_start: bool = False, kid_subset_size: int | None = None,
                 kid_subsets: int = 100, kid_features: int = 10000) -> None:
        if not isinstance(features, FeatureExtractor):
            raise TypeError(f"FID features must be a lit_score.metrics.FeatureExtractor, got {type(features)}")
        if num_samples < 2 or every_n_steps < 1 or batch_size < 1:
            raise ValueError("FID needs num_samples >= 2, every_n_steps >= 1 and batch_size >= 1, got "
                             f"{num_samples}, {every_n_steps}, {batch_size}")
        self.features, self.num_samples, self.every_n_steps = features.eval(), num_samples, every_n_steps
        self.sampler, self.batch_size, self.first_seed = sampler, batch_size, first_seed
        if kid_subset_size is not None and not (2 <= kid_subset_size <= min(num_samples, kid_features)
                                                and kid_subsets >= 1):
            raise ValueError(f"FID's KID needs 2 <= kid_subset_size <= num_samples and kid_features, and "
                             f"kid_subsets >= 1; got {kid_subset_size}, {num_samples}, {kid_features}, {kid_subsets}")
        self.cache_dir, self.at_start = cache_dir, at_start
        self.kid_subset_size, self.kid_subsets, self.kid_features = kid_subset_size, kid_subsets, kid_features
        self.last_kid: tuple[float, float] | None = None
        self.reference: ReferenceStatistics | None = None
        self.last_value: float | None = None
        self._last_step = -1

    @property
    def tag(self) -> str:
        return metric_tag("fid", self.num_samples)

    @property
    def kid_tag(self) -> str:
        return metric_tag("kid", self.num_samples)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not fast_dev_run(trainer):
            self.features.prepare()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if fast_dev_run(trainer):
            return
        self.features.to(pl_module.device)
        keep = self.kid_features if self.kid_subset_size is not None else 0
        self.reference = reference_statistics(trainer.datamodule, self.features, self.cache_dir, self.batch_size,
                                              pl_module.device, keep, pl_module.data_space, stop_check(trainer))
        if trainer.is_global_zero:
            note = (f"{self.num_samples} samples, seeds {self.first_seed}..{self.first_seed + self.num_samples - 1}, "
                    f"EMA weights, against {self.reference.count} training images; key {self.reference.key}")
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(self.tag, note, trainer.global_step)

    @property
    def state_key(self) -> str:
        return f"FID{{'tag': {self.tag!r}}}"

    def state_dict(self) -> dict[str, Any]:
        kid = list(self.last_kid) if self.last_kid is not None else None
        return {"step": self._last_step, "value": self.last_value, "kid": kid}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step, self.last_value = int(state_dict["step"]), state_dict["value"]
        self.last_kid = tuple(state_dict["kid"]) if state_dict.get("kid") is not None else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the HParams tab, with this FID as metric, is lit_score.callbacks.dashboard.Dashboard's
        if fast_dev_run(trainer):
            return
        step = trainer.global_step
        if not continues_run(trainer):
            if self.at_start:
                self._evaluate_unless_stopped(trainer, pl_module)
        elif self._last_step == step and self.last_value is not None:  # evaluated before the checkpoint
            self._publish(trainer, self._metrics(), step, again=True)
        elif due(step, self.every_n_steps, -1):
            self._evaluate_unless_stopped(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if due(trainer.global_step, self.every_n_steps, self._last_step) and not fast_dev_run(trainer):
            self._evaluate_unless_stopped(trainer, pl_module)

    def _evaluate_unless_stopped(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with redone_after_resume_if_stopped(self):
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """FID now (every rank must call this); logged by rank 0 and returned on every rank."""
        if self.reference is None:
            raise RuntimeError("FID.evaluate needs the reference statistics of on_fit_start")
        step = self._last_step = trainer.global_step
        seeds = list(range(self.first_seed, self.first_seed + self.num_samples))
        chunks = list(batched(seeds, self.batch_size))
        kept: list[Tensor] = []
        world, rank = trainer.world_size, trainer.global_rank
        mine = sum(len(c) for c in chunks[rank::world])  # chunk k is drawn by rank k % world
        progress = pl_module.sampling_progress(f"{self.tag} at step {step}", mine, self.sampler)
        progress.interrupt = stop_check(trainer)  # a stop request ends the sampling after the step in progress

        def features_of(k: int) -> Tensor:
            progress.check()
            return self.features(pl_module.data_space.to_uint8(
                draw(pl_module, chunks[k], self.sampler, self.batch_size, progress)))

        def keep(k: int, f: Tensor) -> None:
            if self.kid_subset_size is not None and k * self.batch_size < self.kid_features:
                kept.append(f[:self.kid_features - k * self.batch_size])

        with progress:  # the samples are of the model's weights to sample with (its EMA)
            stats = ordered_statistics(len(chunks), features_of, self.features.num_features, pl_module.device, keep)
        mean, cov, _ = stats.compute()
        value = frechet_distance(mean, cov, self.reference.mean, self.reference.cov)
        self.last_value = value
        if self.kid_subset_size is not None:
            self.last_kid = kernel_inception_distance(torch.cat(kept), self.reference.features,
                                                      self.kid_subsets, self.kid_subset_size)
        self._publish(trainer, self._metrics(), step)
        return value

    def _metrics(self) -> dict[str, float]:
        metrics = {self.tag: self.last_value}
        if self.kid_subset_size is not None and self.last_kid is not None:
            metrics[self.kid_tag] = self.last_kid[0]
        return metrics

    @staticmethod
    def _publish(trainer: L.Trainer, metrics: dict[str, float], step: int, again: bool = False) -> None:
        """Put ``metrics`` in the callback metrics and log them at ``step`` (rank 0); ``again``: only to the
        TensorBoard loggers that hide the stopped run's events from ``step`` on."""
        for tag, v in metrics.items():
            trainer.callback_metrics[tag] = torch.tensor(v)
        if not trainer.is_global_zero or (again and tensorboard_purge_step(trainer) != step):
            return
        for logger in trainer.loggers:
            if not again or isinstance(logger, TensorBoardLogger):
                logger.log_metrics(metrics, step=step)
