"""The paper's evaluation protocol: FID, KID and Inception Score of N samples against training-set statistics, and
test-set bits/dim, sharded over every process by per-image seeds and resumable after pre-emption.

Samples are drawn in fixed shards of ``shard_size`` consecutive seeds (``first_seed + i``), each in the same
batches whatever process draws it, so the sample set and every feature vector are the same for any number of
processes. A finished shard (uint8 samples, features, logits, NFE) is written to ``<out_dir>/samples/`` and skipped
on restart. Rank 0 then reads every shard in seed order and computes the metrics in float64, so the numbers do not
depend on how the work was split; it streams them (FID from float64 sums, IS from per-split sums), keeping only the
first ``kid_features`` feature vectors for KID, so its memory does not grow with N. Results go to
``<out_dir>/results.json`` and TensorBoard (``<out_dir>/tensorboard``)
with the protocol spelled out: number of samples, seeds, sampler and its NFE, weights, checkpoint, reference set.

With ``seed_sets`` K > 1 the metrics are computed for K disjoint sets of ``num_samples`` seeds, set k holding seeds
``first_seed + k * num_samples + i`` (its shards follow those of set k - 1 in the same folder), and reported per set
with their minimum, mean and sample standard deviation: EDM's FID is the minimum over three sets of 50,000.

With ``guidance_scales`` [w1, w2, ...] the sample metrics are computed once per guidance scale w, the model's guidance
(a copy of ``model.guidance`` with ``scale = w``) drawing the same seeds; scale w's shards go to
``<out_dir>/guidance_<w>/``, fingerprinted with the guidance's method, scale and interval. ``results.json`` lists each
scale's metrics under ``guidance_sweep``; the top-level ones are those of the model's own scale if it is swept, else
of the first (``guidance.top_level_scale`` says which); ``fid_vs_guidance.png`` plots FID against w.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lit_score.runtime.checkpoint_io import sha256, state_mismatch
from lit_score.errors import CheckpointError, ConfigurationError
from lit_score.distributed import barrier, broadcast, rank_and_world
from lit_score.metrics.inception_score import InceptionScore, InceptionV3Logits
from lit_score.metrics.reference_file import FORMATS, ReferenceFormat, load_reference, save_reference
from lit_score.evaluate.shards import ShardStore
from lit_score.callbacks.sampling import balanced_labels
from lit_score.diffusion.guidance import Guidance
from lit_score.diffusion.likelihood import Likelihood
from lit_score.data_space import DataSpace
from lit_score.metrics.features import FeatureExtractor, InceptionV3, tensor_bytes
from lit_score.metrics.frechet import FeatureStatistics, frechet_distance, metric_tag, sample_count
from lit_score.metrics.kid import kernel_inception_distance
from lit_score.metrics.reference import ReferenceStatistics, cache_path, reference_key, reference_statistics
from lit_score.runtime.module import ScoreModel
from lit_score.runtime.upgrade import EMA, sampling_state, upgrade_checkpoint
from lit_score.progress import Progress, planned_nfe
from lit_score.sampling.base import Sampler

Weights = Literal["ema", "raw"]
SET_METRICS = ("fid", "kid_mean", "inception_score", "is_mean")


def describe(obj: Any) -> dict[str, Any]:
    """``{class_path, init_args}`` of an object, with its plain attributes (what a YAML would say)."""
    cls = type(obj)
    args = {k.lstrip("_"): str(v) if isinstance(v, Path) else v for k, v in vars(obj).items()
            if not k.startswith("__") and isinstance(v, (bool, int, float, str, type(None), list, tuple, Path))}
    args = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in args.items()}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def seed_sets_summary(results: dict[str, Any]) -> str | None:
    """One line: each seed set's FID with its seeds, their minimum, mean and sample std; None for one set."""
    if "over_seed_sets" not in results:
        return None
    fid, sets = results["over_seed_sets"]["fid"], results["seed_sets"]
    each = ", ".join(f"{s['fid']:.4g} (seeds {s['seeds'][0]}..{s['seeds'][1]})" for s in sets)
    return (f"FID@{sample_count(results['n'])} over {len(sets)} seed sets: {each}; min {fid['min']:.4g} "
            f"(set {fid['argmin']}), mean {fid['mean']:.4g} +- {fid['sample_std']:.2g} (sample std)")


def guidance_sweep_summary(results: dict[str, Any]) -> list[str]:
    """One line per guidance scale of a sweep (FID, with each seed set's; IS, KID, NFE); empty without a sweep."""
    if "guidance_sweep" not in results:
        return []
    n, method = sample_count(results["n"]), results["guidance"]["method"]
    top = results["guidance"]["top_level_scale"]
    lines = []
    for entry in results["guidance_sweep"]:
        line = f"guidance scale {entry['scale']:g} ({method}): FID@{n} {entry['fid']:.4g}"
        if "seed_sets" in entry:
            each = ", ".join(f"{s['fid']:.4g}" for s in entry["seed_sets"])
            line += f" (min over {len(entry['seed_sets'])} seed sets: {each})"
        if entry.get("inception_score") is not None:
            line += f", IS {entry['inception_score']:.4g}"
        if entry.get("kid_mean") is not None:
            line += f", KID {entry['kid_mean']:.4g}"
        line += f", NFE {entry['nfe']:g}" + (" (the top-level metrics)" if entry["scale"] == top else "")
        lines.append(line)
    return lines


