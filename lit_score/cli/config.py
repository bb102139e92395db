"""Experiment YAMLs that compose: a top-level ``defaults: [base.yaml, ...]`` list names files (relative to the
YAML) merged underneath it, as in Hydra. Interpolations (``${model.sde.sigma_max}``) resolve after the
merge and after command-line overrides (jsonargparse's ``omegaconf+`` mode)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from lit_score.errors import ConfigurationError
from lit_score.cli.resources import experiment_names, packaged_experiment

DEFAULTS_KEY = "defaults"


class ConfigError(ConfigurationError):
    """An experiment YAML that cannot be read or composed."""


def compose(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[str]:
    """The config documents for ``path``: its defaults first (recursively), then the file itself."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config defaults form a cycle: {chain}")
    text = path.read_text()
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(content, dict) or DEFAULTS_KEY not in content:
        return [str(path)]
    defaults = content.pop(DEFAULTS_KEY)
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: '{DEFAULTS_KEY}' must be a list of YAML paths, got {defaults!r}")
    documents: list[str] = []
    for d in defaults:
        documents += compose(path.parent / d, (*_seen, resolved))
    documents.append(yaml.safe_dump(content, sort_keys=False))
    return documents


def expand_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config FILE`` by one ``--config`` per composed document."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = resolve_config(value)
        if path is not None:
            for doc in compose(path):
                out += ["--config", doc]
        else:
            out += ["--config", value]
    return out


def resolve_config(value: str) -> Path | None:
    """The YAML file that ``--config value`` names: a file, else a packaged experiment (``quickstart``,
    ``experiments/quickstart.yaml`` from any directory); None for an inline YAML document."""
    if "\n" in value or ": " in value:
        return None  # an inline YAML document (as the processes DDP launches receive them)
    try:
        if Path(value).is_file():
            return Path(value)
    except OSError:  # e.g. a name too long for a path
        return None
    packaged = packaged_experiment(value)
    if packaged is not None:
        return packaged
    if value.endswith((".yaml", ".yml")) or re.fullmatch(r"[\w./-]+", value):
        known = ", ".join(experiment_names())
        raise ConfigError(f"config file not found: {value} (neither a file nor a packaged experiment; "
                          f"packaged: {known})")
    return None
