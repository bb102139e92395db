"""``lit-score``: LightningCLI over ScoreModel and any LightningDataModule, configured by experiment YAMLs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf.errors import OmegaConfBaseException

from lit_score.callbacks.dashboard import Dashboard
from lit_score.cli.allocation import check_allocation
from lit_score.runtime.checkpoint_io import CorruptCheckpointError, checkpoint_problem, corrupt_message
from lit_score.cli.config import ConfigError, expand_config_args
from lit_score.data_space import data_space_of
from lit_score.errors import CheckpointError, ConfigurationError
from lit_score.runtime.pretrained import WEIGHTS_NAME, check_state, load_weights, model_options
from lit_score.runtime.module import ScoreModel
from lit_score.runtime.upgrade import upgrade_model_config
from lit_score.callbacks.preemption import Preemption
from lit_score.callbacks.resume import RandomState, resume_args
from lit_score.cli.threads import affinity_cpus


class ScoreCLI(LightningCLI):
    """LightningCLI over ScoreModel and any DataModule (by class_path), in OmegaConf mode.

    Interpolations resolve after command-line overrides (``omegaconf+``) and are kept relative to where they
    stand, so they resolve below a subcommand too (and a misspelt key is reported by name).
    """

    def __init__(self, model_class: type[L.LightningModule] = ScoreModel,
                 datamodule_class: type[L.LightningDataModule] = L.LightningDataModule, **kwargs: Any) -> None:
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs["parser_kwargs"] = {"parser_mode": "omegaconf+", **kwargs.get("parser_kwargs", {})}
        super().__init__(model_class, datamodule_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decide the network's input shape and range; nobody sets them twice.
        for key in ("num_channels", "image_size", "centered"):
            parser.link_arguments(f"data.{key}", f"model.net.init_args.{key}", apply_on="instantiate")
        # ... and the model carries the data space (shape, range, quantisation) that its consumers read.
        parser.link_arguments("data", "model.data_space", compute_fn=_data_space_dict, apply_on="instantiate")
        # Interpolated by the EMA callback of experiments/base/trainer.yaml, so an architecture's YAML sets it.
        parser.add_argument("--ema_rate", type=float, default=0.9999,
                            help="EMA rate of the experiment (score_sde: 0.999 for NCSN++, 0.9999 for DDPM++)")
        # Every fit can be pre-empted and resumed exactly: see lit_score.callbacks.preemption and lit_score.callbacks.resume.
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(Preemption, "preemption")
        # TensorBoard's custom-scalars layout and HParams tab: see lit_score.callbacks.dashboard.
        parser.add_lightning_class_args(Dashboard, "dashboard")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI's, without its warning that ``args`` and ``sys.argv`` are both given (``run_cli`` and
        ``lit-score submit`` pass the expanded command line on purpose), and keeping integer limits integers."""
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        self._integer_limits = {} if isinstance(args, (dict, Namespace)) else \
            integer_limits(sys.argv[1:] if args is None else list(args))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        for name, value in getattr(self, "_integer_limits", {}).items():
            if config.get(name) == value:  # the option, parsed as a float on the way
                config[name] = value
        config["plugins"] = without_slurm_auto_requeue(config.get("plugins"))
        trainer = super()._instantiate_trainer(config, callbacks)
        warn_cpu_oversubscription(trainer)
        return trainer

    def before_fit(self) -> None:
        check_allocation(self.trainer)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path FILE``, the network, SDE and loss come from the checkpoint (they define the score its
        weights compute); every other model option (sampler, likelihood, ...) comes from the config and the
        command line, as without a checkpoint. Lightning's own rule lets the checkpoint override everything."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else self.config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_dir():  # a `lit-score export` folder: its weights go in after instantiation
            self._pretrained, self._ckpt_model = pretrained_folder(ckpt_path)
            section = {"model": self._ckpt_model}
            self.config = self.parser.parse_object({subcommand: section} if subcommand else section, self.config)
            if subcommand:  # Lightning's trainer reads only files
                self.config[subcommand]["ckpt_path"] = None
            return
        if not subcommand or not ckpt_path or not Path(ckpt_path).is_file():
            return
        self._ckpt_model = checkpoint_model_config(ckpt_path)
        if self._ckpt_model:
            self.config = self.parser.parse_object({subcommand: {"model": self._ckpt_model}}, self.config)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        saved = getattr(self, "_ckpt_model", None)
        if saved and isinstance(self.model, ScoreModel):
            check_model_matches(saved, dict(self.model.hparams))
        if getattr(self, "_pretrained", None):
            load_pretrained_weights(self.model, self._pretrained)

    def _run_subcommand(self, subcommand: str) -> None:
        # A fit that fails before its first step leaves no run directory behind (no empty version_N).
        logger = self.trainer.logger if subcommand == "fit" else None
        log_dir = Path(logger.log_dir) if logger is not None and logger.log_dir else None
        new = log_dir is not None and not log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if new and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                shutil.rmtree(log_dir, ignore_errors=True)
            raise


