"""The LightningModule: a noise-conditional network, its preconditioning (the denoiser), an SDE and a loss."""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
import torch
from torch import Tensor, nn

from lit_score.data_space import DataSpace
from lit_score.errors import CheckpointError, ConfigurationError
from lit_score.diffusion.augment import AugmentPipe
from lit_score.diffusion.denoiser import Counted, Denoiser, NetworkDenoiser, Preconditioning
from lit_score.diffusion.guidance import (AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance, Conditioned, Guidance,
                                         with_labels)
from lit_score.diffusion.likelihood import Likelihood
from lit_score.diffusion.losses import DSMLoss, Loss, classifier_logits
from lit_score.progress import Progress, planned_nfe
from lit_score.sampling.base import SampleResult, Sampler
from lit_score.diffusion.sdes import SDE, ScoreFn
from lit_score.networks.cond import Cond
from lit_score.runtime.bpd import BitsPerDimRun
from lit_score.runtime.upgrade import EMA, NET, upgrade_checkpoint


OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


class ScoreModel(L.LightningModule):
    """Trains the denoiser D(x_hat; sigma, cond) of ``net`` under ``precond`` with ``loss``; ``sde`` gives its
    sigma view and the samplers' time variable, prior and discretisation.

    Args:
        net: noise-conditional network F, ``net(x, c_noise)``; its data shape comes from the DataModule.
        sde: forward SDE (VESDE, VPSDE, subVPSDE or a subclass of ``lit_score.diffusion.sdes.SDE``).
        loss: the objective (``lit_score.diffusion.losses``): ``DSMLoss`` (continuous, Song et al. 2021; the
            default), ``SMLDLoss`` (discrete NCSN, needs a VESDE), ``DDPMLoss`` (discrete, needs a VPSDE) or
            ``EDMLoss`` (Karras et al. 2022).
        precond: how F's output becomes the denoiser (``lit_score.diffusion.denoiser``); default: the loss's
            (score_sde's for DSMLoss, the discrete levels for SMLDLoss / DDPMLoss, ``EDMPrecond`` for EDMLoss).
        lr, betas, adam_eps, weight_decay: the optimizer's settings.
        optimizer: ``adam`` (torch.optim.Adam, the papers') or ``radam`` (torch.optim.RAdam, ECT's).
        warmup: steps of linear learning-rate warm-up.
        channels_last: keep images and the network in channels-last memory format.
        compile: compile the network with ``torch.compile``.
        sampler: how ``sample`` / ``lit-score predict`` draw images (default: the PC sampler).
        likelihood: how ``lit-score test`` measures bits/dim (``lit_score.diffusion.likelihood.Likelihood``; default settings).
        data_space: shape, range and quantisation of the data (``lit_score.data_space.DataSpace`` or its dict); the
            CLI passes the DataModule's. Saved in the hyperparameters, so checkpoints carry it; without it, it is
            inferred from the network (its ``data_shape`` and ``centered``; 8-bit levels for images).
        augment: EDM's non-leaky augmentation of training batches (``lit_score.diffusion.augment.AugmentPipe``);
            its labels condition the network, which needs ``augment_dim`` equal to the pipeline's ``dim``.
        guidance: how a class-conditional model is guided when sampling (``lit_score.diffusion.guidance``:
            ``ClassifierFreeGuidance``, ``AutoGuidance``, ``ClassifierGuidance``); None: the conditional model as is.

    A network with ``num_classes`` > 0 is class-conditional: it trains on the data's labels (the data space must
    have as many classes) and samples image i with the label its seed draws (``DataSpace.labels_for``) unless given.
    """

    def __init__(self, net: nn.Module, sde: SDE, loss: Loss | None = None, precond: Preconditioning | None = None,
                 lr: float = 2e-4,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup: int = 5000, channels_last: bool = False, compile: bool = False,
                 sampler: Sampler | None = None, likelihood: Likelihood | None = None,
                 data_space: DataSpace | dict | None = None, augment: AugmentPipe | None = None,
                 optimizer: str = "adam", guidance: Guidance | None = None) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}")
        if not adam_eps >= 0:
            raise ValueError(f"adam_eps must be >= 0, got {adam_eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 (steps), got {warmup}")
        if isinstance(loss, str):
            raise TypeError(f"loss is an object now, not a name: instead of {loss!r} give e.g. DSMLoss() (in a "
                            "YAML: loss: {class_path: lit_score.diffusion.losses.DSMLoss})")
        loss = DSMLoss() if loss is None else loss
        precond = loss.default_precond(sde) if precond is None else precond
        loss.check(sde, precond)
        if augment is not None and augment.dim != getattr(net, "augment_dim", 0):
            raise ValueError(f"the augmentation pipeline draws {augment.dim} labels but the network takes "
                             f"{getattr(net, 'augment_dim', 0)}: set model.net.init_args.augment_dim to {augment.dim}")
        with warnings.catch_warnings():  # `lit-score` saves the network's config here, so checkpoints reload alone
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=["data_space"])
        self.net, self.sde, self.sampler, self.loss, self.precond = net, sde, sampler, loss, precond
        self.augment, self.guidance = augment, guidance
        self._guides: dict[str, Any] = {}
        self.ema: nn.Module | None = None  # the EMA network, beside net (EDM); see sampling_net
        self.likelihood = likelihood or Likelihood()
        self._data_space = _classes_checked(data_space_from(data_space, net), net, loss, guidance)
        self.hparams["data_space"] = self._data_space and self._data_space.to_dict()  # plain: weights_only loads
        self._compiled = False
        self._test_bpd = BitsPerDimRun()

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs) -> "ScoreModel":
        """The model of a ``lit-score export`` folder (network with its weights, SDE, loss and preconditioning from
        its config.json); ``kwargs``: the other ScoreModel options (sampler, likelihood, ...)."""
        from lit_score.runtime.pretrained import load_pretrained

        pretrained = load_pretrained(folder)
        kwargs.setdefault("data_space", pretrained.config.get("data_space"))
        return cls(net=pretrained.net, sde=pretrained.sde, loss=pretrained.loss, precond=pretrained.precond, **kwargs)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path | IO, map_location: Any = None, strict: bool | None = None,
                             weights_only: bool | None = None, **kwargs: Any) -> "ScoreModel":
        """The model of a lit-score checkpoint, of this release or an earlier one (``lit_score.runtime.upgrade``),
        read with ``torch.load(weights_only=True)``; ``kwargs`` override saved hyper-parameters (a checkpoint of a
        model built in Python has no network, SDE or loss config: pass ``net=``, ``sde=`` and the others)."""
        if weights_only is False:
            raise ValueError("lit-score reads checkpoints with torch.load(weights_only=True) only (a pickle can run "
                             "code); checkpoints it writes need nothing more")
        checkpoint = upgrade_checkpoint(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
        hparams = checkpoint.get("hyper_parameters") or {}
        missing = [k for k in ("net", "sde") if hparams.get(k) is None and k not in kwargs]
        if missing:
            raise ValueError(f"{checkpoint_path} does not record its {' and '.join(missing)} (the model was built in "
                             f"Python, not from a YAML): pass them, e.g. ScoreModel.load_from_checkpoint(path, "
                             f"{', '.join(f'{k}=...' for k in missing)})")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, map_location=map_location, strict=strict, weights_only=True,
                                            **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Hyper-parameters that are objects (a model built in Python) are saved as None, so that every checkpoint
        reads with ``torch.load(weights_only=True)``; configs from the command line are kept."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            checkpoint["hyper_parameters"] = {k: v if _plain(v) else None for k, v in hparams.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read an earlier release's checkpoint as today's, and make the EMA network its weights go into (or, for a
        model given one, e.g. by the EMA callback, start it from the checkpoint's trained weights when it has none).
        Predict, test and validate take the model only: the training callbacks' states are left out, so Lightning
        neither restores them nor asks for the callbacks that saved them."""
        upgrade_checkpoint(checkpoint)
        try:
            stage = self.trainer.state.fn
        except RuntimeError:  # not attached to a Trainer: e.g. load_from_checkpoint
            stage = None
        if stage not in (None, "fit"):
            checkpoint.pop("callbacks", None)
        state = checkpoint.get("state_dict", {})
        if self.ema is None and any(k.startswith(EMA) for k in state):
            self.add_ema()
        elif self.ema is not None and state and not any(k.startswith(EMA) for k in state):
            rank_zero_warn("the checkpoint holds no EMA weights; the EMA network starts from its trained weights")
            state.update({EMA + k[len(NET):]: v for k, v in list(state.items()) if k.startswith(NET)})

    def setup(self, stage: str) -> None:
        """Read the guide or classifier of ``guidance``; in fit, take the classes of the data, now read (their
        counts, or a hub dataset's labels), into the data space the model carries, or stop in one line when a
        conditional model's data have none."""
        if stage == "predict":
            self._refuse_if_classifier()  # before anything runs
        for source in (getattr(self.guidance, "guide", None), getattr(self.guidance, "classifier", None)):
            if isinstance(source, (str, Path)):  # read now: a missing or wrong file is named before sampling starts
                self._check_guide(self._guide(source), source)
        space = getattr(getattr(self.trainer, "datamodule", None), "data_space", None)
        if stage != "fit" or not isinstance(space, DataSpace) or self._data_space is None:
            return
        if space.shape != self._data_space.shape:
            return
        checked = _classes_checked(space, self.net, self.loss, self.guidance, strict=True)
        if checked != self._data_space:
            self._data_space = checked
            self.hparams["data_space"] = checked.to_dict()

    def on_fit_start(self) -> None:
        from lit_score.callbacks.ema import EMA as EMACallback

        if self.ema is not None and not any(isinstance(cb, EMACallback) for cb in self.trainer.callbacks):
            rank_zero_warn("the model has an EMA network (from its checkpoint) but this run has no EMA callback: it "
                           "stays as loaded while net trains, and sampling, validation and export use it; add "
                           "lit_score.callbacks.EMA to keep averaging")

    def add_ema(self) -> nn.Module:
        """Give the model an EMA network beside ``net`` (a frozen copy of it), if it has none; returns it."""
        if self.ema is None:
            self.ema = copy.deepcopy(self.net).requires_grad_(False)
        return self.ema

    @property
    def sampling_net(self) -> nn.Module:
        """The weights to sample with: the EMA network when the model has one, else the trained one."""
        return self.ema if self.ema is not None else self.net

    def denoiser(self, net: nn.Module | None = None) -> NetworkDenoiser:
        """D(x_hat; sigma, cond) of ``net`` (default: the weights to sample with) under the preconditioning."""
        return NetworkDenoiser(self.sampling_net if net is None else net, self.precond, self.sde)

    @property
    def score_fn(self) -> ScoreFn:
        """grad log p_t(x) of the denoiser with the weights to sample with."""
        return self.denoiser().score

    @property
    def data_space(self) -> DataSpace:
        """Shape, range and quantisation of the model's data (given, saved, or the network's)."""
        if self._data_space is None:
            raise ValueError(f"the model has no data_space and its network ({type(self.net).__name__}) does not say "
                             "its data shape and range (data_shape, centered): pass data_space=DataSpace(shape, "
                             "centered), or use a DataModule with a data_space through lit-score")
        return self._data_space

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, as the data space (or else the network) declares it."""
        return self._data_space.shape if self._data_space is not None else tuple(self.net.data_shape)

    def sampler_in_use(self, sampler: Sampler | None = None) -> Sampler:
        """``sampler``, else the model's, else the SDE's default (``lit_score.sampling.default_sampler``)."""
        from lit_score.sampling import default_sampler

        return sampler or self.sampler or default_sampler(self.sde)

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on (0: unconditional)."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    @property
    def labelled(self) -> bool:
        """Whether sampling draws class labels: a conditional network, or classifier guidance."""
        return bool(self.num_classes) or isinstance(self.guidance, ClassifierGuidance)

    def sample_labels(self, seeds: Tensor | list[int], labels: Tensor | None = None,
                      class_label: int | None = None) -> Tensor | None:
        """The class labels of the images of ``seeds``: ``labels`` if given, else all ``class_label``, else each
        seed's draw with the training set's class frequencies; None for an unconditional, unguided model."""
        if not self.labelled:
            return None
        if labels is not None:
            labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
            if len(labels) != len(seeds):
                raise ValueError(f"need one label per seed: {len(seeds)} seeds, {len(labels)} labels")
            return labels
        return self.label_space.labels_for(seeds, class_label, device=self.device)

    @property
    def label_space(self) -> DataSpace:
        """The data space whose classes sampling draws: the model's, or for an unconditional model guided by a
        classifier, the classifier's."""
        space = self.data_space
        if not space.num_classes and isinstance(self.guidance, ClassifierGuidance):
            space = self._guide(self.guidance.classifier).data_space
        return space

    def guided_denoiser(self, labels: Tensor | None, net: nn.Module | None = None) -> Denoiser:
        """The denoiser samplers use: D with ``labels`` bound, guided by ``guidance`` (its guide loaded once)."""
        D = self.denoiser(net)
        if labels is None and not isinstance(self.guidance, AutoGuidance):  # autoguidance guides any model
            return D
        if self.guidance is None:
            return Conditioned(D, {"class_labels": labels})
        if isinstance(self.guidance, AutoGuidance):
            return self.guidance.guided(D, labels, guide=self._guide(self.guidance.guide).denoiser())
        if isinstance(self.guidance, ClassifierGuidance):
            classifier = self._guide(self.guidance.classifier)
            return self.guidance.guided(D, labels, classifier=classifier.classifier_logits)
        return self.guidance.guided(D, labels)

    def _guide(self, source: Any) -> "ScoreModel":
        """The guide model (AutoGuidance) or classifier (ClassifierGuidance) of a checkpoint or export folder, on
        this model's device, read once."""
        if isinstance(source, ScoreModel):
            return source.to(self.device)
        key = str(source)
        if key not in self._guides:
            with torch.inference_mode(False):  # normal tensors, which a classifier's gradient needs
                self._guides[key] = load_model(key, what=f"the {type(self.guidance).__name__} guide").eval()
        return self._guides[key].to(self.device)

    def _check_guide(self, guide: "ScoreModel", source: Any) -> None:
        """One line when the guide or classifier at ``source`` cannot guide this model."""
        name = type(self.guidance).__name__
        classifier = getattr(guide.net, "output", None) == "logits"
        if isinstance(self.guidance, ClassifierGuidance) != classifier:
            raise ConfigurationError(
                f"{name}'s {'classifier' if not classifier else 'guide'} {source} is "
                f"{'not a classifier: give a model trained with ClassifierLoss' if not classifier else 'a classifier: give a diffusion model of the same data'}")
        if guide.data_shape != self.data_shape:
            raise ConfigurationError(f"{name}'s {source} takes data of shape {guide.data_shape}, this model "
                                     f"{self.data_shape}: give one trained on the same data")
        classes = guide.num_classes
        if classes and self._data_space is not None and classes != self._data_space.num_classes:
            raise ConfigurationError(f"{name}'s {source} has {classes} classes, this model's data "
                                     f"{self._data_space.num_classes}: give one trained on the same data")

    def classifier_logits(self, x_hat: Tensor, sigma: Tensor) -> Tensor:
        """(B, K) logits of p_sigma(y | x_hat) of a classifier (a model trained with ClassifierLoss)."""
        if getattr(self.net, "output", None) != "logits":
            raise ConfigurationError(f"this model's network ({type(self.net).__name__}) is not a classifier: give "
                                     "ClassifierGuidance a model trained with lit_score.diffusion.losses.ClassifierLoss")
        return classifier_logits(self.sampling_net, self.precond, self.sde, x_hat, sigma)

    def _refuse_if_classifier(self) -> None:
        if getattr(self.net, "output", None) == "logits":
            raise ConfigurationError("this model is a noise-conditional classifier: it draws no samples; use it as "
                                     "--model.guidance ClassifierGuidance --model.guidance.classifier PATH")

    @torch.no_grad()
    def sample(self, seeds: Tensor | list[int], sampler: Sampler | None = None,
               progress: Progress | None = None, labels: Tensor | None = None,
               class_label: int | None = None) -> SampleResult:
        """One sample per seed with ``sampler`` (default: the model's), counted into ``progress`` if given; a
        conditional model draws class ``labels`` (default: ``sample_labels``), which the result carries."""
        self._refuse_if_classifier()
        sampler = self.sampler_in_use(sampler)
        labels = self.sample_labels(seeds, labels, class_label)
        guided = self.guided_denoiser(labels)
        D = guided if progress is None else Counted(guided, progress.counter(len(seeds)))
        result = sampler.sample(D, self.sde, self.data_shape, seeds, self.device)
        if progress is not None:
            progress.batch_done(len(seeds), result.nfe)
        result.labels = labels
        if isinstance(guided, Conditioned):
            result.network_evaluations = guided.evaluations
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

    def predict_step(self, batch: Tensor | tuple[Tensor, Tensor], batch_idx: int) -> dict:
        seeds, labels = batch if isinstance(batch, (list, tuple)) else (batch, None)
        result = self.sample(seeds, progress=getattr(self, "_predict_progress", None), labels=labels)
        out = {"seeds": seeds, "samples": result.samples, "nfe": result.nfe}
        if result.labels is not None:
            out["labels"] = result.labels
        if result.network_evaluations is not None:
            out["network_evaluations"] = result.network_evaluations
        return out

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """Test-set bits/dim through the probability-flow ODE (``lit_score.runtime.bpd``): image i of the test set
        is dequantised and probed with seed i; ``on_test_epoch_end`` logs their mean as test/bpd (a conditional
        model: of p(x | y), the image's own label)."""
        x, labels = self._prepare(batch)
        self._test_bpd.step(self, x, batch_idx, self._labels_for_net(labels))

    def on_test_epoch_start(self) -> None:
        self._test_bpd = BitsPerDimRun()

    def on_test_epoch_end(self) -> None:
        values = self._test_bpd.finish(self)
        if values is not None:
            self.test_bpd = values  # per image, in test-set order

    def configure_model(self) -> None:
        if self.hparams.channels_last:
            for net in (self.net, self.ema):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.net.compile()
            self._compiled = True

    def _prepare(self, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The batch's images (channels-last if asked) and labels (None for unlabelled data)."""
        x, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (list, tuple)) else \
            (batch, None)
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def _labels_for_net(self, labels: Tensor | None) -> Tensor | None:
        """The labels a training or validation batch conditions on: the data's for a conditional network or a
        loss that needs them (a classifier), None otherwise."""
        if not (self.num_classes or getattr(self.loss, "needs_labels", False)):
            return None
        if labels is None:
            raise ValueError("this model is class-conditional but the batch has no labels: use labelled data (a "
                             "ClassLabel column, one subfolder per class, the digits) or set "
                             "model.net.init_args.num_classes 0")
        return labels.long()

    def compute_loss(self, x: Tensor, generator: torch.Generator | None = None, net: nn.Module | None = None,
                     cond: Cond | None = None) -> Tensor:
        """The loss of ``net`` (default: the trained network) on the batch x, conditioned on ``cond``."""
        return self.loss(self.denoiser(self.net if net is None else net), x, generator, cond, step=self.global_step)

    def augmented(self, x: Tensor, batch_idx: int) -> tuple[Tensor, Cond | None]:
        """The training batch augmented by ``augment`` (if any) and the labels it conditions on: image i of this
        process's batch is image (batch_idx world + rank) batch_size + i of the epoch's global order."""
        if self.augment is None:
            return x, None
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        rank, world, epoch = (0, 1, 0) if trainer is None else (trainer.global_rank, trainer.world_size,
                                                                 trainer.current_epoch)
        stride = max(len(x), int(getattr(getattr(trainer, "datamodule", None), "batch_size", 0) or 0))
        index = (batch_idx * world + rank) * stride + torch.arange(len(x), device=x.device)
        x, labels = self.augment(x, index, epoch)
        return x, {"augment": labels}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, labels = self._prepare(batch)
        x, cond = self.augmented(x, batch_idx)
        loss = self.compute_loss(x, cond=with_labels(cond, self._labels_for_net(labels)))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        # Fixed noise per batch, so validation losses of different steps are comparable.
        generator = torch.Generator().manual_seed(batch_idx)
        x, labels = self._prepare(batch)
        loss = self.compute_loss(x, generator, net=self.sampling_net,  # the weights to sample with
                                 cond=with_labels(None, self._labels_for_net(labels)))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the norm of the step's gradients (before clipping) as ``train/grad_norm``, beside the loss of the
        same batch: Lightning writes both at the steps its ``log_every_n_steps`` picks."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = OPTIMIZERS[hp.get("optimizer", "adam")](self.net.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                                            eps=hp.adam_eps, weight_decay=hp.weight_decay)
        warmup = max(int(hp.warmup), 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, 1.0) if warmup else 1.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}


def load_model(source: str | Path, what: str = "the model") -> ScoreModel:
    """The ScoreModel of a checkpoint file or a ``lit-score export`` folder (sampling with its EMA weights)."""
    path = Path(source)
    if path.is_dir():
        return ScoreModel.from_pretrained(str(path))
    if not path.is_file():
        raise CheckpointError(f"{what} {source} does not exist: give a checkpoint (.ckpt) or an export folder")
    return ScoreModel.load_from_checkpoint(path)


def _classes_checked(space: DataSpace | None, net: nn.Module, loss: Loss, guidance: Guidance | None,
                     strict: bool = False) -> DataSpace | None:
    """The data space as the model sees it: without classes for an unconditional model (which ignores labels),
    or an error when the network's classes and the data's disagree; unlabelled data for a conditional model are
    an error when ``strict`` (the data read), else left to ``setup`` (a hub dataset's classes are read there)."""
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    uses_labels = num_classes or getattr(loss, "needs_labels", False) or isinstance(guidance, ClassifierGuidance)
    if guidance is not None and not isinstance(guidance, (ClassifierGuidance, AutoGuidance)) and not num_classes:
        raise ValueError(f"{type(guidance).__name__} needs a class-conditional network: set "
                         "model.net.init_args.num_classes (and label_dropout for classifier-free guidance)")
    if isinstance(guidance, ClassifierFreeGuidance) and not getattr(getattr(net, "map_label", None), "dropout", 1):
        rank_zero_warn("classifier-free guidance of a network trained without label_dropout: its null class (the "
                       "unconditional model the guidance needs) was never trained")
    if space is None:
        return None
    if not uses_labels:
        return space.unlabelled() if space.num_classes else space
    if not space.num_classes:
        if not strict:
            return space
        fix = ("" if getattr(loss, "needs_labels", False) or not num_classes else
               " or set model.net.init_args.num_classes 0")
        raise ValueError(f"a {'classifier' if getattr(loss, 'needs_labels', False) else 'class-conditional model'} "
                         "needs labelled data, but the data have no classes: use data with labels (a ClassLabel "
                         f"column, one subfolder per class, the digits){fix}")
    if num_classes and num_classes != space.num_classes:
        raise ValueError(f"the network takes {num_classes} classes but the data have {space.num_classes}: set "
                         f"model.net.init_args.num_classes {space.num_classes}")
    return space


def data_space_from(data_space: DataSpace | dict | None, net: nn.Module) -> DataSpace | None:
    """The given data space, or for models saved before they carried one, the network's: its ``data_shape`` and
    ``centered`` for 8-bit images, continuous data for vectors; None for a network that says neither."""
    if isinstance(data_space, DataSpace):
        space = data_space
    elif isinstance(data_space, dict):
        space = DataSpace.from_dict(data_space)
    else:
        shape, centered = getattr(net, "data_shape", None), getattr(net, "centered", None)
        classes = int(getattr(net, "num_classes", 0) or 0)  # a conditional network's, drawn uniformly
        if shape is not None and len(shape) != 3:  # vectors: continuous, their range is the data's own
            space = DataSpace(tuple(shape), False, None, num_classes=classes)
        elif shape is None or not isinstance(centered, bool):
            return None
        else:
            space = DataSpace(tuple(shape), centered, num_classes=classes)
    if tuple(getattr(net, "data_shape", space.shape)) != space.shape:
        raise ValueError(f"the network takes samples of shape {tuple(net.data_shape)} but the data space is "
                         f"{space.shape}; set the data options (image_size, num_channels) to the network's")
    return space


def _plain(value: Any) -> bool:
    """Whether ``value`` is made of dicts, lists and scalars only (what weights_only loading accepts)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))
