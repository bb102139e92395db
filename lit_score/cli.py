"""``lit-score``: LightningCLI over ScoreModel and any LightningDataModule, configured by experiment YAMLs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from omegaconf.errors import OmegaConfBaseException

from lit_score.checkpoint_io import CorruptCheckpointError, checkpoint_problem, corrupt_message
from lit_score.config import ConfigError, expand_config_args
from lit_score.module import ScoreModel
from lit_score.preemption import Preemption
from lit_score.resume import RandomState, resume_args
from lit_score.slurm import SlurmAllocationError, check_allocation, submit_main


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
        # Interpolated by the EMA callback of experiments/base/trainer.yaml, so an architecture's YAML sets it.
        parser.add_argument("--ema_rate", type=float, default=0.9999,
                            help="EMA rate of the experiment (score_sde: 0.999 for NCSN++, 0.9999 for DDPM++)")
        # Every fit can be pre-empted and resumed exactly: see lit_score.preemption and lit_score.resume.
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(Preemption, "preemption")

    def before_fit(self) -> None:
        check_allocation(self.trainer)

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


def check_ckpt_path(args: list[str]) -> None:
    """Raises :class:`CorruptCheckpointError` for a ``--ckpt_path`` file that is truncated or corrupt, before
    anything reads it."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--ckpt_path" and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else None)
        if path and Path(path).is_file():
            problem = checkpoint_problem(path)
            if problem is not None:
                raise CorruptCheckpointError(corrupt_message(path, problem))


def run_cli(argv: list[str] | None = None) -> ScoreCLI:
    """Parse ``argv`` (default: the command line) and run the chosen subcommand."""
    from_command_line = argv is None
    try:
        args = expand_config_args(resume_args(sys.argv[1:] if from_command_line else list(argv)))
    except (ConfigError, ValueError) as err:
        sys.exit(f"lit-score: error: {err}")
    check_ckpt_path(args)
    if from_command_line:  # the expanded command line, also for the processes DDP launches from it
        sys.argv[1:] = args
    try:
        return ScoreCLI(args=None if from_command_line else args, save_config_kwargs={"overwrite": True})
    except OmegaConfBaseException as err:
        # jsonargparse resolves interpolations before it reports invalid keys, so a typo can surface here.
        sys.exit(f"lit-score: error: the config's interpolations do not resolve: {err}\n"
                 "Check the interpolated keys, and the config for misspelt keys, which stop them resolving.")


def main() -> None:
    """Console script ``lit-score``: exits 2 on a bad checkpoint or allocation (not worth a retry), and with
    128 + the signal number after a signal stopped the run."""
    if sys.argv[1:2] == ["submit"]:
        sys.exit(submit_main(sys.argv[2:]))
    try:
        cli = run_cli()
    except (CorruptCheckpointError, SlurmAllocationError) as err:
        print(f"lit-score: error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
    preemption = next((cb for cb in cli.trainer.callbacks if isinstance(cb, Preemption)), None)
    if preemption is not None and preemption.exit_code:
        if cli.trainer.is_global_zero:
            where = f"; {preemption.checkpoint_path} is at step {cli.trainer.global_step}" \
                if preemption.checkpoint_path else ""
            resume = f": resume with `lit-score fit --resume {cli.trainer.log_dir}`" if cli.trainer.log_dir else ""
            print(f"lit-score: stopped by {preemption.stopped_by.name}{where}{resume}", file=sys.stderr)
        sys.exit(preemption.exit_code)


if __name__ == "__main__":
    main()
