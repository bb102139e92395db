"""``lit-score``: LightningCLI over ScoreModel and any LightningDataModule, configured by experiment YAMLs.

A run folder is a record. ``fit`` writes ``<save_dir>/<name>/<version>/`` (``config.yaml``, ``checkpoints/``, the
TensorBoard events), and ``fit --resume`` of that folder continues it. ``predict``, ``test`` and ``validate`` never
write there: their outputs (``config.yaml`` of the launch, ``samples.png``, ``samples.npz``, TensorBoard events with
the metrics) go to a new folder ``<run>/<subcommand>_<N>`` inside the checkpoint's run folder, N one more than the
largest there (``predict_0``, ``predict_1``, ...), or to ``--output DIR``. A checkpoint outside a run folder (or in one
this user cannot write) and an export folder give ``<save_dir>/<name>/<subcommand>_<N>``: the TensorBoard logger's
save_dir (``runs``, relative to the current directory, by default) and the experiment's, export folder's or file's
name. Every output is printed, one line each (rank 0, stdout). Saved configs name no machine's run location: no
logger version, no absolute save_dir or default_root_dir, and no ``ckpt_path`` of the launch of a fit.

A checkpoint (``--ckpt_path``: a .ckpt, or a ``lit-score export`` folder) fixes the network, SDE, loss and
preconditioning its weights were trained with; a YAML or command-line value that differs is an error naming each
key and both values (``--init_weights`` starts a new network from its weights instead). What the config leaves out
comes from the checkpoint: with no YAML at all, ``lit-score predict --ckpt_path CKPT`` samples from seeds in the
checkpoint's data space with its sampler (or the SDE's default).
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from jsonargparse import ActionYesNo, Namespace, set_parsing_settings
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from omegaconf.errors import OmegaConfBaseException

from lit_score.callbacks.dashboard import Dashboard
from lit_score.cli.allocation import check_allocation
from lit_score.runtime.checkpoint_io import CorruptCheckpointError, checkpoint_problem, corrupt_message, state_mismatch
from lit_score.cli.config import ConfigError, expand_config_args
from lit_score.data_space import DataSpace, data_space_of
from lit_score.errors import CheckpointError, ConfigurationError
from lit_score.runtime.lightning_private import without_checkpoint_hyperparameters
from lit_score.runtime.pretrained import export_hyperparameters, load_weights
from lit_score.runtime.module import ScoreModel
from lit_score.runtime.upgrade import sampling_state, upgrade_checkpoint, upgrade_model_config
from lit_score.callbacks.prediction_writer import PredictionWriter
from lit_score.callbacks.preemption import Preemption
from lit_score.callbacks.dead_rank import DEFAULT_TIMEOUT, DeadRank, process_group_timeout
from lit_score.callbacks.resume import RandomState, resume_args
from lit_score.progress import Interrupted
from lit_score.cli.threads import affinity_cpus


class ScoreCLI(LightningCLI):
    """LightningCLI over ScoreModel and any DataModule (by class_path), in OmegaConf mode.

    Interpolations resolve after command-line overrides (``omegaconf+``) and are kept relative to where they
    stand, so they resolve below a subcommand too (and a misspelt key is reported by name).
    """

    def __init__(self, model_class: type[L.LightningModule] = ScoreModel,
                 datamodule_class: type[L.LightningDataModule] = L.LightningDataModule, **kwargs: Any) -> None:
        """As LightningCLI's; a mistake in the options or YAMLs stops it before anything is written: an unknown
        option or key is one line on stderr naming the closest valid ones (and the YAML file and line) with exit
        status 2, and a value a configured class refuses is a ConfigurationError naming its config key."""
        from jsonargparse import ArgumentError

        from lit_score.cli import suggest
        from lit_score.errors import UserError, exit_reporting, program_name, rejected_argument, traceback_wanted

        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)  # the experiments' (base/trainer.yaml), without a YAML too
        kwargs["parser_kwargs"] = {"parser_mode": "omegaconf+", "exit_on_error": False, "allow_abbrev": False,
                                   **kwargs.get("parser_kwargs", {})}
        try:
            super().__init__(model_class, datamodule_class, **kwargs)
        except (ArgumentError, ValueError, TypeError) as err:
            if traceback_wanted() or getattr(self, "_built", False):  # after the config was built: the run's own
                raise
            given = kwargs.get("args")
            args = list(sys.argv[1:] if given is None else given if isinstance(given, (list, tuple)) else [])
            files = list(dict.fromkeys(suggest.config_files(suggest.original_argv()) + suggest.config_files(args)))
            if isinstance(err, ArgumentError):
                subcommand = next((a for a in args if a in self.subcommands()), None)
                parsers = getattr(self, "_subcommand_parsers", {})
                parser = parsers[subcommand] if subcommand in parsers else self.parser
                help_command = " ".join(filter(None, (program_name(), subcommand, "--help")))
                exit_reporting(ConfigurationError(suggest.unknown_option_message(
                    str(err), parser, args, files, help_command)))
            rejected = rejected_argument(err)
            config = getattr(self, "config", None)
            message = rejected and suggest.rejected_value_message(
                *rejected, config, config.get("subcommand") if config is not None else None,
                keyed_only=isinstance(rejected[1], UserError), args=args, files=files)
            if not message:
                raise
            raise ConfigurationError(message) from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decide the network's input shape and range; nobody sets them twice.
        for key in ("num_channels", "image_size", "centered"):
            parser.link_arguments(f"data.{key}", f"model.net.init_args.{key}", apply_on="instantiate")
        # ... and the model carries the data space (shape, range, quantisation) that its consumers read.
        parser.link_arguments("data", "model.data_space", compute_fn=_data_space_dict, apply_on="instantiate")
        # Interpolated by the EMA callback of experiments/base/trainer.yaml, so an architecture's YAML sets it.
        parser.add_argument("--ema_rate", type=float, default=0.9999,
                            help="EMA rate of the experiment (score_sde: 0.999 for NCSN++, 0.9999 for DDPM++)")
        # The common intervals, in optimizer steps, interpolated by the experiment YAMLs (`sample_every: 100` at
        # their top level), so that they are set here rather than by the index of a callback in a list.
        from jsonargparse.typing import PositiveInt

        parser.add_argument("--val_every", type=PositiveInt, default=5000,
                            help="validate every N optimizer steps (interpolated into trainer.val_check_interval, "
                                 "which takes a fraction of an epoch instead)")
        parser.add_argument("--sample_every", type=PositiveInt, default=50000,
                            help="draw a sample grid every N optimizer steps (SampleGrid every_n_steps; the "
                                 "experiments without a SampleGrid callback, e.g. toy2d, have none to draw)")
        parser.add_argument("--checkpoint_every", type=PositiveInt | None, default=50000,
                            help="save a checkpoint, and last.ckpt with it, every N optimizer steps (ModelCheckpoint "
                                 "every_n_train_steps; null: at the end of each epoch)")
        parser.add_argument("--fid_every", type=PositiveInt, default=50000,
                            help="compute the tracking FID every N optimizer steps (FID every_n_steps; the "
                                 "experiments without an FID callback, e.g. imagefolder_*, compute none)")
        # Every fit can be pre-empted and resumed exactly: see lit_score.callbacks.preemption and lit_score.callbacks.resume.
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(Preemption, "preemption")
        # A dead rank ends every rank, within the process-group timeout it sets: see lit_score.callbacks.dead_rank.
        parser.add_lightning_class_args(DeadRank, "dead_rank")
        # TensorBoard's custom-scalars layout and HParams tab: see lit_score.callbacks.dashboard.
        parser.add_lightning_class_args(Dashboard, "dashboard")

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        """As LightningCLI's, with :class:`ScoreTrainer` as the Trainer unless another class was given."""
        if self.trainer_class is L.Trainer:
            self.trainer_class = ScoreTrainer
        self._with_subcommands = add_subcommands
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's, and the options of one launch: ``--output``, ``--untrained`` and ``--init_weights``."""
        super().add_default_arguments_to_parser(parser)
        parser.add_argument("--output", type=Optional[str], default=None,
                            help="predict, test, validate, lit-score-eval: write the outputs to this folder (default: "
                                 "a new <subcommand>_<N> in the checkpoint's run folder; for an export or a checkpoint "
                                 "outside a run, <save_dir>/<name>/<subcommand>_<N>, save_dir runs by default)")
        parser.add_argument("--untrained", action=ActionYesNo, default=False,
                            help="predict, test, validate: run the network as the config builds it, without "
                                 "--ckpt_path (e.g. to check a config); without it they refuse to")
        parser.add_argument("--init_weights", type=Optional[str], default=None,
                            help="a .ckpt or a `lit-score export` folder whose sampling weights (EMA if present) "
                                 "start the network this config builds (shapes must fit): fit starts a new run from "
                                 "them at step 0, its EMA too. Not read when --ckpt_path is given (its weights are "
                                 "the ones used)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI's (without its warning that ``args`` and ``sys.argv`` are both given: ``run_cli`` and
        ``lit-score submit`` pass the expanded command line on purpose), with what ``--ckpt_path`` fixes.

        The checkpoint (or export) is read once, here. Its network, SDE, loss and preconditioning come first, under
        the YAMLs and the command line; one of those that asks for another value is a :class:`CheckpointError`
        naming each key and both values. Its sampler and likelihood stand in where the config names none, and its
        data space gives ``predict`` (and ``lit-score-eval``) a :class:`~lit_score.data.seeds.SeedsDataModule`:
        predict samples from seeds and needs no training data.
        """
        self._checkpoint: CheckpointSource | None = None
        self._initial: CheckpointSource | None = None
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            self._check_launch(self.config.get("subcommand"))
            return
        argv = list(sys.argv[1:] if args is None else args)
        subcommand = next((a for a in argv if a in self.subcommands()), None) \
            if getattr(self, "_with_subcommands", False) else None
        given = {key: option_value(argv, f"--{key}") for key in ("ckpt_path", "init_weights")}
        sources = {key: read_checkpoint(value, key) for key, value in used(given).items()}
        self.config = parser.parse_args(with_checkpoint_base(argv, subcommand, *sources.values()))
        section = self._section(self.config)
        named = {key: section.get(key) for key in given if section.get(key) != given[key]}
        if any(is_local_path(value) for value in named.values()):  # named in a YAML
            sources = {key: sources[key] if key not in named else read_checkpoint(value, key)
                       for key, value in used({key: section.get(key) for key in given}).items()}
            self.config = parser.parse_args(with_checkpoint_base(argv, subcommand, *sources.values()))
        self._checkpoint, self._initial = sources.get("ckpt_path"), sources.get("init_weights")
        if self._checkpoint is not None:
            self._checkpoint.loaded = None  # Lightning restores it; only --init_weights' are loaded here
        self._check_launch(self.config.get("subcommand"))
        if self._checkpoint is not None or self._initial is not None:
            self._apply_checkpoint(self.config.get("subcommand"))

    @property
    def checkpoint(self) -> CheckpointSource | None:
        """What ``--ckpt_path`` named (a .ckpt or an export), as read; None without one or for ``last``."""
        return self._checkpoint

    @property
    def initial_weights(self) -> CheckpointSource | None:
        """What ``--init_weights`` named, as read; None without."""
        return self._initial

    def _section(self, config: Namespace | dict) -> Any:
        subcommand = config.get("subcommand") if isinstance(config, (dict, Namespace)) else None
        subcommand = subcommand or getattr(self, "subcommand", None)
        return config[subcommand] if subcommand and subcommand in config else config

    def _check_launch(self, subcommand: str | None) -> None:
        """Refuse contradictory launch options before anything is built or written."""
        section = self._section(self.config)
        ckpt, untrained = section.get("ckpt_path"), section.get("untrained")
        output, init_weights = section.get("output"), section.get("init_weights")
        if untrained and (ckpt or init_weights):
            raise ConfigurationError("--untrained runs the network as the config builds it; it contradicts "
                                     f"--{'ckpt_path' if ckpt else 'init_weights'}: give one or the other")
        if subcommand == "fit" and output:
            raise ConfigurationError("--output is for predict, test and validate; a fit writes its run folder under "
                                     "--trainer.logger.init_args.save_dir (see --resume to continue one)")
        if output and is_run_folder(Path(output)):
            raise ConfigurationError(f"--output {output} is a training run's folder (config.yaml, checkpoints/), "
                                     "which only fit writes; give a new folder")

    def _apply_checkpoint(self, subcommand: str | None) -> None:
        source, section = self._checkpoint or self._initial, self._section(self.config)
        model = section["model"].as_dict() if isinstance(section.get("model"), Namespace) else {}
        conflicts = checkpoint_conflicts(source.options, model) if source is self._checkpoint else []
        if conflicts:
            raise CheckpointError(conflict_message(source, conflicts, subcommand))
        for key, value in source.defaults.items():
            if model.get(key) is None:
                self._set({"model": {key: value}})
        data = section.get("data")
        if subcommand == "predict" and source.seeds and isinstance(data, Namespace) and data.class_path != SEEDS \
                and serves_seeds_only(data.class_path):
            given = data.get("init_args") or Namespace()
            problems = [f"data.init_args.{k} is {given[k]!r} here but {source.seeds[k]!r} in the checkpoint"
                        for k in LINKED if given.get(k) is not None and k in source.seeds
                        and given[k] != source.seeds[k]]
            if problems:
                raise CheckpointError(f"the data do not fit the checkpoint's network: {'; '.join(problems)}. Set "
                                      f"{', '.join('--' + p.split(' is ')[0] for p in problems)} to the checkpoint's "
                                      "values, or leave the data out: predict samples from seeds")
            seeds = {k: given[k] for k in ("num_samples", "sample_batch_size", "first_seed", "class_label")
                     if k in given}
            self._set({"data": {"class_path": SEEDS, "init_args": {**source.seeds, **seeds}}})
        data = section.get("data")
        if subcommand == "predict" and isinstance(data, Namespace) and data.class_path == SEEDS:
            classes = classifier_classes(model, (data.get("init_args") or Namespace()).get("data_space"))
            if classes:
                self._set({"data": {"class_path": SEEDS, "init_args": {**data.init_args.as_dict(), **classes}}})
        if subcommand and source is self._checkpoint and source.export:  # the Trainer reads files: weights go in later
            self._section(self.config)["ckpt_path"] = None

    def _set(self, values: dict[str, Any]) -> None:
        subcommand = self.config.get("subcommand")
        self.config = self.parser.parse_object({subcommand: values} if subcommand else values, self.config)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self._built = True  # errors from here on are the checkpoint's or the run's, reported as they are
        if not isinstance(getattr(self, "model", None), ScoreModel):  # e.g. `lit-score submit` reads the config only
            return
        source = self._checkpoint
        if source is not None and source.options:
            check_model_matches(source.options, dict(self.model.hparams))
        if source is not None and source.export:
            load_network_weights(self.model, source, "--ckpt_path")
        elif self._initial is not None and source is None:
            load_network_weights(self.model, self._initial, "--init_weights")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """LightningCLI's, with lit-score's plugins (SLURM requeueing by the Preemption callback only), the
        process-group timeout of ``--dead_rank.timeout`` for a strategy given by name and, for
        predict, test and validate, the output folder (see the module's docstring) instead of the run folder."""
        config = self._section(self.config_init).get("trainer") or {}
        kwargs.setdefault("plugins", without_slurm_auto_requeue(config.get("plugins")))
        if self.subcommand in RUN_OUTPUTS:
            kwargs = {**self._output_options(config), **kwargs}
        watch = self._section(self.config_init).get("dead_rank")
        with process_group_timeout(watch.timeout if isinstance(watch, DeadRank) else DEFAULT_TIMEOUT):
            trainer = super().instantiate_trainer(**kwargs)
        warn_cpu_oversubscription(trainer)
        return trainer

    def _output_options(self, config: dict[str, Any]) -> dict[str, Any]:
        """Trainer options writing to the output folder, without the callbacks that only fit uses, and with a
        PredictionWriter for predict."""
        logger = config.get("logger")
        callbacks = config.get("callbacks") or []
        callbacks = [c for c in (callbacks if isinstance(callbacks, list) else [callbacks])
                     if not isinstance(c, ModelCheckpoint)]
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in callbacks):
            callbacks.append(PredictionWriter())  # e.g. with no YAML at all
        given = self._section(self.config).get("output")
        parent = Path(given).parent if given else output_parent(
            self._checkpoint or self._initial, logger, config.get("default_root_dir"))
        name = Path(given).name if given else None
        if logger is None or logger is True or isinstance(logger, TensorBoardLogger):
            return {"callbacks": callbacks, "logger": OutputLogger(parent, self.subcommand, name)}
        return {"callbacks": callbacks, "default_root_dir": str(parent / (name or next_free(parent, self.subcommand)))}

    def before_fit(self) -> None:
        check_allocation(self.trainer)

    def before_predict(self) -> None:
        """Refuse to run an untrained network unless asked to (``--untrained``), before anything is written."""
        section = self._section(self.config)
        if not (section.get("ckpt_path") or self._checkpoint or section.get("init_weights")
                or section.get("untrained")):
            raise ConfigurationError(
                f"lit-score {self.subcommand} needs trained weights: give --ckpt_path CKPT (a .ckpt, or a "
                f"`lit-score export` folder); to {self.subcommand} the network as the config builds it, untrained, "
                "add --untrained")
        self._started = time.time()

    before_test = before_validate = before_predict

    def after_predict(self) -> None:
        """Say where every output went (rank 0, one line each)."""
        self._report_outputs()

    after_test = after_validate = after_predict

    def _report_outputs(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        logger = trainer.logger
        folder = Path(logger.log_dir if isinstance(logger, TensorBoardLogger) else trainer.default_root_dir)
        since = getattr(self, "_started", 0.0) - 1.0  # a given --output may hold older files
        written = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.stat().st_mtime >= since] \
            if folder.is_dir() else []
        for callback in trainer.callbacks:
            written += [p for p in getattr(callback, "written", []) if p not in written]
        for path in written:
            print(f"lit-score {self.subcommand}: {describe_output(path)}: {path}")


