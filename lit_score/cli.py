"""``lit-score``: LightningCLI over ScoreModel and any LightningDataModule, configured by experiment YAMLs."""
from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_score.config import ConfigError, expand_config_args
from lit_score.module import ScoreModel


class ScoreCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decide the network's input shape; nobody sets it twice.
        parser.link_arguments("data.num_channels", "model.net.init_args.num_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.net.init_args.image_size", apply_on="instantiate")


def main(argv: list[str] | None = None) -> ScoreCLI:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = expand_config_args(argv)
    except ConfigError as err:
        sys.exit(f"lit-score: error: {err}")
    return ScoreCLI(
        ScoreModel,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=argv,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