FROM_CHECKPOINT = ("net", "sde", "loss", "precond")
# Trainer options whose int means a count (of batches, steps) and whose float means a fraction.
COUNT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                     "val_check_interval", "overfit_batches")
LIGHTNING_CKPT_NAMES = ("last", "best")


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


def integer_limits(args: list[str]) -> dict[str, int]:
    """The options in ``COUNT_OR_FRACTION`` written as integers on the command line. ``--trainer.limit_test_batches 1``
    is one batch, but jsonargparse turns the ``1`` into the float 1.0, which Lightning reads as 100% of the
    batches; the CLI gives the Trainer these integers."""
    integers: dict[str, int] = {}
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(args):
            value = args[i + 1]
        name = key.removeprefix("--trainer.")
        if key.startswith("--trainer.") and name in COUNT_OR_FRACTION and value.strip().lstrip("+").isdigit():
            integers[name] = int(value)
    return integers


def _data_space_dict(datamodule: L.LightningDataModule) -> dict:
    return data_space_of(datamodule).to_dict()


def checkpoint_model_config(ckpt_path: str | Path) -> dict:
    """The options in ``FROM_CHECKPOINT`` as the checkpoint saved them (empty for a checkpoint without them)."""
    try:
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as err:  # noqa: BLE001 - reported as a one-line CLI error
        raise CheckpointError(f"cannot read the checkpoint {ckpt_path}: {type(err).__name__}: {err}") from err
    try:
        hparams = upgrade_model_config(ckpt.get("hyper_parameters") or {})
    except ValueError as err:
        raise CheckpointError(f"the checkpoint {ckpt_path}: {err}") from err
    return {key: hparams[key] for key in FROM_CHECKPOINT if key in hparams}


def pretrained_folder(folder: str) -> tuple[str, dict]:
    """The folder and the model options of its config.json (:class:`PretrainedError` if it is no lit-score
    export)."""
    return folder, model_options(folder)


def load_pretrained_weights(model: ScoreModel, folder: str) -> None:
    """Put an export's weights (the weights to sample with) into the network; in a fit, the EMA callback then
    starts the model's EMA network from them."""
    state = load_weights(folder)
    check_state(model.net, state, str(Path(folder) / WEIGHTS_NAME))
    model.net.load_state_dict(state, strict=True)


def _differences(saved: Any, built: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(built, dict):
        return [d for k in saved for d in _differences(saved[k], built.get(k), f"{prefix}.{k}")]
    same = saved == built or (isinstance(saved, (list, tuple)) and isinstance(built, (list, tuple))
                              and list(saved) == list(built))
    return [] if same else [f"{prefix} is {built!r} here but {saved!r} in the checkpoint"]


def check_model_matches(saved: dict, built: dict) -> None:
    """Stop when the network the run built is not the checkpoint's: the data set its linked inputs
    (num_channels, image_size, centered), which must then be set to the checkpoint's values."""
    problems = [d for key in saved for d in _differences(saved[key], built.get(key), f"model.{key}")]
    if problems:
        fix = "; ".join(problems)
        raise CheckpointError(f"the checkpoint's network does not match this run's: {fix}. The network, SDE and "
                              "loss come from the checkpoint; set the data options that feed them (e.g. "
                              "--data.init_args.image_size) to the checkpoint's values.")


def check_ckpt_path(args: list[str]) -> None:
    """Raises :class:`CorruptCheckpointError` for a ``--ckpt_path`` file that is truncated or corrupt, before
    anything reads it."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--ckpt_path" and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else None)
        if path is None or path in LIGHTNING_CKPT_NAMES or path.startswith(("hpc", "registry")) or "://" in path:
            continue
        if not Path(path).exists():
            raise CheckpointError(f"checkpoint not found: {path}; give a .ckpt file, a `lit-score export` folder, "
                                  "or `last` to resume the newest checkpoint of the run")
        if Path(path).is_file():
            problem = checkpoint_problem(path)
            if problem is not None:
                raise CorruptCheckpointError(corrupt_message(path, problem))


def run_cli(argv: list[str] | None = None) -> ScoreCLI:
    """Parse ``argv`` (default: the command line) and run the chosen subcommand."""
    from_command_line = argv is None
    try:
        args = expand_config_args(resume_args(sys.argv[1:] if from_command_line else list(argv)))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigurationError(str(err)) from err
    check_ckpt_path(args)
    if from_command_line:  # the expanded command line, also for the processes DDP launches from it
        sys.argv[1:] = args
    try:
        return ScoreCLI(args=None if from_command_line else args, save_config_kwargs={"overwrite": True})
    except OmegaConfBaseException as err:
        # jsonargparse resolves interpolations before it reports invalid keys, so a typo can surface here.
        raise ConfigurationError(f"the config's interpolations do not resolve: {err}. Check the interpolated keys, "
                                 "and the config for misspelt keys, which stop them resolving.") from err


def fit_main() -> int:
    """``lit-score fit|validate|test|predict``: the exit status is 128 + the signal number after a signal stopped
    the run, else 0."""
    cli = run_cli()
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