def describe_output(path: Path) -> str:
    """What a file that predict, test or validate wrote holds, in a few words."""
    if path.name.startswith("events.out.tfevents"):
        return "TensorBoard events (metrics)"
    return {"samples.png": "sample grid", "samples.npz": "samples (uint8 images, seeds, nfe)",
            "config.yaml": "the config of this launch", "hparams.yaml": "the model's hyper-parameters"}.get(
        path.name, path.suffix.lstrip(".") or "file")


without_checkpoint_hyperparameters(ScoreCLI)

FROM_CHECKPOINT = ("net", "sde", "loss", "precond")  # what a checkpoint fixes: the score its weights compute
DEFAULTS_FROM_CHECKPOINT = ("sampler", "likelihood")  # what it suggests when the config names none
LINKED = ("num_channels", "image_size", "centered")  # the network's options that the data set
SEEDS = "lit_score.data.seeds.SeedsDataModule"
RUN_OUTPUTS = ("predict", "test", "validate")
LIGHTNING_CKPT_NAMES = ("last", "best")


class ScoreTrainer(L.Trainer):
    """Lightning's Trainer, for the command line: the limit options take an int as a number of batches and a float
    as a fraction, as the Trainer documents (jsonargparse reads Lightning's ``Union[int, float]``, which Python
    before 3.14 may have cached as ``Union[float, int]``, as a float, so ``1`` meant all batches), and a fit that
    fails before its first step removes the run folder it made (no empty ``version_N``)."""

    def __init__(self, *, limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
                 overfit_batches: int | float = 0.0, **kwargs: Any) -> None:
        super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
                         overfit_batches=overfit_batches, **kwargs)

    @functools.wraps(L.Trainer.fit)
    def fit(self, *args: Any, **kwargs: Any) -> None:
        folder = Path(self.log_dir) if self.logger is not None and self.log_dir else None
        fresh = folder is not None and not folder.exists()
        try:
            return super().fit(*args, **kwargs)
        except BaseException:
            if fresh and self.global_step == 0 and self.is_global_zero:
                shutil.rmtree(folder, ignore_errors=True)
            raise


