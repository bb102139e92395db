"""The wheel, installed into a fresh virtual environment, works from outside the checkout: only ``lit_score`` is
installed (``lit_score.data``, ``lit_score.callbacks``, the experiment YAMLs and sbatch templates inside it), and it
trains the quickstart for a few steps, predicts from the checkpoint and prepares a SLURM submission. Under CI=true
(or LIT_SCORE_WHEEL_DEPS=install) pip installs the wheel's dependencies too; elsewhere they come from this
environment."""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def sh(*args, cwd: Path, timeout: int = 900, env: dict | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})})
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("lit_score-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"lit_score"}, tops
    for member in ("lit_score/data/image.py", "lit_score/callbacks/ema.py", "lit_score/experiments/quickstart.yaml",
                   "lit_score/experiments/base/trainer.yaml", "lit_score/sbatch/single_node.sbatch",
                   "lit_score/sbatch/multi_node.sbatch", "lit_score/__main__.py", "lit_score/diffusion/sdes.py",
                   "lit_score/runtime/module.py", "lit_score/cli/main.py", "lit_score/interop/export.py"):
        assert member in names, member
    # Every module of the checkout, in every subpackage (pyproject lists the packages one by one).
    sources = {f"{package}/{path.relative_to(ROOT / folder)}" for folder, package in (
        ("lit_score", "lit_score"), ("callbacks", "lit_score/callbacks"), ("data_modules", "lit_score/data"))
        for path in (ROOT / folder).rglob("*.py")}
    assert not sources - set(names), sorted(sources - set(names))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    if IN_CI or os.environ.get("LIT_SCORE_WHEEL_DEPS") == "install":
        sh(bin_dir / "python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path, timeout=1500)
    else:  # a quicker local run: the dependencies of this environment, the package from the wheel only
        site = sh(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
        deps = [p for p in sys.path if p.endswith("site-packages")]
        Path(site.strip(), "dependencies.pth").write_text("\n".join(deps) + "\n")
        sh(bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    location = sh(bin_dir / "python", "-c", "import lit_score.data, lit_score.callbacks; print(lit_score.data.__file__)",
                  cwd=work)
    assert str(env_dir) in location and str(ROOT) not in location
    sh(bin_dir / "python", "-c", "import importlib.util as u; assert u.find_spec('callbacks') is None "
       "and u.find_spec('data_modules') is None", cwd=work)

    sh(bin_dir / "lit-score", "fit", "--config", "quickstart", "--trainer.max_steps", "4",
       "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", cwd=work)
    ckpt = work / "runs/quickstart/version_0/checkpoints/last.ckpt"
    assert ckpt.is_file()
    sh(bin_dir / "python", "-m", "lit_score", "predict", "--config", "experiments/quickstart.yaml",
       "--ckpt_path", ckpt, "--model.sampler", "lit_score.sampling.EDMSampler", "--model.sampler.steps", "2",
       "--data.init_args.num_samples", "4", "--data.init_args.sample_batch_size", "4", cwd=work)
    assert list(work.glob("runs/quickstart/version_1/**/samples.npz")) or list(work.rglob("samples.npz"))

    dry = sh(bin_dir / "lit-score", "submit", "--dry-run", "--", "--config", "quickstart", "--trainer.devices", "1",
             cwd=work)
    assert "sbatch" in dry and str(env_dir) in dry and "lit_score/sbatch/single_node.sbatch" in dry, dry
