"""The LightningModule: a noise-conditional network s_theta(x, t), an SDE and a score-matching loss."""
from __future__ import annotations

import warnings
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from lit_score.likelihood import Likelihood
from lit_score.progress import Progress, planned_nfe
from lit_score.losses import ddpm_loss, dsm_loss, smld_loss
from lit_score.sampling.base import SampleResult, Sampler
from lit_score.score import get_score_fn
from lit_score.sdes import SDE, ScoreFn

LossName = Literal["dsm", "smld", "ddpm"]


class ScoreModel(L.LightningModule):
    """Trains ``net`` with denoising score matching under ``sde``.

    Args:
        net: noise-conditional network, ``net(x, noise_label)``; its data shape comes from the DataModule.
        sde: forward SDE (VESDE, VPSDE, subVPSDE or a subclass of ``lit_score.sdes.SDE``).
        loss: ``dsm`` (continuous, Song et al. 2021), ``smld`` (discrete NCSN, needs a VESDE) or
            ``ddpm`` (discrete, needs a VPSDE).
        reduce_mean: average the per-sample loss over dimensions instead of half-summing it.
        likelihood_weighting: weight the continuous loss by g(t)^2.
        eps: smallest time sampled by the continuous loss.
        lr, betas, adam_eps, weight_decay: Adam settings.
        warmup: steps of linear learning-rate warm-up.
        channels_last: keep images and the network in channels-last memory format.
        compile: compile the network with ``torch.compile``.
        sampler: how ``sample`` / ``lit-score predict`` draw images (default: the PC sampler).
        likelihood: how ``lit-score test`` measures bits/dim (``lit_score.likelihood.Likelihood``; default settings).
    """

    def __init__(self, net: nn.Module, sde: SDE, loss: LossName = "dsm", reduce_mean: bool = True,
                 likelihood_weighting: bool = False, eps: float = 1e-5, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup: int = 5000, channels_last: bool = False, compile: bool = False,
                 sampler: Sampler | None = None, likelihood: Likelihood | None = None) -> None:
        super().__init__()
        if loss not in ("dsm", "smld", "ddpm"):
            raise ValueError(f"unknown loss {loss!r}; known: dsm, smld, ddpm")
        with warnings.catch_warnings():  # `lit-score` saves the network's config here, so checkpoints reload alone
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.net, self.sde, self.sampler = net, sde, sampler
        self.likelihood = likelihood or Likelihood()
        self._compiled = False

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs) -> "ScoreModel":
        """The model of a ``lit-score export`` folder (network with its weights, SDE and loss from its config.json);
        ``kwargs``: the other ScoreModel options (sampler, likelihood, ...)."""
        from lit_score.export import load_pretrained

        pretrained = load_pretrained(folder)
        return cls(net=pretrained.net, sde=pretrained.sde, loss=pretrained.loss, **kwargs)

    @property
    def score_fn(self) -> ScoreFn:
        """s_theta(x, t) with the network's current weights."""
        return get_score_fn(self.sde, self.net, discrete=self.hparams.loss != "dsm")

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, as the network declares it."""
        return tuple(self.net.data_shape)

    def sampler_in_use(self, sampler: Sampler | None = None) -> Sampler:
        """``sampler``, else the model's, else the SDE's default (``lit_score.sampling.default_sampler``)."""
        from lit_score.sampling import default_sampler

        return sampler or self.sampler or default_sampler(self.sde)

    @torch.no_grad()
    def sample(self, seeds: Tensor | list[int], sampler: Sampler | None = None,
               progress: Progress | None = None) -> SampleResult:
        """One sample per seed with ``sampler`` (default: the model's), counted into ``progress`` if given."""
        sampler = self.sampler_in_use(sampler)
        score_fn = self.score_fn if progress is None else progress.wrap(self.score_fn, len(seeds))
        result = sampler.sample(score_fn, self.sde, self.data_shape, seeds, self.device)
        if progress is not None:
            progress.batch_done(len(seeds), result.nfe)
        return result

    def sampling_progress(self, desc: str, num_images: int, sampler: Sampler | None = None) -> Progress:
        """A progress bar (rank 0's terminal) over ``num_images`` images drawn by this process with ``sampler``."""
        trainer = self._trainer
        enabled = None if trainer is None else trainer.is_global_zero and trainer.progress_bar_callback is not None
        return Progress(desc, num_images, planned_nfe(self.sampler_in_use(sampler), self.sde), enabled=enabled)

    def on_predict_epoch_start(self) -> None:
        world = self.trainer.world_size
        loaders = self.trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        sizes = [len(getattr(dl, "dataset", ())) for dl in loaders]
        self._predict_progress = self.sampling_progress("predict", sum(-(-n // world) for n in sizes))

    def on_predict_epoch_end(self) -> None:
        progress = getattr(self, "_predict_progress", None)
        if progress is not None:
            progress.close()
            self._predict_progress = None

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict:
        result = self.sample(batch, progress=getattr(self, "_predict_progress", None))
        return {"seeds": batch, "samples": result.samples, "nfe": result.nfe}

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Test-set bits/dim through the probability-flow ODE (Song et al. 2021, appendix D.2), logged as test/bpd."""
        x = self._prepare(batch)
        seeds = torch.arange(x.shape[0]) + batch_idx * x.shape[0] + self.global_rank * 2**31
        centered = bool(getattr(self.trainer.datamodule, "centered", False))
        progress = self._test_progress(x.shape[0])
        bpd, nfe = self.likelihood.bits_per_dim(progress.wrap(self.score_fn, x.shape[0]), self.sde, x, seeds,
                                                centered)
        progress.batch_done(x.shape[0], nfe)
        self.log("test/bpd", bpd.mean(), sync_dist=True, batch_size=x.shape[0])
        self.log("test/nfe", float(nfe), sync_dist=True, reduce_fx="max", batch_size=x.shape[0])
        return bpd.mean()

    def _test_progress(self, batch_size: int) -> Progress:
        """The bits/dim bar of this test run: images of this process, NFE of the probability-flow ODE per image."""
        progress = getattr(self, "_bpd_progress", None)
        if progress is None:
            batches = sum(self.trainer.num_test_batches)
            loaders = self.trainer.test_dataloaders
            dataset = getattr(loaders[0] if isinstance(loaders, (list, tuple)) else loaders, "dataset", None)
            total = batches * batch_size
            if dataset is not None and hasattr(dataset, "__len__"):
                total = min(total, -(-len(dataset) // self.trainer.world_size))
            enabled = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
            progress = self._bpd_progress = Progress("test/bpd", total, enabled=enabled)
        return progress

    def on_test_epoch_end(self) -> None:
        progress = getattr(self, "_bpd_progress", None)
        if progress is not None:
            progress.close()
            self._bpd_progress = None

    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.net.compile()
            self._compiled = True

    def _prepare(self, batch: Tensor) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def compute_loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        hp = self.hparams
        if hp.loss == "smld":
            return smld_loss(self.net, self.sde, x, hp.reduce_mean, generator)
        if hp.loss == "ddpm":
            return ddpm_loss(self.net, self.sde, x, hp.reduce_mean, generator)
        return dsm_loss(self.score_fn, self.sde, x, hp.eps, hp.reduce_mean, hp.likelihood_weighting, generator)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.compute_loss(self._prepare(batch))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        # Fixed noise per batch, so validation losses of different steps are comparable.
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self.compute_loss(self._prepare(batch), generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps,
                                     weight_decay=hp.weight_decay)
        warmup = max(int(hp.warmup), 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, 1.0) if warmup else 1.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}