class OutputLogger(TensorBoardLogger):
    """TensorBoard logging into ``<parent>/<name>``, by default the next free ``<parent>/<prefix>_<N>``, chosen
    when first needed (so the processes of a DDP run agree through ``trainer.log_dir``)."""

    def __init__(self, parent: Path, prefix: str, name: str | None = None) -> None:
        super().__init__(save_dir=str(parent), name="", version=name, default_hp_metric=False)
        self._folder_prefix, self._folder_name = prefix, name  # (TensorBoardLogger's _prefix is the metrics')

    @property
    def version(self) -> str:
        if self._folder_name is None:
            self._folder_name = next_free(Path(self.save_dir), self._folder_prefix)
        return self._folder_name


class RunConfig(SaveConfigCallback):
    """Lightning's SaveConfigCallback, writing a config that says what ran and not where this machine keeps it: no
    logger version, no absolute ``save_dir`` (relative to the current directory when below it, else ``runs``) or
    ``default_root_dir``, and, for a fit, no ``ckpt_path`` (``fit --resume`` gives it); no ``--output``."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self.config = portable_config(self.config, stage)
        super().setup(trainer, pl_module, stage)


def portable_config(config: Namespace, stage: str) -> Namespace:
    """A copy of ``config`` without the machine's run location (see :class:`RunConfig`)."""
    config = config.clone()
    trainer = config.get("trainer")
    if isinstance(trainer, Namespace):
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = logger.get("init_args") if isinstance(logger, Namespace) else None
            if not isinstance(init, Namespace):
                continue
            if init.get("version") is not None:
                init["version"] = None
            if isinstance(init.get("save_dir"), str) and os.path.isabs(init["save_dir"]):
                init["save_dir"] = relative_or(init["save_dir"], "runs")
        if isinstance(trainer.get("default_root_dir"), str) and os.path.isabs(trainer["default_root_dir"]):
            trainer["default_root_dir"] = None
    for key in ("output",) + (("ckpt_path",) if stage == "fit" else ()):
        if config.get(key) is not None:
            config[key] = None
    return config