def guidance_record(guidance: Guidance) -> dict[str, Any]:
    """The guidance's method, scale and interval, with its guide's or classifier's source (a path, or the class and
    a hash of the weights of an object given in Python)."""
    record = guidance.describe()
    for name in ("guide", "classifier"):
        source = getattr(guidance, name, None)
        if source is None:
            continue
        if isinstance(source, (str, Path)):
            record[name] = str(source)
        elif isinstance(source, nn.Module):
            digest = hashlib.sha256()
            for k, v in source.state_dict().items():
                digest.update(k.encode() + tensor_bytes(v))
            record[name] = f"{type(source).__qualname__}-{digest.hexdigest()[:16]}"
        else:
            record[name] = type(source).__qualname__
    return record


def scale_folder(scale: float) -> str:
    """The folder of a guidance scale's shards: ``guidance_2``, ``guidance_1.5`` (a name that gives the scale back)."""
    short = f"{scale:g}"
    return f"guidance_{short if float(short) == scale else repr(float(scale))}"


def load_weights(model: ScoreModel, ckpt_path: str | Path, weights: Weights) -> dict[str, Any]:
    """Make a lit-score checkpoint's EMA network (``ema``) or trained network (``raw``) the weights ``model`` samples
    with (weights only, strict); returns what the checkpoint says about itself."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt_path}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for unreadable or unsafe files
        raise CheckpointError(f"cannot read {ckpt_path} as a lit-score checkpoint with torch.load(weights_only=True): "
                              f"{str(err).splitlines()[0]}") from None
    state_dict = upgrade_checkpoint(checkpoint).get("state_dict") or {}
    if weights == "raw":  # the trained network: the state without the EMA network
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(EMA)}
    elif not any(k.startswith(EMA) for k in state_dict):
        raise CheckpointError(f"{ckpt_path} has no EMA weights (trained without the EMA callback? use "
                              "evaluation.weights: raw)")
    state = sampling_state(state_dict)
    mismatch = state_mismatch(model.net, state)
    if mismatch:
        raise CheckpointError(f"{ckpt_path} does not fit the experiment's network: {mismatch}; evaluate it with the "
                              "experiment YAML it was trained with")
    model.net.load_state_dict(state, strict=True)
    model.ema = None  # so that model.sampling_net is the network just loaded
    return {"path": str(ckpt_path), "global_step": int(checkpoint.get("global_step", 0)), "weights": weights,
            "converted_from": (checkpoint.get("lit_score_conversion") or {}).get("source")}


class Evaluator:
    """FID, KID, Inception Score and test-set bits/dim of a score model, by the paper's protocol.

    Args:
        out_dir: where shards, ``results.json``, ``protocol.json`` and TensorBoard events go; re-running with the
            same out_dir and protocol resumes. Default (None): a folder ``eval_<N>`` in the ``out_root`` that
            :meth:`run` is given (``lit-score-eval``: the checkpoint's run folder, see ``--output``), the one that
            holds this protocol's evaluation (so that running the same command again resumes it), else a new one.
        num_samples: samples for FID / IS (the paper: 50,000), seeds ``first_seed .. first_seed + num_samples - 1``.
        seed_sets: evaluate this many disjoint sets of ``num_samples`` seeds, set k with seeds ``first_seed +
            k * num_samples + i``, and report each set's metrics with their minimum, mean and sample standard
            deviation (EDM: FID = the minimum over 3 sets of 50,000). 1: one set, reported as before.
        batch_size: images sampled at once.
        shard_size: images per shard, the unit of work distribution and of resumption.
        sampler: a ``lit_score.sampling`` sampler (default: the model's, ``ScoreModel.sampler_in_use``).
        features: FID feature network (default: ``lit_score.metrics.InceptionV3``, torch-fidelity's TF Inception).
        inception_score: also compute IS.
        classifier: logits for IS (default: ``InceptionV3Logits`` with the feature network's weights).
        is_splits: IS is reported with one split (``inception_score``: TF-GAN / score_sde) and as the mean and std
            over ``is_splits`` contiguous splits (``is_mean``, ``is_std``: torch-fidelity's ISC without shuffling).
        kid: also compute KID (torch-fidelity's definition: ``kid_subsets`` subsets of ``kid_subset_size``, cubic
            polynomial kernel, subsets drawn with seed 2020) between the first ``kid_features`` samples (seed order)
            and the first ``kid_features`` training images (dataset order) or rows of a ``pool_3`` reference; a
            mu/sigma reference file has no features, and KID is then null.
        weights: ``ema`` (the checkpoint's EMA weights, as the paper) or ``raw``.
        reference: a statistics file (EDM's ``fid-refs`` ``.npz`` with mu/sigma, score_sde's ``.npz`` with pool_3, or a
            lit-score ``.pt``); default: the cached statistics of the DataModule's training images (computed once,
            see ``lit_score.metrics.reference``).
        export_reference: also write the samples' statistics to this ``.npz``, in ``reference_format``.
        reference_format: ``edm`` (mu, sigma) or ``score_sde`` (every feature vector as pool_3).
        cache_dir: where those cached statistics live.
        keep_samples: keep the uint8 samples in the shards (needed to recompute features later).
        bpd: also compute test-set bits/dim (``datamodule.test_dataloader()``'s dataset).
        likelihood: how (probe, tolerances, dequantisation); default: the model's ``likelihood``, else
            ``Likelihood()``.
        bpd_num_images: the first this many test images (default: all).
        bpd_batch_size: test images per batch and per shard.
        bpd_first_seed: image i of the test set is dequantised and probed with seed ``bpd_first_seed + i``.
        max_shards: sample at most this many shards per process in this run, then stop without metrics (for jobs
            shorter than the evaluation: run again to go on); default: all.
        deterministic: cuDNN in deterministic mode without autotuning, so that a shard's numbers do not depend on
            the process that computed it.
        tensorboard: write the results as TensorBoard scalars and the protocol as text.
        guidance_scales: evaluate the sample metrics (not bits/dim) once per guidance scale w of this list, with a
            copy of the model's guidance at scale w (``--evaluation.guidance_scales [1,2,3,5]``); needs a model with
            guidance (``--model.guidance ClassifierFreeGuidance``, ``AutoGuidance`` or ``ClassifierGuidance``).
            Each scale's shards go to ``<out_dir>/guidance_<w>/`` (resumable; a sweep with more scales in the same
            out_dir reuses the scales done), ``results.json`` gains ``guidance_sweep`` (each scale's metrics) and
            ``guidance`` (method, interval, which scale the top-level metrics are: the model's own if swept, else the
            first), TensorBoard ``eval/fid_vs_guidance@N`` (step = round(100 w)) and the out_dir
            ``fid_vs_guidance.png``. With seed_sets K each scale's FID is its minimum over the K sets.
    """

    def __init__(self, out_dir: str | None = None, num_samples: int = 50000, first_seed: int = 0, seed_sets: int = 1,
                 batch_size: int = 250, shard_size: int = 1000, sampler: Sampler | None = None,
                 features: FeatureExtractor | None = None, inception_score: bool = True,
                 classifier: FeatureExtractor | None = None, is_splits: int = 10,
                 kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000, kid_features: int = 10000,
                 weights: Weights = "ema", reference: str | None = None, export_reference: str | None = None,
                 reference_format: ReferenceFormat = "edm", cache_dir: str | None = None,
                 keep_samples: bool = True, bpd: bool = True, likelihood: Likelihood | None = None,
                 bpd_num_images: int | None = None, bpd_batch_size: int = 100, bpd_first_seed: int = 0,
                 max_shards: int | None = None, deterministic: bool = True, tensorboard: bool = True,
                 guidance_scales: list[float] | None = None) -> None:
        if num_samples < 2 or batch_size < 1 or shard_size < 1 or is_splits < 1 or bpd_batch_size < 1:
            raise ConfigurationError("Evaluator needs num_samples >= 2 and batch_size, shard_size, is_splits, bpd_batch_size "
                             f">= 1; got {num_samples}, {batch_size}, {shard_size}, {is_splits}, {bpd_batch_size}")
        if inception_score and num_samples < is_splits:
            raise ConfigurationError(f"is_splits={is_splits} needs at least as many samples, got num_samples={num_samples}")
        if kid and not (2 <= kid_subset_size <= min(kid_features, num_samples) and kid_subsets >= 1):
            raise ConfigurationError(f"KID draws subsets of kid_subset_size={kid_subset_size} from the first "
                             f"kid_features={kid_features} of num_samples={num_samples} samples: it needs "
                             f"2 <= kid_subset_size <= both, and kid_subsets >= 1 (got {kid_subsets}); or kid: false")
        if isinstance(seed_sets, bool) or not isinstance(seed_sets, int) or seed_sets < 1:
            raise ConfigurationError(f"seed_sets must be a whole number >= 1 (how many disjoint sets of num_samples "
                                     f"seeds to evaluate; EDM: 3), got {seed_sets!r}")
        if seed_sets > 1 and export_reference is not None:
            raise ConfigurationError(f"export_reference writes one sample set's statistics, but seed_sets={seed_sets}; "
                                     "export with seed_sets 1 and first_seed at that set's first seed")
        if guidance_scales is not None:
            guidance_scales = self._checked_scales(guidance_scales)
            if export_reference is not None:
                raise ConfigurationError(f"export_reference writes one sample set's statistics, but guidance_scales "
                                         f"sweeps {len(guidance_scales)}; export without the sweep, at one scale")
        if reference_format not in FORMATS:
            raise ConfigurationError(f"reference_format must be one of {FORMATS}, got {reference_format!r}")
        if export_reference is not None and not str(export_reference).endswith(".npz"):
            raise ConfigurationError(f"export_reference must name a .npz file, got {export_reference!r}")
        if weights not in ("ema", "raw"):
            raise ConfigurationError(f"weights must be 'ema' or 'raw', got {weights!r}")
        if max_shards is not None and max_shards < 1:
            raise ConfigurationError(f"max_shards must be positive or null (all), got {max_shards}")
        if bpd_num_images is not None and bpd_num_images < 1:
            raise ConfigurationError(f"bpd_num_images must be positive or null (all), got {bpd_num_images}")
        for name, value in (("features", features), ("classifier", classifier)):
            if value is not None and not isinstance(value, FeatureExtractor):
                raise TypeError(f"{name} must be a lit_score.metrics.FeatureExtractor, got {type(value).__name__}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.num_samples, self.first_seed, self.batch_size, self.shard_size = num_samples, first_seed, batch_size, \
            shard_size
        self.seed_sets = seed_sets
        self.sampler = sampler
        self.features = features if features is not None else InceptionV3()
        self.inception_score, self.is_splits = inception_score, is_splits
        if inception_score and classifier is None:
            weights_path = self.features.weights_path if isinstance(self.features, InceptionV3) else None
            classifier = InceptionV3Logits(str(weights_path) if weights_path else None)
        self.classifier = classifier if inception_score else None
        self.kid, self.kid_subsets, self.kid_subset_size, self.kid_features = kid, kid_subsets, kid_subset_size, \
            kid_features
        self.export_reference, self.reference_format = export_reference, reference_format
        self.weights, self.reference, self.cache_dir, self.keep_samples = weights, reference, cache_dir, keep_samples
        self.bpd, self.likelihood_arg = bpd, likelihood
        self.likelihood = likelihood if likelihood is not None else Likelihood()
        self.bpd_num_images, self.bpd_batch_size, self.bpd_first_seed = bpd_num_images, bpd_batch_size, bpd_first_seed
        self.max_shards, self.deterministic, self.tensorboard = max_shards, deterministic, tensorboard
        self.guidance_scales = guidance_scales

    @staticmethod
    def _checked_scales(scales: Any) -> list[float]:
        if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__"):
            raise ConfigurationError(f"guidance_scales must be a list of numbers (e.g. [1, 2, 3, 5]), got {scales!r}")
        scales = list(scales)
        if not scales or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                             for w in scales):
            raise ConfigurationError(f"guidance_scales must be a non-empty list of finite numbers (e.g. [1, 2, 3, 5]), "
                                     f"got {scales!r}")
        scales = [float(w) for w in scales]
        if len(set(scales)) != len(scales):
            raise ConfigurationError(f"guidance_scales lists a scale twice: {scales}")
        return scales

    def _check_sweep(self, model: ScoreModel) -> None:
        """One line when ``model`` has no guidance for ``guidance_scales`` to sweep."""
        if self.guidance_scales is None:
            return
        fix = ("--model.guidance ClassifierFreeGuidance (a class-conditional network trained with label_dropout), "
               "AutoGuidance or ClassifierGuidance")
        if model.guidance is None:
            raise ConfigurationError(f"evaluation.guidance_scales sweeps the model's guidance scale, but the model "
                                     f"has no guidance: add {fix}")
        if not model.labelled:
            raise ConfigurationError(f"evaluation.guidance_scales sweeps the guidance of class-conditional sampling, "
                                     f"but this model is unconditional and its {type(model.guidance).__name__} "
                                     "is not applied: use a class-conditional network (model.net.init_args."
                                     "num_classes) or --model.guidance ClassifierGuidance")

    # -- protocol -------------------------------------------------------------------------------------------------
    @property
    def shards_per_set(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def num_shards(self) -> int:
        return self.seed_sets * self.shards_per_set

    def set_seeds(self, k: int) -> list[int]:
        """First and last seed of seed set ``k``."""
        start = self.first_seed + k * self.num_samples
        return [start, start + self.num_samples - 1]

    def shard_seeds(self, index: int) -> list[int]:
        k, i = divmod(index, self.shards_per_set)
        first, last = self.set_seeds(k)
        start = first + i * self.shard_size
        return list(range(start, min(start + self.shard_size, last + 1)))

    def protocol(self, model: ScoreModel, datamodule: L.LightningDataModule, checkpoint: dict[str, Any],
                 config: str | None) -> dict[str, Any]:
        """Everything the numbers depend on; the ``samples`` part fingerprints the shards."""
        samples = {
            "num_samples": self.num_samples,
            "seeds": [self.first_seed, self.first_seed + self.seed_sets * self.num_samples - 1],
            **({"seed_sets": self.seed_sets} if self.seed_sets > 1 else {}),
            "batch_size": self.batch_size, "shard_size": self.shard_size,
            "sampler": describe(model.sampler_in_use(self.sampler)),
            "sde": describe(model.sde), "data_space": model.data_space.to_dict(), "weights": self.weights,
            "checkpoint_sha256": checkpoint["sha256"], "features": self.features.identity,
            "classifier": self.classifier.identity if self.classifier is not None else None,
            "keep_samples": self.keep_samples,
        }
        if model.guidance is not None:  # absent without guidance, as before guidance existed
            samples["guidance"] = guidance_record(model.guidance)
            if self.guidance_scales is not None:  # each scale's shards are fingerprinted with it (scale_samples)
                samples["guidance"]["scale"] = "swept"
        metrics = {"n": self.num_samples, "feature_network": self.network_record(self.features),
                   "classifier": self.network_record(self.classifier) if self.classifier is not None else None,
                   "is_splits": self.is_splits if self.classifier is not None else None,
                   "kid": {"subsets": self.kid_subsets, "subset_size": self.kid_subset_size,
                           "features": self.kid_features, "seed": 2020} if self.kid else None}
        if self.seed_sets > 1:
            metrics["seed_sets"] = [self.set_seeds(k) for k in range(self.seed_sets)]
        if self.guidance_scales is not None:
            metrics["guidance_scales"] = list(self.guidance_scales)
        bpd = {**describe(self.likelihood)["init_args"], "num_images": self.bpd_num_images,
               "batch_size": self.bpd_batch_size, "first_seed": self.bpd_first_seed} if self.bpd else None
        if bpd is not None and model.guidance is not None:  # the model's own guidance
            bpd["guidance"] = guidance_record(model.guidance)
        return {"samples": samples, "metrics": metrics, "checkpoint": checkpoint, "config": config, "bpd": bpd}

    @staticmethod
    def scale_samples(samples: dict[str, Any], scale: float) -> dict[str, Any]:
        """The ``samples`` part of the protocol of a sweep's scale ``scale``: what its shards are fingerprinted with
        (that of an evaluation without a sweep, the model's guidance at that scale)."""
        return {**samples, "guidance": {**samples["guidance"], "scale": scale}}

    @staticmethod
    def network_record(network: FeatureExtractor) -> dict[str, Any]:
        """Which network: its class and arguments, its identity (class, size, hash of the state_dict) and the
        weights hash alone."""
        return {**describe(network), "identity": network.identity, "weights_hash": network.identity.rsplit("-", 1)[1]}

    @staticmethod
    def _protocol_differs(folder: Path, protocol: dict[str, Any]) -> str | None:
        """How the evaluation in ``folder`` (its protocol.json) differs from ``protocol``, or None."""
        path = folder / "protocol.json"
        if not path.is_file():
            return None
        previous = json.loads(path.read_text())
        for part in ("samples", "bpd"):
            implied = {"seed_sets": 1} if part == "samples" else {}  # absent: one set
            old, new = {**implied, **(previous.get(part) or {})}, {**implied, **(protocol.get(part) or {})}
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if differ:
                return f"{part}: {', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in differ)}"
        return None

    def _check_protocol(self, protocol: dict[str, Any], out_root: Path) -> tuple[str, str | None]:
        """Rank 0: the out_dir (``out_dir``, or chosen in ``out_root``) with protocol.json written, or why the
        out_dir holds another evaluation."""
        out_dir = self.out_dir
        if out_dir is None:
            previous = sorted((p for p in out_root.glob("eval_*") if p.name[5:].isdigit()),
                              key=lambda p: int(p.name[5:])) if out_root.is_dir() else []
            out_dir = next((p for p in previous if (p / "protocol.json").is_file()
                            and self._protocol_differs(p, protocol) is None),
                           out_root / f"eval_{1 + max((int(p.name[5:]) for p in previous), default=-1)}")
        differs = self._protocol_differs(out_dir, protocol)
        if differs:
            return str(out_dir), (f"{out_dir} holds an evaluation with another protocol ({differs}); use another "
                                  f"out_dir, or delete {out_dir} to start over")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "protocol.json").write_text(json.dumps(protocol, indent=2))
        return str(out_dir), None

    @staticmethod
    def fingerprint(part: dict[str, Any] | None) -> str:
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]

    # -- the run --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, model: ScoreModel, datamodule: L.LightningDataModule, ckpt_path: str | Path | None = None,
            config: str | None = None, device: torch.device | str = "cpu",
            out_root: str | Path = ".") -> dict[str, Any]:
        """Evaluate (every process of a distributed run calls this); returns the results on every rank.

        With ``ckpt_path`` the checkpoint's ``weights`` are loaded first; without, the model is evaluated as it is.
        Without an ``out_dir``, the outputs go to a folder ``eval_<N>`` of ``out_root`` (see the class).
        """
        rank, world = rank_and_world()
        self._check_sweep(model)
        if self.likelihood_arg is None:
            self.likelihood = getattr(model, "likelihood", None) or Likelihood()
        if self.deterministic:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        checkpoint: dict[str, Any] = {"path": None, "global_step": 0, "weights": "as given", "sha256": None}
        if ckpt_path is not None:
            checkpoint = load_weights(model, ckpt_path, self.weights)
            checkpoint["sha256"] = broadcast(sha256(ckpt_path) if rank == 0 else None)
        else:
            digest = hashlib.sha256()
            for k, v in model.state_dict().items():
                digest.update(k.encode() + tensor_bytes(v))
            checkpoint["sha256"] = digest.hexdigest()
        model = model.to(device).eval()
        self.features.prepare()
        self.features.to(device).eval()
        if self.classifier is not None:
            self.classifier.prepare()
            self.classifier.to(device).eval()
        protocol = self.protocol(model, datamodule, checkpoint, config)
        out_dir, problem = broadcast(self._check_protocol(protocol, Path(out_root)) if rank == 0 else None)
        if problem:
            raise ValueError(problem)
        self.out_dir = Path(out_dir)

        reference = self._reference(datamodule, model.data_space, device)
        protocol["reference"] = self._reference_record(reference)
        started = time.time()
        stores = self._stores(protocol["samples"])
        pending = broadcast([store.pending(self.num_shards) for _, store in stores] if rank == 0 else None)
        barrier()
        sampler = model.sampler_in_use(self.sampler)
        work = [(j, index) for j, indices in enumerate(pending) for index in indices]  # every scale's, in order
        mine = work[rank::world][:self.max_shards]
        label = f"samples for FID@{self.num_samples}" + (f" x {self.seed_sets} sets" if self.seed_sets > 1 else "")
        own = model.guidance
        try:
            for j, (scale, store) in enumerate(stores):
                indices = [index for k, index in mine if k == j]
                if scale is not None:
                    if not indices:
                        continue
                    model.guidance = copy.copy(own)  # shallow: the guide or classifier is shared, loaded once
                    model.guidance.scale = scale
                with Progress(label + ("" if scale is None else f" at guidance scale {scale:g}"),
                              sum(len(self.shard_seeds(i)) for i in indices),
                              planned_nfe(sampler, model.sde)) as progress:
                    for index in indices:
                        store.save(index, self._sample_shard(model, sampler, index, progress))
        finally:
            model.guidance = own
        barrier()
        left = broadcast(sum(len(store.pending(self.num_shards)) for _, store in stores) if rank == 0 else None)
        if left:
            return {"complete": False, "shards_left": left, "num_shards": self.num_shards * len(stores)}
        if rank == 0:
            results = self._sample_metrics(stores[0][1], reference) if self.guidance_scales is None else \
                self._sweep_metrics(stores, reference, own)
        else:
            results = None

        if self.bpd:
            bpd = self._bits_per_dim(model, datamodule, device, rank, world, checkpoint["sha256"])
            if rank == 0:
                results["bpd"] = bpd
        if rank == 0:
            resumed = self.num_shards * len(stores) - sum(len(p) for p in pending)
            results["protocol"] = {**protocol, "world_size": world, "resumed_shards": resumed,
                                   "seconds": round(time.time() - started, 1)}
            self._write(results, checkpoint["global_step"])
        return broadcast(results)

    def _stores(self, samples: dict[str, Any]) -> list[tuple[float | None, ShardStore]]:
        """Where the shards go: ``[(None, <out_dir>/samples)]``, or for a sweep each scale's folder."""
        if self.guidance_scales is None:
            return [(None, ShardStore(self.out_dir / "samples", self.fingerprint(samples)))]
        return [(w, ShardStore(self.out_dir / scale_folder(w), self.fingerprint(self.scale_samples(samples, w))))
                for w in self.guidance_scales]

    def _sweep_metrics(self, stores: list[tuple[float | None, ShardStore]], reference: ReferenceStatistics,
                       guidance: Guidance) -> dict[str, Any]:
        """Each scale's sample metrics; at the top level those of the model's own scale if swept, else the first's."""
        sweep = []
        for scale, store in stores:
            metrics = self._sample_metrics(store, reference)
            sweep.append({"scale": scale, **{k: v for k, v in metrics.items() if k not in ("complete", "n")}})
        scales = [entry["scale"] for entry in sweep]
        own = guidance.scale in scales
        top = sweep[scales.index(guidance.scale) if own else 0]
        record = guidance_record(guidance)
        summary = {"method": record.pop("method"), "interval": record.pop("interval"), **{
            k: v for k, v in record.items() if k != "scale"}, "model_scale": guidance.scale, "scales": scales,
            "top_level_scale": top["scale"], "top_level_is": "the model's guidance scale" if own else
            "the first swept scale (the model's is not swept)"}
        return {"complete": True, "n": self.num_samples, **{k: v for k, v in top.items() if k != "scale"},
                "guidance": summary, "guidance_sweep": sweep}

    def _reference(self, datamodule: L.LightningDataModule, space: DataSpace,
                   device: torch.device | str) -> ReferenceStatistics:
        keep = self.kid_features if self.kid else 0
        if self.reference is not None:
            return load_reference(self.reference, self.features.num_features, keep)
        cached = cache_path(reference_key(datamodule, self.features), self.cache_dir).is_file()
        if not broadcast(cached):
            datamodule.setup("fit")
        reference = reference_statistics(datamodule, self.features, self.cache_dir, self.batch_size, device, keep,
                                         space)
        if reference.mean.shape != (self.features.num_features,):
            raise ValueError(f"the reference statistics have {reference.mean.shape[0]} features, the feature "
                             f"network {self.features.num_features}; they were made with another network")
        return reference

    def _reference_record(self, reference: ReferenceStatistics) -> dict[str, Any]:
        return {"key": reference.key, "count": reference.count,
                "source": self.reference or "training set of the DataModule (cached)",
                "kid_features": None if reference.features is None else reference.features.shape[0]}

    def _sample_shard(self, model: ScoreModel, sampler: Sampler, index: int, progress: Progress) -> dict[str, Any]:
        seeds = self.shard_seeds(index)
        images, features, logits, nfe = [], [], [], []
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            labels = torch.tensor(balanced_labels(chunk, model.label_space.num_classes)) if model.labelled else None
            result = model.sample(chunk, sampler, progress, labels)
            x = model.data_space.to_uint8(result.samples)
            images.append(x.cpu())
            features.append(self.features(x).double().cpu())
            if self.classifier is not None:
                logits.append(self.classifier(x).double().cpu())
            nfe.append([len(chunk), int(result.nfe)])
        return {"seeds": [seeds[0], seeds[-1]], "features": torch.cat(features),
                "logits": torch.cat(logits) if logits else None,
                "images": torch.cat(images) if self.keep_samples else None, "nfe": nfe}

    def _shards(self, store: ShardStore, seed_set: int = 0):
        """Every shard of a seed set in seed order, checked to hold its seeds."""
        for index in range(seed_set * self.shards_per_set, (seed_set + 1) * self.shards_per_set):
            shard = store.load(index)
            seeds = self.shard_seeds(index)
            if shard["seeds"] != [seeds[0], seeds[-1]] or shard["features"].shape[0] != len(seeds):
                raise ValueError(f"{store.path(index)} does not hold seeds {seeds[0]}..{seeds[-1]}; delete it")
            yield shard

    def _sample_metrics(self, store: ShardStore, reference: ReferenceStatistics) -> dict[str, Any]:
        """The samples' metrics; with several seed sets, those of the set with the lowest FID, each set's, and their
        minimum, mean and sample standard deviation."""
        head = {"complete": True, "n": self.num_samples}
        if self.seed_sets == 1:
            return {**head, **self._set_metrics(store, reference, 0)}
        sets = [{"set": k, "seeds": self.set_seeds(k), **self._set_metrics(store, reference, k)}
                for k in range(self.seed_sets)]
        best = min(range(self.seed_sets), key=lambda k: sets[k]["fid"])
        summary: dict[str, Any] = {"sets": self.seed_sets, "n_per_set": self.num_samples,
                                   "reference": self._reference_record(reference)}
        for key in SET_METRICS:
            if sets[0].get(key) is not None:
                values = np.array([s[key] for s in sets], dtype=np.float64)
                summary[key] = {"min": float(values.min()), "argmin": int(values.argmin()),
                                "mean": float(values.mean()), "sample_std": float(values.std(ddof=1)),
                                "max": float(values.max()), "argmax": int(values.argmax())}
        top = {k: v for k, v in sets[best].items() if k not in ("set", "seeds")}
        return {**head, **top, "best_seed_set": best, "seed_sets": sets, "over_seed_sets": summary}

    def _set_metrics(self, store: ShardStore, reference: ReferenceStatistics, seed_set: int) -> dict[str, Any]:
        stats = FeatureStatistics(self.features.num_features, sync_on_compute=False)  # rank 0 reads every shard
        scores = [InceptionScore(self.num_samples, 1), InceptionScore(self.num_samples, self.is_splits)] \
            if self.classifier is not None else []
        kept, num_kept, images_nfe = [], 0, 0
        for shard in self._shards(store, seed_set):
            stats.update(shard["features"])
            for score in scores:
                score.update(shard["logits"])
            if self.kid and num_kept < self.kid_features:
                kept.append(shard["features"][:self.kid_features - num_kept])
                num_kept += kept[-1].shape[0]
            images_nfe += sum(n * e for n, e in shard["nfe"])
        mean, cov, count = stats.compute()
        results: dict[str, Any] = {"fid": frechet_distance(mean, cov, reference.mean, reference.cov),
                                   "kid_mean": None, "kid_std": None, "nfe": images_nfe / count}
        if self.kid and reference.features is not None:
            results["kid_mean"], results["kid_std"] = kernel_inception_distance(
                torch.cat(kept), reference.features, self.kid_subsets, self.kid_subset_size)
        if scores:
            results["inception_score"] = scores[0].compute()[0]
            results["is_mean"], results["is_std"] = scores[1].compute()
        if self.export_reference is not None:
            features = torch.cat([s["features"] for s in self._shards(store)]) \
                if self.reference_format == "score_sde" else None
            save_reference(self.export_reference, mean, cov, self.reference_format, features)
            results["exported"] = {"path": str(self.export_reference), "format": self.reference_format}
        return results

    def _test_dataset(self, datamodule: L.LightningDataModule):
        datamodule.setup("test")
        loader = datamodule.test_dataloader()
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"{type(datamodule).__name__}.test_dataloader() must serve a map-style dataset (with "
                            f"__len__ and __getitem__) for test-set bits/dim; got {type(dataset).__name__}")
        return dataset

    def _bits_per_dim(self, model: ScoreModel, datamodule: L.LightningDataModule, device: torch.device | str,
                      rank: int, world: int, checkpoint_sha256: str | None) -> dict[str, Any] | None:
        dataset = self._test_dataset(datamodule)
        total = len(dataset) if self.bpd_num_images is None else min(self.bpd_num_images, len(dataset))
        if total == 0:
            raise ValueError(f"{type(datamodule).__name__} has no test images for bits/dim")
        num_shards = math.ceil(total / self.bpd_batch_size)
        store = ShardStore(self.out_dir / "bpd", self.fingerprint(self.protocol_bpd_part(total, checkpoint_sha256,
                                                                                         model.guidance)))
        pending = broadcast(store.pending(num_shards) if rank == 0 else None)
        barrier()
        mine = pending[rank::world]
        sizes = [min(self.bpd_batch_size, total - i * self.bpd_batch_size) for i in mine]
        with Progress(f"test-set bits/dim of {total} images", sum(sizes)) as progress:
            for index in mine:
                rows = list(range(index * self.bpd_batch_size, min((index + 1) * self.bpd_batch_size, total)))
                batch = next(iter(DataLoader(Subset(dataset, rows), batch_size=len(rows))))
                x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
                labels = batch[1].to(device) if model.num_classes and isinstance(batch, (list, tuple)) else None
                if model.num_classes and labels is None:
                    raise ValueError("a class-conditional model's bits/dim need labelled test images")
                seeds = [self.bpd_first_seed + i for i in rows]
                score_fn = model.guided_denoiser(labels).score  # of p(x | y) for a conditional model
                bpd, nfe = self.likelihood.bits_per_dim(score_fn, model.sde, x, seeds, model.data_space, progress)
                store.save(index, {"rows": [rows[0], rows[-1]], "bpd": bpd.double().cpu(), "nfe": int(nfe)})
        barrier()
        if rank != 0:
            return None
        values = torch.cat([store.load(i)["bpd"] for i in range(num_shards)])
        nfe = max(store.load(i)["nfe"] for i in range(num_shards))
        return {"mean": float(values.mean()), "sem": float(values.std() / math.sqrt(len(values)))
                if len(values) > 1 else 0.0, "num_images": len(values), "max_nfe": nfe}

    def protocol_bpd_part(self, total: int, checkpoint_sha256: str | None,
                          guidance: Guidance | None = None) -> dict[str, Any]:
        part = {"checkpoint_sha256": checkpoint_sha256, **describe(self.likelihood)["init_args"], "num_images": total,
                "batch_size": self.bpd_batch_size, "first_seed": self.bpd_first_seed, "weights": self.weights}
        if guidance is not None:  # absent without guidance, so that earlier shards still fit
            part["guidance"] = guidance_record(guidance)
        return part

    def _write(self, results: dict[str, Any], step: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.out_dir / "results.json")
        if "guidance_sweep" in results:
            self._plot_sweep(results)
        if not self.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        try:
            n = self.num_samples
            writer.add_scalar(metric_tag("fid", n, "eval"), results["fid"], step)
            writer.add_scalar("eval/nfe", results["nfe"], step)
            if "inception_score" in results:
                writer.add_scalar(metric_tag("is", n, "eval"), results["inception_score"], step)
            if results.get("kid_mean") is not None:
                writer.add_scalar(metric_tag("kid", n, "eval"), results["kid_mean"], step)
            if results.get("bpd"):
                writer.add_scalar("eval/bpd", results["bpd"]["mean"], step)
            for key, metric in (("fid", "fid"), ("kid_mean", "kid"), ("inception_score", "is")):
                if key not in results.get("over_seed_sets", {}):
                    continue
                tag, summary = metric_tag(metric, n, "eval"), results["over_seed_sets"][key]
                for s in results["seed_sets"]:
                    writer.add_scalar(f"{tag}/set_{s['set']}", s[key], step)
                for stat in ("min", "mean", "sample_std"):
                    writer.add_scalar(f"{tag}/{stat}", summary[stat], step)
            for entry in results.get("guidance_sweep", []):  # TensorBoard's steps are whole numbers: 100 w
                for key, metric in (("fid", "fid"), ("inception_score", "is"), ("kid_mean", "kid"), ("nfe", "nfe")):
                    if entry.get(key) is not None:
                        writer.add_scalar(f"eval/{metric}_vs_guidance@{sample_count(n)}", entry[key],
                                          round(100 * entry["scale"]))
            if "guidance_sweep" in results:
                rows = "\n".join(f"| {e['scale']:g} | {e['fid']:.6g} | {e['nfe']:g} |"
                                 for e in results["guidance_sweep"])
                writer.add_text("eval/guidance_sweep", f"{results['guidance']['method']}, interval "
                                f"{results['guidance']['interval']}; TensorBoard step = round(100 x scale)\n\n"
                                f"| scale | FID@{sample_count(n)} | NFE |\n|---|---|---|\n{rows}", step)
            writer.add_text("eval/protocol", "```\n" + json.dumps(results["protocol"], indent=2) + "\n```", step)
        finally:
            writer.close()

    def _plot_sweep(self, results: dict[str, Any]) -> None:
        """``fid_vs_guidance.png``: FID against the guidance scale (each seed set's FID as dots), the model's own scale
        marked."""
        from matplotlib.figure import Figure  # Agg, without pyplot's global state

        sweep, guidance = results["guidance_sweep"], results["guidance"]
        order = sorted(range(len(sweep)), key=lambda i: sweep[i]["scale"])
        scales = [sweep[i]["scale"] for i in order]
        fig = Figure(figsize=(5, 3.5), dpi=100)
        ax = fig.add_subplot()
        label = f"FID@{sample_count(self.num_samples)}"
        ax.plot(scales, [sweep[i]["fid"] for i in order], "o-",
                label=label + (f" (min over {self.seed_sets} seed sets)" if self.seed_sets > 1 else ""))
        if self.seed_sets > 1:
            points = [(sweep[i]["scale"], s["fid"]) for i in order for s in sweep[i]["seed_sets"]]
            ax.plot(*zip(*points), ".", color="gray", alpha=0.6, label="each seed set")
        ax.axvline(guidance["model_scale"], color="gray", linestyle=":", label="the model's scale")
        interval = "" if guidance["interval"] is None else f", interval {guidance['interval']}"
        ax.set(xlabel="guidance scale w", ylabel=label, title=f"{guidance['method']}{interval}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        tmp = self.out_dir / "fid_vs_guidance.tmp.png"
        fig.savefig(tmp)
        tmp.replace(self.out_dir / "fid_vs_guidance.png")
