"""CPU threads: counted from the process's affinity and SLURM's allocation, set by --threads, passive OpenMP waiting."""
import os
import subprocess
import sys

import pytest

from lit_score.cli.threads import available_cpus, default_threads, pop_threads_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                             "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": ROOT, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_threads_follow_the_affinity_mask_and_slurm():
    pin = "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
    run = "from lit_score.cli.threads import configure_threads; import torch; n = configure_threads(); " \
          "print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    assert _child(pin + run) == ["1", "1", "PASSIVE"]
    assert _child("import os; " + run, SLURM_CPUS_PER_TASK="1", OMP_WAIT_POLICY="ACTIVE") == ["1", "1", "ACTIVE"]


def test_available_cpus_is_the_smaller_of_affinity_and_slurm(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert available_cpus() == 6 and default_threads() == 6
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert available_cpus() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def test_threads_argument_is_taken_out_of_the_command_line():
    assert pop_threads_arg(["fit", "--threads", "3", "--config", "x.yaml"]) == (["fit", "--config", "x.yaml"], 3)
    assert pop_threads_arg(["--threads=2", "predict"]) == (["predict"], 2)
    assert pop_threads_arg(["fit"]) == (["fit"], None)
    for bad in (["--threads"], ["--threads", "0"], ["--threads=two"]):
        with pytest.raises(ValueError, match="--threads needs a positive integer"):
            pop_threads_arg(bad)


@pytest.mark.slow  # CLI starts in processes (~7 s): runs in make test-slow (CI)
def test_lit_score_takes_threads():
    cli = [sys.executable, "-c", "import sys; from lit_score.cli.main import main; sys.argv[0] = 'lit-score'; main()"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    ok = subprocess.run(cli + ["fit", "--config", "experiments/quickstart.yaml", "--threads", "1", "--print_config"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "max_steps: 1500" in ok.stdout  # --threads was taken out before LightningCLI parsed the rest
