"""The LightningModule: a noise-conditional network s_theta(x, t), an SDE and a score-matching loss."""
from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import Tensor, nn

from lit_score.likelihood import Likelihood
from lit_score.losses import DSMLoss, Loss
from lit_score.sampling.base import SampleResult, Sampler
from lit_score.sdes import SDE, ScoreFn


class ScoreModel(L.LightningModule):
    """Trains ``net`` with a denoising score-matching ``loss`` under ``sde``.

    Args:
        net: noise-conditional network, ``net(x, noise_label)``; its data shape comes from the DataModule.
        sde: forward SDE (VESDE, VPSDE, subVPSDE or a subclass of ``lit_score.sdes.SDE``).
        loss: the objective and the parametrisation it trains (``lit_score.losses``): ``DSMLoss`` (continuous,
            Song et al. 2021; the default), ``SMLDLoss`` (discrete NCSN, needs a VESDE), ``DDPMLoss`` (discrete,
            needs a VPSDE) or ``EDMLoss`` (Karras et al. 2022, preconditioned).
        lr, betas, adam_eps, weight_decay: Adam settings.
        warmup: steps of linear learning-rate warm-up.
        channels_last: keep images and the network in channels-last memory format.
        compile: compile the network with ``torch.compile``.
        sampler: how ``sample`` / ``lit-score predict`` draw images (default: the PC sampler).
        likelihood: how ``lit-score test`` measures bits/dim (``lit_score.likelihood.Likelihood``; default settings).
    """

    def __init__(self, net: nn.Module, sde: SDE, loss: Loss | None = None, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup: int = 5000, channels_last: bool = False, compile: bool = False,
                 sampler: Sampler | None = None, likelihood: Likelihood | None = None) -> None:
        super().__init__()
        if isinstance(loss, str):
            raise TypeError(f"loss is an object now, not a name: instead of {loss!r} give e.g. "
                            "lit_score.losses.DSMLoss() (in a YAML: loss: {class_path: lit_score.losses.DSMLoss})")
        loss = DSMLoss() if loss is None else loss
        loss.check(net, sde)
        with warnings.catch_warnings():  # `lit-score` saves the network's config here, so checkpoints reload alone
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.net, self.sde, self.sampler, self.loss = net, sde, sampler, loss
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
        return self.loss.score_fn(self.net, self.sde)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, as the network declares it."""
        return tuple(self.net.data_shape)

    @torch.no_grad()
    def sample(self, seeds: Tensor | list[int], sampler: Sampler | None = None) -> SampleResult:
        """One sample per seed with ``sampler`` (default: the model's)."""
        from lit_score.sampling import default_sampler

        sampler = sampler or self.sampler or default_sampler(self.sde)
        return sampler.sample(self.score_fn, self.sde, self.data_shape, seeds, self.device)

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict:
        result = self.sample(batch)
        return {"seeds": batch, "samples": result.samples, "nfe": result.nfe}

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Test-set bits/dim through the probability-flow ODE (Song et al. 2021, appendix D.2), logged as test/bpd."""
        x = self._prepare(batch)
        seeds = torch.arange(x.shape[0]) + batch_idx * x.shape[0] + self.global_rank * 2**31
        centered = bool(getattr(self.trainer.datamodule, "centered", False))
        bpd, nfe = self.likelihood.bits_per_dim(self.score_fn, self.sde, x, seeds, centered)
        self.log("test/bpd", bpd.mean(), sync_dist=True, batch_size=x.shape[0])
        self.log("test/nfe", float(nfe), sync_dist=True, reduce_fx="max", batch_size=x.shape[0])
        return bpd.mean()

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
        return self.loss(self.net, self.sde, x, generator)

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
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