def relative_or(path: str, default: str) -> str:
    """``path`` relative to the current directory when it lies below it, else ``default``."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return default


def next_free(parent: Path, prefix: str) -> str:
    """``<prefix>_<N>``, N one more than the largest already in ``parent`` (0 for the first)."""
    numbers = [int(p.name[len(prefix) + 1:]) for p in parent.glob(f"{prefix}_*")
               if p.name[len(prefix) + 1:].isdigit()] if parent.is_dir() else []
    return f"{prefix}_{max(numbers, default=-1) + 1}"


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is the folder of a training run (``config.yaml`` and ``checkpoints/``)."""
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def output_parent(source: CheckpointSource | None, logger: Any, default_root_dir: str | None) -> Path:
    """Where the ``<subcommand>_<N>`` folders of predict, test, validate and lit-score-eval go: the checkpoint's
    run folder when it is one and this user may write there; else ``<save_dir>/<name>``, with the TensorBoard
    logger's save_dir (default: ``runs`` in ``default_root_dir`` or the current directory) and the name of the
    checkpoint's experiment, export folder or file (``untrained`` without one)."""
    run = source.run_dir if source is not None else None
    if run is not None and os.access(run, os.W_OK):
        return run
    if isinstance(logger, TensorBoardLogger):
        root = Path(logger.save_dir)
    else:
        root = Path(default_root_dir or ".") / "runs"
    return root / (source.name if source is not None else "untrained")


