"""SLURM on a real cluster on localhost (munged, slurmctld, two slurmd): the project's sbatch templates, submitted
with ``lit-score submit``, train with CPU DDP over gloo, survive pre-emption by requeue and resume exactly where
they stopped; a job whose allocation does not match the Trainer fails at once with the fix in its log."""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_score.slurm import allocation_errors, build_submission, submit_main
from slurm_cluster import SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parent.parent
MISSING = missing_binaries()
needs_slurm = pytest.mark.skipif(bool(MISSING), reason=f"SLURM is not installed (missing: {', '.join(MISSING)}); "
                                                     "apt-get install slurmctld slurmd slurm-client munge")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# Quickstart, shrunk: 8x8 digits, a DDPM++ with 8 channels, 180 training images in batches of 16 per process.
TINY = {
    "defaults": [str(ROOT / "experiments/quickstart.yaml")],
    "trainer": {
        "accelerator": "cpu", "strategy": "ddp", "log_every_n_steps": 1, "val_check_interval": 5,
        "limit_val_batches": 0.02, "num_sanity_val_steps": 0, "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": 2}},
            {"class_path": "callbacks.EMA", "init_args": {"rate": 0.9}},
        ],
    },
    "model": {"warmup": 5, "net": {"init_args": {"nf": 8, "ch_mult": [1, 2], "attn_resolutions": []}}},
    "data": {"init_args": {"image_size": 8, "batch_size": 16, "val_fraction": 0.9}},
}


class SlowSteps(L.Callback):
    """Makes every training step last at least ``seconds`` (a job long enough to meet its time limit)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two simulated nodes of 2 CPUs; clients and jobs of this module talk to it."""
    if MISSING:
        pytest.skip(f"SLURM is not installed (missing: {', '.join(MISSING)})")
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2).start()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("SLURM_CONF", "MASTER_ADDR"):
            mp.setenv(key, slurm.env[key])
        mp.setenv("GLOO_SOCKET_IFNAME", "lo")
        yield slurm
    slurm.stop()


def write_config(tmp_path: Path, max_steps: int, extra_callbacks: list[dict] = ()) -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["trainer"]["max_steps"] = max_steps
    config["trainer"]["callbacks"] += list(extra_callbacks)
    config["trainer"]["logger"] = {"init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{what} within {timeout:.0f} s\n{tail}")


def run_preempted(cluster: SlurmCluster, tmp_path: Path, nodes: int, devices: int, max_steps: int,
                  preempt_at: int = 2) -> tuple[str, Path, str]:
    """Submits, sends USR1 once the checkpoint of step ``preempt_at`` exists, waits for the requeued job to end."""
    os.environ["MASTER_PORT"] = str(_free_port())
    try:
        submission = build_submission(
            ["--config", str(write_config(tmp_path, max_steps)), "--trainer.num_nodes", str(nodes),
             "--trainer.devices", str(devices)],
            [f"--chdir={tmp_path}", "--cpus-per-task=1", "--time=10"])
        job = submission.submit()
    finally:
        del os.environ["MASTER_PORT"]
    run_dir, log = submission.run_dir(job), submission.run_dir(job) / "slurm.out"
    first = run_dir / "checkpoints" / f"epoch=0-step={preempt_at}.ckpt"
    wait_for(first.exists, 300, f"job {job} did not write {first.name}", log)
    cluster.run("scancel", "--signal=USR1", job)
    state = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 400)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    return job, run_dir, text


def assert_requeued_and_resumed(cluster: SlurmCluster, job: str, run_dir: Path, log: str, max_steps: int) -> None:
    assert cluster.job_field(job, "Restarts") == "1", log[-4000:]
    assert re.findall(r"job \d+ start (\d+)", log) == ["1", "2"], log[-4000:]
    saved = re.search(r"Pre-emption signal: saving a checkpoint at step (\d+)", log)
    assert saved is not None, log[-4000:]
    stopped = int(saved.group(1))
    assert 2 <= stopped < max_steps
    assert f"Restoring states from the checkpoint path at {run_dir}/checkpoints/last.ckpt" in log
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == max_steps
    assert len(final["random_state"]) == 2, "one random state per DDP process"
    # TensorBoard: one event file per start, the second continuing after the step the first stopped at.
    events = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(events) == 2
    steps = []
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        steps.append([e.step for e in acc.Scalars("train/loss")])
    assert max(steps[0]) == stopped - 1 and min(steps[1]) == stopped
    assert max(steps[1]) == max_steps - 1


@needs_slurm
def test_two_nodes_one_task_each_preempted_requeued_and_resumed(cluster, tmp_path):
    """multi_node.sbatch on 2 nodes x 1 task: `scancel --signal=USR1` -> checkpoint at a step boundary, requeue,
    resume from last.ckpt in the same run directory, finish at max_steps with TensorBoard steps continuing."""
    max_steps = 14
    job, run_dir, log = run_preempted(cluster, tmp_path, nodes=2, devices=1, max_steps=max_steps)
    assert "multi_node" in cluster.job_field(job, "Command")
    assert_requeued_and_resumed(cluster, job, run_dir, log, max_steps)


