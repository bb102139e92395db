"""Experiment YAMLs that compose: a top-level ``defaults: [base.yaml, ...]`` list names files (relative to the
YAML) merged underneath it, as in Hydra. Interpolations (``${model.sde.sigma_max}``) resolve after the
merge and after command-line overrides (jsonargparse's ``omegaconf+`` mode)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from lit_score.cli.resources import experiment_names, packaged_experiment
from lit_score.errors import ConfigurationError
from lit_score.runtime.upgrade import upgrade_class_path

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
    renamed = isinstance(content, dict) and _upgrade_names(content, path)
    if not isinstance(content, dict) or DEFAULTS_KEY not in content:
        return [yaml.safe_dump(content, sort_keys=False) if renamed else str(path)]
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


def _upgrade_names(content: dict[str, Any], path: Path) -> bool:
    """Rename the class paths of release 0.1 in a YAML (in place, with a note); refuse its moved options."""
    net = (content.get("model") or {}).get("net") if isinstance(content.get("model"), dict) else None
    if isinstance(net, dict) and "scale_by_sigma" in (net.get("init_args") or {}):
        raise ConfigError(f"{path}: model.net.init_args.scale_by_sigma moved to the preconditioning; delete it (VE "
                          "models scale by sigma by default) or set model.precond: {class_path: "
                          "lit_score.diffusion.denoiser.ScorePrediction, init_args: {scale_by_sigma: false}}")
    renamed: list[str] = []

    def visit(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in list(items):
            if key == "class_path" and isinstance(value, str) and upgrade_class_path(value) != value:
                node[key] = upgrade_class_path(value)
                renamed.append(f"{value} -> {node[key]}")
            else:
                visit(value)

    visit(content)
    if renamed:
        print(f"note: {path} uses class paths of lit-score 0.1, read as today's: {'; '.join(renamed)}",
              file=sys.stderr)
    return bool(renamed)


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