# -- what a checkpoint or export holds --------------------------------------------------------------------------------
@dataclass
class CheckpointSource:
    """A checkpoint file or export folder, read once: the model options it fixes (``FROM_CHECKPOINT``, those
    recorded), those it suggests (``DEFAULTS_FROM_CHECKPOINT``), the arguments of a
    :class:`~lit_score.data.seeds.SeedsDataModule` in its data space (None when it records none), and the
    checkpoint as loaded (memory-mapped; None for an export)."""

    path: Path
    export: bool
    options: dict[str, Any]
    defaults: dict[str, Any]
    seeds: dict[str, Any] | None
    loaded: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path | None:
        """The training run folder the checkpoint lies in (``<run>/checkpoints/<file>``), if it does."""
        if self.export or self.path.parent.name != "checkpoints":
            return None
        return self.path.parent.parent

    @property
    def name(self) -> str:
        """The experiment's name for a run's checkpoint, else the export folder's or the file's."""
        run = self.run_dir
        if run is not None:
            return run.resolve().parent.name
        return self.path.resolve().name if self.export else self.path.stem


def option_value(argv: list[str], option: str) -> str | None:
    """The last value of ``option`` (``--name VALUE`` or ``--name=VALUE``) in a command line."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def is_local_path(value: Any) -> bool:
    """Whether a ``--ckpt_path`` value names a local file or folder (not ``last``, ``best``, ``hpc`` or a URL)."""
    return isinstance(value, (str, Path)) and bool(str(value)) and str(value) not in LIGHTNING_CKPT_NAMES \
        and not str(value).startswith(("hpc", "registry")) and "://" not in str(value)


def used(paths: dict[str, Any]) -> dict[str, str]:
    """The local paths among ``ckpt_path`` and ``init_weights`` that are read: ``init_weights`` only without a
    ``ckpt_path``, whose weights replace them (a resumed or evaluated run never needs the weights it started from)."""
    local = {key: value for key, value in paths.items() if is_local_path(value)}
    if paths.get("ckpt_path"):
        local.pop("init_weights", None)
    return local


def classifier_classes(model: dict[str, Any], space: dict[str, Any] | None) -> dict[str, Any]:
    """For an unconditional model guided by a classifier, the seeds' data space with the classifier's classes (the
    labels it guides towards); else nothing."""
    guidance = model.get("guidance") or {}
    path = (guidance.get("init_args") or {}).get("classifier")
    if not str(guidance.get("class_path", "")).endswith("ClassifierGuidance") or not isinstance(path, str) or \
            not isinstance(space, dict) or space.get("num_classes") or not Path(path).exists():
        return {}
    classes = (read_checkpoint(path).seeds or {}).get("data_space") or {}
    if not classes.get("num_classes"):
        return {}
    return {"data_space": {**space, **{k: classes.get(k) for k in ("num_classes", "class_names", "class_counts")}}}


def read_checkpoint(path: str | Path, option: str = "ckpt_path") -> CheckpointSource:
    """What ``path`` (a .ckpt or a ``lit-score export`` folder) holds; the .ckpt is read once, memory-mapped."""
    path = Path(path)
    if not path.exists() and option == "init_weights":
        raise CheckpointError(f"--init_weights {path}: not found; give the .ckpt or `lit-score export` folder of the "
                              "model to start from (an experiment YAML that names one says how to train it)")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; give a .ckpt file, a `lit-score export` folder, or "
                              "`last` to resume the newest checkpoint of the run")
    if path.is_dir():
        return checkpoint_source(path, True, export_hyperparameters(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - reported as one line
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CorruptCheckpointError(corrupt_message(path, problem)) from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read the checkpoint {path} with torch.load(weights_only=True): "
                              f"{first}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    try:
        hparams = upgrade_model_config(hparams if isinstance(hparams, dict) else {})
    except ValueError as err:
        raise CheckpointError(f"the checkpoint {path}: {err}") from err
    return checkpoint_source(path, False, hparams, checkpoint if isinstance(checkpoint, dict) else None)


def checkpoint_source(path: Path, export: bool, hparams: dict[str, Any],
                      loaded: dict[str, Any] | None = None) -> CheckpointSource:
    recorded = isinstance(hparams.get("net"), dict) and isinstance(hparams.get("sde"), dict)
    options = {k: hparams[k] for k in FROM_CHECKPOINT if k in hparams} if recorded else {}
    defaults = {k: hparams[k] for k in DEFAULTS_FROM_CHECKPOINT if isinstance(hparams.get(k), dict)}
    net_args = (options.get("net") or {}).get("init_args") or {}
    linked = {k: net_args[k] for k in LINKED if k in net_args}
    space = hparams.get("data_space")
    if space is None and {"num_channels", "image_size"} <= linked.keys() and isinstance(linked.get("centered"), bool):
        space = DataSpace.image(linked["num_channels"], linked["image_size"], linked["centered"]).to_dict()
    seeds = {"data_space": space, **linked} if isinstance(space, dict) else None
    return CheckpointSource(path, export, options, defaults, seeds, loaded)


def with_checkpoint_base(argv: list[str], subcommand: str | None, *sources: CheckpointSource) -> list[str]:
    """``argv`` with the model options of the first of ``sources`` (``--ckpt_path``'s, else ``--init_weights``')
    and, for predict and lit-score-eval, its seeds-only data, as the first config: under every YAML and option of
    the command line."""
    if not sources:
        return argv
    source = sources[0]
    base: dict[str, Any] = {"model": dict(source.options)} if source.options else {}
    if source.seeds is not None and subcommand in ("predict", None):
        base["data"] = {"class_path": SEEDS, "init_args": dict(source.seeds)}
    if not base:
        return argv
    at = argv.index(subcommand) + 1 if subcommand in argv else 0
    return [*argv[:at], "--config", yaml.safe_dump(_lists(base), sort_keys=False), *argv[at:]]


def _lists(value: Any) -> Any:
    """``value`` with tuples as lists (as YAML writes them)."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def serves_seeds_only(class_path: str) -> bool:
    """Whether a DataModule's predict data are lit-score's seeds (``ScoreDataModule.predict_dataloader``)."""
    from lit_score.data.base import ScoreDataModule

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, ScoreDataModule) and \
        cls.predict_dataloader is ScoreDataModule.predict_dataloader


