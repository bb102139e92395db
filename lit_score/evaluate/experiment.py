"""An experiment's model and data built from its YAML exactly as ``lit-score`` builds them, without a Trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L

from lit_score.cli.lightning_cli import ScoreCLI
from lit_score.cli.config import ConfigError, expand_config_args, resolve_config
from lit_score.runtime.module import ScoreModel



class ExperimentCLI(ScoreCLI):
    """``ScoreCLI`` that instantiates the model, the data and the trainer's arguments (callbacks included) but
    no Trainer: ``trainer_config`` holds what the Trainer would have been given."""

    trainer_config: dict[str, Any]

    def instantiate_trainer(self, **kwargs: Any) -> None:
        self.trainer_config = {**(self._section(self.config_init).get("trainer") or {}), **kwargs}
        return None


@dataclass
class Experiment:
    model: ScoreModel
    datamodule: L.LightningDataModule
    trainer_config: dict[str, Any] = field(default_factory=dict)
    config_path: Path | None = None


def experiment_path(name_or_path: str | Path) -> Path:
    """The YAML of a packaged experiment's name (``quickstart``) or of a path; raises naming the known experiments."""
    try:
        path = resolve_config(str(name_or_path))
    except ConfigError as err:
        raise FileNotFoundError(str(err)) from None
    if path is None:
        raise FileNotFoundError(f"experiment config not found: {name_or_path}")
    return path


def build_experiment(config: str | Path, overrides: Sequence[str] = (),
                     cli_class: type[ExperimentCLI] = ExperimentCLI) -> ExperimentCLI:
    """Parse ``--config <config>`` plus command-line style ``overrides`` and instantiate everything but a Trainer."""
    path = experiment_path(config)
    args = expand_config_args(["--config", str(path), *overrides])
    return cli_class(run=False, args=args, save_config_callback=None)


def load_experiment(config: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """The model, data and trainer arguments of an experiment YAML (a name in ``experiments/`` or a path)."""
    cli = build_experiment(config, overrides)
    return Experiment(cli.model, cli.datamodule, cli.trainer_config, experiment_path(config))
