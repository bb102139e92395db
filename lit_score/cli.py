"""``lit-score``: LightningCLI over ScoreModel and any LightningDataModule, configured by experiment YAMLs."""
from __future__ import annotations

import sys
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from omegaconf.errors import OmegaConfBaseException

from lit_score.config import ConfigError, expand_config_args
from lit_score.module import ScoreModel
from lit_score.preemption import Preemption
from lit_score.resume import RandomState
from lit_score.slurm import check_allocation, submit_main


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


def run_cli(argv: list[str] | None = None) -> ScoreCLI:
    """Parse ``argv`` (default: the command line) and run the chosen subcommand."""
    from_command_line = argv is None
    try:
        args = expand_config_args(sys.argv[1:] if from_command_line else list(argv))
    except ConfigError as err:
        sys.exit(f"lit-score: error: {err}")
    if from_command_line:  # the expanded command line, also for the processes DDP launches from it
        sys.argv[1:] = args
    try:
        return ScoreCLI(args=None if from_command_line else args, save_config_kwargs={"overwrite": True})
    except OmegaConfBaseException as err:
        # jsonargparse resolves interpolations before it reports invalid keys, so a typo can surface here.
        sys.exit(f"lit-score: error: the config's interpolations do not resolve: {err}\n"
                 "Check the interpolated keys, and the config for misspelt keys, which stop them resolving.")


def main() -> None:
    """Console script ``lit-score``."""
    if sys.argv[1:2] == ["submit"]:
        sys.exit(submit_main(sys.argv[2:]))
    run_cli()


if __name__ == "__main__":
    main()
