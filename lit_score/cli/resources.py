"""Files that ship inside the package: the experiment YAMLs (``lit_score.experiments``, the repository's
``experiments/``) and the sbatch templates (``lit_score.sbatch``, the repository's ``slurm/``)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _package_dir(package: str) -> Path:
    path = Path(str(files(package)))
    if not path.is_dir():
        raise FileNotFoundError(f"{package} is not a folder on disk ({path}); install lit-score unzipped")
    return path


def experiments_dir() -> Path:
    """The folder of the packaged experiment YAMLs."""
    return _package_dir("lit_score.experiments")


def sbatch_dir() -> Path:
    """The folder of the packaged sbatch templates."""
    return _package_dir("lit_score.sbatch")


def experiment_names() -> list[str]:
    """The packaged experiments, by the name ``--config NAME`` accepts."""
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


def packaged_experiment(value: str) -> Path | None:
    """The packaged YAML that ``value`` names (``quickstart``, ``quickstart.yaml`` or ``experiments/quickstart.yaml``,
    ``experiments/base/ddpmpp.yaml``), or None."""
    relative = Path(value)
    if relative.is_absolute():
        return None
    if relative.parts[:1] == ("experiments",):
        relative = Path(*relative.parts[1:])
    if relative.suffix not in (".yaml", ".yml"):
        relative = relative.with_suffix(".yaml")
    candidate = experiments_dir() / relative
    return candidate if candidate.is_file() else None