def _same(saved: Any, asked: Any) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(asked, (list, tuple)):
        return len(saved) == len(asked) and all(_same(s, a) for s, a in zip(saved, asked))
    return saved == asked


def _conflicts(saved: Any, asked: Any, key: str, skip: tuple[str, ...] = ()) -> list[str]:
    if isinstance(saved, dict) and isinstance(asked, dict):
        if saved.get("class_path") != asked.get("class_path"):
            return _conflicts(saved.get("class_path"), asked.get("class_path"), f"{key}.class_path")
        saved_args, asked_args = saved.get("init_args") or {}, asked.get("init_args") or {}
        return [c for k in saved_args if k not in skip and k in asked_args
                for c in _conflicts(saved_args[k], asked_args[k], f"{key}.init_args.{k}")]
    return [] if _same(saved, asked) else [f"{key} is {asked!r} here but {saved!r} in the checkpoint"]


def checkpoint_conflicts(fixed: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """Each option that the parsed ``model`` config asks for differently from the checkpoint's ``fixed`` ones,
    as "key is X here but Y in the checkpoint" (the data's options linked into the network are checked later)."""
    return [c for key, saved in fixed.items()
            for c in _conflicts(saved, model.get(key), f"model.{key}", LINKED if key == "net" else ())]


def conflict_message(source: CheckpointSource, conflicts: list[str], subcommand: str | None) -> str:
    what = "an export" if source.export else "a checkpoint"
    fix = (f"to train the network configured here from the checkpoint's weights, in a new run, give --init_weights "
           f"{source.path} instead of --ckpt_path") if subcommand == "fit" else (
        f"to run the network configured here with the checkpoint's weights (their shapes must fit), give them with "
        f"--init_weights {source.path} instead of --ckpt_path")
    return (f"--ckpt_path {source.path} is {what} of another network, SDE, loss or preconditioning than this "
            f"config asks for: {'; '.join(conflicts)}. To use the checkpoint as it is, drop these options (or run "
            f"with its own config.yaml); {fix}")


def load_network_weights(model: ScoreModel, source: CheckpointSource, option: str) -> None:
    """Put the sampling weights of a checkpoint (its EMA network's when it has one) or export into the network;
    a fit's EMA callback then starts the EMA network from them."""
    if source.export:
        state = load_weights(source.path)
    else:
        try:
            checkpoint = upgrade_checkpoint(dict(source.loaded or {}))
        except ValueError as err:
            raise CheckpointError(f"{option} {source.path}: {err}") from err
        state = sampling_state(checkpoint.get("state_dict") or {})
    mismatch = state_mismatch(model.net, state)
    if mismatch:
        raise CheckpointError(f"{option} {source.path} does not fit the network this config builds: {mismatch}; "
                              "give the network options of the run that made it")
    model.net.load_state_dict(state, strict=True)


def without_slurm_auto_requeue(plugins: Any) -> Any:
    """Inside a SLURM job, the Trainer's plugins with ``SLURMEnvironment(auto_requeue=False)``: lit-score's
    Preemption callback saves and requeues (after its checkpoint), so Lightning's own handler stays off (and quiet)."""
    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not SLURMEnvironment.detect() or any(isinstance(p, ClusterEnvironment) for p in listed):
        return plugins
    return [*listed, SLURMEnvironment(auto_requeue=False)]


def warn_cpu_oversubscription(trainer: L.Trainer) -> None:
    """Warn when more CPU processes are asked for than there are cores: they would share cores, each slower."""
    from lightning.pytorch.accelerators import CPUAccelerator

    cores = affinity_cpus()
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        rank_zero_warn(f"--trainer.devices {trainer.num_devices} starts {trainer.num_devices} CPU processes on "
                       f"{cores} core(s): they share the cores and each runs slower; set --trainer.devices {cores} "
                       "or fewer", category=UserWarning)


def _data_space_dict(datamodule: L.LightningDataModule) -> dict:
    return data_space_of(datamodule).to_dict()


def _differences(saved: Any, built: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(built, dict):
        return [d for k in saved for d in _differences(saved[k], built.get(k), f"{prefix}.{k}")]
    return [] if _same(saved, built) else [f"{prefix} is {built!r} here but {saved!r} in the checkpoint"]


def check_model_matches(saved: dict, built: dict) -> None:
    """Stop when the network the run built is not the checkpoint's: the data set its linked inputs
    (num_channels, image_size, centered), which must then be set to the checkpoint's values."""
    problems = [d for key in saved for d in _differences(saved[key], built.get(key), f"model.{key}")]
    if problems:
        fix = "; ".join(problems)
        raise CheckpointError(f"the checkpoint's network does not match this run's: {fix}. The network, SDE and "
                              "loss come from the checkpoint; set the data options that feed them (e.g. "
                              "--data.init_args.image_size) to the checkpoint's values.")


def run_cli(argv: list[str] | None = None) -> ScoreCLI:
    """Parse ``argv`` (default: the command line) and run the chosen subcommand."""
    from_command_line = argv is None
    try:
        args = expand_config_args(resume_args(sys.argv[1:] if from_command_line else list(argv)))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigurationError(str(err)) from err
    if from_command_line:  # the expanded command line, also for the processes DDP launches from it
        sys.argv[1:] = args
    try:
        return ScoreCLI(args=None if from_command_line else args, save_config_callback=RunConfig,
                        save_config_kwargs={"overwrite": True})
    except OmegaConfBaseException as err:
        # jsonargparse resolves interpolations before it reports invalid keys, so a typo can surface here.
        raise ConfigurationError(f"the config's interpolations do not resolve: {err}. Check the interpolated keys, "
                                 "and the config for misspelt keys, which stop them resolving.") from err


def fit_main() -> int:
    """``lit-score fit|validate|test|predict``: the exit status is 128 + the signal number after a signal stopped
    the run, else 0."""
    try:
        cli = run_cli()
    except Interrupted as stop:  # a signal inside validation or a callback's sampling, after its checkpoint
        if rank_zero_only.rank == 0:
            print(f"lit-score: {stop}", file=sys.stderr)
        return stop.code
    preemption = next((cb for cb in cli.trainer.callbacks if isinstance(cb, Preemption)), None)
    if preemption is not None and preemption.exit_code:
        if cli.trainer.is_global_zero:
            where = f"; {preemption.checkpoint_path} is at step {cli.trainer.global_step}" \
                if preemption.checkpoint_path else ""
            resume = f": resume with `lit-score fit --resume {cli.trainer.log_dir}`" if cli.trainer.log_dir else ""
            print(f"lit-score: stopped by {preemption.stopped_by.name}{where}{resume}", file=sys.stderr)
        return preemption.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(fit_main())