@needs_slurm
@pytest.mark.slow
def test_one_node_two_tasks_preempted_requeued_and_resumed(cluster, tmp_path):
    """single_node.sbatch on 1 node x 2 tasks (CPU DDP over gloo), pre-empted with `scancel --signal=USR1`."""
    max_steps = 14
    job, run_dir, log = run_preempted(cluster, tmp_path, nodes=1, devices=2, max_steps=max_steps)
    assert "single_node" in cluster.job_field(job, "Command")
    assert_requeued_and_resumed(cluster, job, run_dir, log, max_steps)


@needs_slurm
@pytest.mark.slow
def test_time_limit_warning_preempts_and_the_job_finishes_in_segments(cluster, tmp_path, monkeypatch):
    """--time=2 with --signal=USR1@60: the job trains until SLURM's time-limit warning, checkpoints and requeues
    itself; given more time, the second start resumes and the job ends COMPLETED at max_steps."""
    max_steps = 90
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), str(ROOT)]))
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    config = write_config(tmp_path, max_steps, [{"class_path": "test_slurm_cluster.SlowSteps",
                                                 "init_args": {"seconds": 1.0}}])
    submission = build_submission(["--config", str(config), "--trainer.devices", "2"],
                                  [f"--chdir={tmp_path}", "--cpus-per-task=1", "--time=2", "--signal=USR1@60"])
    job = submission.submit()
    wait_for(lambda: int(cluster.job_field(job, "Restarts") or 0) >= 1, 600, f"job {job} was not requeued",
             submission.run_dir(job) / "slurm.out")
    # Give the second start time to finish, instead of a few more two-minute segments.
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=15")
    state = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 900)
    log = (submission.run_dir(job) / "slurm.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "Pre-emption signal: saving a checkpoint" in log
    final = torch.load(submission.run_dir(job) / "checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == max_steps


@needs_slurm
def test_allocation_mismatch_fails_at_once_with_the_fix(cluster, tmp_path):
    """2 tasks per node but --trainer.devices 1: the job fails before training, naming both ways to fix it."""
    out = tmp_path / "mismatch.out"
    job = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--nodes=1", "--ntasks-per-node=2",
                "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                f"--export=ALL,PYTHON={sys.executable}", str(ROOT / "slurm/single_node.sbatch"),
                "--config", str(write_config(tmp_path, 4)), "--trainer.devices", "1").strip()
    wait_for(lambda: "SlurmAllocationError" in (out.read_text() if out.exists() else ""), 300,
             "the mismatched job did not fail with SlurmAllocationError", out)
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "FAILED"
    text = out.read_text()
    assert "SLURM started 2 task(s) per node but trainer.devices is 1" in text
    assert "--trainer.devices 2" in text and "--ntasks-per-node=1" in text


def test_allocation_errors_name_what_to_change():
    """Nodes, tasks per node and a missing srun are each reported with the setting that fixes them."""
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert allocation_errors(2, 4, step) == []
    assert allocation_errors(1, 4, {}) == []
    [nodes] = allocation_errors(1, 4, step)
    assert "--trainer.num_nodes 2" in nodes and "--nodes=1" in nodes
    [tasks] = allocation_errors(2, 2, step)
    assert "--trainer.devices 4" in tasks and "--ntasks-per-node=2" in tasks
    [uneven] = allocation_errors(2, 2, {**step, "SLURM_STEP_TASKS_PER_NODE": "3,1"})
    assert "uneven" in uneven
    [batch] = allocation_errors(1, 2, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
    assert "srun" in batch
    assert allocation_errors(1, 2, {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "interactive"}) == []


def test_submit_dry_run_derives_the_allocation_from_the_config(tmp_path, capsys):
    """`lit-score submit --dry-run` asks sbatch for trainer.num_nodes x trainer.devices tasks (and GPUs), the
    multi-node template, output in the experiment's run folder, and passes the fit arguments through."""
    config = write_config(tmp_path, 10)
    args = ["--config", str(config), "--trainer.accelerator", "gpu", "--trainer.num_nodes", "3",
            "--trainer.devices", "4"]
    assert submit_main(["--dry-run", "--time=1:00:00", "--", *args]) == 0
    command = capsys.readouterr().out.strip()
    for part in ("--nodes=3", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=1:00:00",
                 f"--output={tmp_path}/runs/tiny/slurm-%j.out", "slurm/multi_node.sbatch", " ".join(args)):
        assert part in command
    assert submit_main(["--dry-run", "--", "--config", str(config)]) == 2
    assert "trainer.devices is 'auto'" in capsys.readouterr().err
