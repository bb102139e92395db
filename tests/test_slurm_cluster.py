"""SLURM on a real cluster on localhost (munged, slurmctld, two slurmd): the project's sbatch templates, submitted
with ``lit-score submit``, train with CPU DDP over gloo, survive pre-emption by requeue and a crash of the training
process by a retry, and resume exactly where they stopped (bitwise the state of an uninterrupted job); a job whose
allocation does not match the Trainer fails at once with the fix in its log, and one that no node could hold is
refused before it is submitted.

Without SLURM installed these tests are skipped, except under CI=true, where they fail."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_score.cli.allocation import allocation_errors
from lit_score.cli.submit import PreflightError, build_submission, submit_main
from lit_score.diffusion.denoiser import Counted
from slurm_cluster import SlurmCluster, missing_binaries
from test_resume import assert_equal_tree

ROOT = Path(__file__).resolve().parent.parent
MISSING = missing_binaries()
IN_CI = os.environ.get("CI") == "true"
WHY = (f"SLURM is not installed (missing: {', '.join(MISSING)}); "
       "apt-get install slurmctld slurmd slurm-client munge")
# Under CI a missing SLURM is a failure of the set-up, never a reason to skip.
needs_slurm = pytest.mark.skipif(bool(MISSING) and not IN_CI, reason=WHY)
TESTS = str(Path(__file__).parent)
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
            {"class_path": "lit_score.callbacks.EMA", "init_args": {"rate": 0.9}},
        ],
    },
    "model": {"warmup": 5, "net": {"init_args": {"nf": 8, "ch_mult": [1, 2], "attn_resolutions": []}}},
    "data": {"init_args": {"image_size": 8, "batch_size": 16, "val_fraction": 0.9}},
}


class PreemptAt(L.Callback):
    """Rank 0, at the start of the step after optimizer step ``step``, has SLURM send SIGUSR1 to every task of
    its job (``scancel --signal=USR1``) and waits until the signal has arrived: the pre-emption lands in that
    step, whatever the machine's load."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        subprocess.run(["scancel", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=True)
        preemption = next(cb for cb in trainer.callbacks if type(cb).__name__ == "Preemption")
        deadline = time.monotonic() + 60
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.05)


class KillOnce(L.Callback):
    """``kill -9`` of rank 0's training process after optimizer step ``step``, once per ``marker`` file."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


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
        if IN_CI:
            pytest.fail(f"CI=true but {WHY}")
        pytest.skip(WHY)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2).start()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("SLURM_CONF", "MASTER_ADDR"):
            mp.setenv(key, slurm.env[key])
        mp.setenv("GLOO_SOCKET_IFNAME", "lo")
        mp.setenv("PYTHONPATH", os.pathsep.join([TESTS, str(ROOT)]))
        yield slurm
    slurm.stop()


def write_config(tmp_path: Path, max_steps: int, extra_callbacks: list[dict] = (), every: int = 2,
                 name: str = "tiny") -> Path:
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["trainer"]["max_steps"] = max_steps
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    config["trainer"]["callbacks"] += list(extra_callbacks)
    config["trainer"]["logger"] = {"init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit(tmp_path: Path, config: Path, nodes: int, devices: int, *sbatch: str, max_restarts: int = 3):
    """``lit-score submit``'s job for ``config``, on its own MASTER_PORT; returns (submission, job id)."""
    os.environ["MASTER_PORT"] = str(_free_port())
    try:
        submission = build_submission(
            ["--config", str(config), "--trainer.num_nodes", str(nodes), "--trainer.devices", str(devices)],
            [f"--chdir={tmp_path}", "--cpus-per-task=1", "--time=10", *sbatch], max_restarts=max_restarts)
        return submission, submission.submit()
    finally:
        del os.environ["MASTER_PORT"]


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
MAX_STEPS = 14


@pytest.fixture(scope="module")
def reference_job(cluster, tmp_path_factory):
    """An uninterrupted 2-node x 1-task job (checkpoints every 10 steps), submitted at once, waited for on use:
    its final checkpoint and run directory."""
    tmp_path = tmp_path_factory.mktemp("reference")
    submission, job = submit(tmp_path, write_config(tmp_path, MAX_STEPS, every=10), 2, 1)
    result: dict = {}

    def get() -> tuple[dict, Path]:
        if not result:
            state = cluster.wait_job(job, ENDED, 900)
            log = submission.run_dir(job) / "slurm.out"
            assert state == "COMPLETED", log.read_text()[-4000:] if log.exists() else state
            run_dir = submission.run_dir(job)
            result["value"] = (torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True), run_dir)
        return result["value"]
    return get


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def assert_same_as_reference(run_dir: Path, reference: tuple[dict, Path]) -> None:
    """Weights, optimizer, EMA and every rank's random state bitwise those of the uninterrupted job, and the
    same loss curve, one point per step."""
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    expected, reference_dir = reference
    assert final["global_step"] == expected["global_step"] == MAX_STEPS
    for name in ("state_dict", "optimizer_states", "lr_schedulers", "random_state"):
        assert_equal_tree(final[name], expected[name], name)
    assert len(final["random_state"]) == 2, "one random state per DDP process"
    ema = [k for k in expected["callbacks"] if k.startswith("EMA")]
    assert ema
    for key in ema:
        assert_equal_tree(final["callbacks"][key], expected["callbacks"][key], key)
    curve = loss_curve(run_dir)
    steps = [s for s, _ in curve]
    assert all(a < b for a, b in zip(steps, steps[1:])), steps
    assert curve == loss_curve(reference_dir)


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{what} within {timeout:.0f} s\n{tail}")


def run_preempted(cluster: SlurmCluster, tmp_path: Path, nodes: int, devices: int,
                  preempt_at: int = 3) -> tuple[str, Path, str]:
    """A job (checkpoints every 10 steps) that SLURM signals with USR1 during step ``preempt_at + 1``, before its
    first periodic checkpoint; waits for the requeued job to end."""
    config = write_config(tmp_path, MAX_STEPS, [{"class_path": "test_slurm_cluster.PreemptAt",
                                                 "init_args": {"step": preempt_at}}], every=10)
    submission, job = submit(tmp_path, config, nodes, devices)
    run_dir, log = submission.run_dir(job), submission.run_dir(job) / "slurm.out"
    state = cluster.wait_job(job, ENDED, 900)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", text[-4000:]
    return job, run_dir, text


def assert_requeued_and_resumed(cluster: SlurmCluster, job: str, run_dir: Path, log: str, stopped: int) -> None:
    assert cluster.job_field(job, "Restarts") == "1", log[-4000:]
    assert re.findall(r"job \d+ start (\d+)", log) == ["1", "2"], log[-4000:]
    assert f"Pre-emption signal: saving a checkpoint at step {stopped} and stopping" in log, log[-4000:]
    assert f"Restoring states from the checkpoint path at {run_dir}/checkpoints/last.ckpt" in log
    # TensorBoard: one event file per start, the second continuing after the step the first stopped at.
    events = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(events) == 2
    steps = []
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        steps.append([e.step for e in acc.Scalars("train/loss")])
    assert max(steps[0]) == stopped - 1 and min(steps[1]) == stopped
    assert max(steps[1]) == MAX_STEPS - 1


@needs_slurm
@pytest.mark.slow  # ~45 s: two sbatch jobs (CI runs the slow suite too)
def test_two_nodes_one_task_each_preempted_requeued_and_resumed(cluster, tmp_path, reference_job):
    """multi_node.sbatch on 2 nodes x 1 task: SIGUSR1 from SLURM during step 4, before the first periodic
    checkpoint -> last.ckpt at step 4, requeue, resume from it in the same run directory, and at max_steps the
    weights, optimizer, EMA, random states and loss curve of the uninterrupted job, bit for bit."""
    job, run_dir, log = run_preempted(cluster, tmp_path, nodes=2, devices=1)
    assert "multi_node" in cluster.job_field(job, "Command")
    assert_requeued_and_resumed(cluster, job, run_dir, log, stopped=4)
    assert_same_as_reference(run_dir, reference_job())


@needs_slurm
@pytest.mark.slow
def test_one_node_two_tasks_preempted_requeued_and_resumed(cluster, tmp_path):
    """single_node.sbatch on 1 node x 2 tasks (CPU DDP over gloo), pre-empted by SLURM's SIGUSR1."""
    job, run_dir, log = run_preempted(cluster, tmp_path, nodes=1, devices=2)
    assert "single_node" in cluster.job_field(job, "Command")
    assert_requeued_and_resumed(cluster, job, run_dir, log, stopped=4)
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == MAX_STEPS and len(final["random_state"]) == 2


@needs_slurm
@pytest.mark.slow
def test_a_crashed_training_process_is_retried_and_resumes_exactly(cluster, tmp_path, reference_job):
    """kill -9 of rank 0 after step 5 (last.ckpt: step 4) on 2 nodes x 1 task: the job requeues itself, resumes
    from last.ckpt and ends COMPLETED in the uninterrupted job's state."""
    marker = tmp_path / "killed"
    config = write_config(tmp_path, MAX_STEPS, [{"class_path": "test_slurm_cluster.KillOnce",
                                                 "init_args": {"step": 5, "marker": str(marker)}}], every=2)
    submission, job = submit(tmp_path, config, 2, 1, max_restarts=1)
    state = cluster.wait_job(job, ENDED, 900)
    run_dir = submission.run_dir(job)
    log = (run_dir / "slurm.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert marker.exists() and cluster.job_field(job, "Restarts") == "1", log[-4000:]
    assert "training exited with status 137: requeueing job" in log and "(crash restart 1 of 1)" in log
    assert f"Restoring states from the checkpoint path at {run_dir}/checkpoints/last.ckpt" in log
    assert_same_as_reference(run_dir, reference_job())


@needs_slurm
@pytest.mark.slow
def test_crash_restarts_are_bounded(cluster, tmp_path):
    """With --max-restarts 0 a crashed job is not requeued: it ends FAILED, saying why."""
    config = write_config(tmp_path, MAX_STEPS, [{"class_path": "test_slurm_cluster.KillOnce",
                                                 "init_args": {"step": 1, "marker": str(tmp_path / "killed")}}])
    submission, job = submit(tmp_path, config, 1, 1, max_restarts=0)
    assert cluster.wait_job(job, ENDED, 600) == "FAILED"
    log = (submission.run_dir(job) / "slurm.out").read_text()
    assert "status 137; 0 crash restart(s) used of 0: giving up" in log, log[-4000:]
    assert cluster.job_field(job, "Restarts") == "0"


@needs_slurm
@pytest.mark.slow  # the local cluster's start and stop (~6 s)
def test_submit_refuses_a_job_no_node_can_hold(cluster, tmp_path, capsys):
    """The templates' --cpus-per-task=8 on nodes of 2 CPUs: `lit-score submit` stops before sbatch, with the
    fix, instead of a job pending forever; so do too many GPUs, nodes or memory."""
    config = write_config(tmp_path, 4)
    queued = cluster.run("squeue", "-h", "-o", "%i").split()
    assert submit_main(["--", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]) == 2
    err = capsys.readouterr().err
    assert "have at most 2 CPUs, but the job asks 1 task(s) x 8 CPUs per node: pass --cpus-per-task=2" in err
    assert cluster.run("squeue", "-h", "-o", "%i").split() == queued, "nothing was submitted"
    for sbatch, fit, message in [
            (["--cpus-per-task=1"], ["--trainer.accelerator", "gpu"],
             "have at most 0 GPUs, but the job asks 1 per node"),
            (["--cpus-per-task=1"], ["--trainer.num_nodes", "3"], "has 2 node(s) that fit the job, but it asks 3"),
            (["--cpus-per-task=1", "--mem=4G"], [], "at most 1 MB of memory, but the job asks 4096 MB"),
            (["--cpus-per-task=1", "--partition=gpu"], [], "partition 'gpu' has no nodes")]:
        submission = build_submission(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                                       *fit], sbatch)
        with pytest.raises(PreflightError, match=re.escape(message)):
            submission.submit()


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
    final = torch.load(submission.run_dir(job) / "checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == max_steps


@needs_slurm
@pytest.mark.slow  # ~12 s: a job on the local cluster
def test_allocation_mismatch_fails_at_once_with_the_fix(cluster, tmp_path):
    """2 tasks per node but --trainer.devices 1: the job fails before training, naming both ways to fix it."""
    out = tmp_path / "mismatch.out"
    job = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--nodes=1", "--ntasks-per-node=2",
                "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                f"--export=ALL,PYTHON={sys.executable}", str(ROOT / "slurm/single_node.sbatch"),
                "--config", str(write_config(tmp_path, 4)), "--trainer.devices", "1").strip()
    wait_for(lambda: "lit-score: error: SLURM started" in (out.read_text() if out.exists() else ""), 300,
             "the mismatched job did not fail with the allocation error", out)
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "FAILED"
    text = out.read_text()
    assert "SLURM started 2 task(s) per node but trainer.devices is 1" in text
    assert "--trainer.devices 2" in text and "--ntasks-per-node=1" in text
    assert "Traceback" not in text  # one or two lines per process, exit status 2 (not retried by the template)


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


# The soak: one job pre-empted at five moments drawn at random (seeded; the draw is printed), one per start.
SOAK_STEPS = 20  # validation every 5 steps, FID every 4, checkpoints every 2
SOAK_VALIDATION_EVERY = TINY["trainer"]["val_check_interval"]


def soak_plan(seed: int) -> list[tuple[str, int, int]]:
    """(moment, optimizer step, network evaluation) for each start, at increasing steps: SIGUSR1 in a training
    step, in the validation after a step, inside the FID's sampling, inside a checkpoint save, and at the start
    of the following resume."""
    rng = random.Random(seed)
    train = rng.choice([1, 2, 3])  # the signal lands in step train + 1
    validation = rng.choice([5, 10])
    fid = rng.choice([s for s in (8, 12, 16) if s > validation])
    save = rng.choice([s for s in range(2, SOAK_STEPS, 2) if s > fid])
    return [("training", train, 0), ("validation", validation, 0), ("fid", fid, rng.randint(1, 150)),
            ("save", save, 0), ("resume", 0, 0)]


class PreemptMoments(L.Callback):
    """Rank 0 has SLURM send SIGUSR1 to every task of the job (``scancel --signal=USR1``) at the next moment of
    ``plan`` (a JSON list of ``soak_plan``'s triples), one moment per start (``<done>/<k>`` marks the k-th as
    done), and waits until the signal has arrived, so that it lands in that moment whatever the load."""

    def __init__(self, plan: str, done: str) -> None:
        self.plan = [tuple(m) for m in json.loads(Path(plan).read_text())]
        self.done = Path(done)

    def _next(self, trainer) -> tuple[str, int, int] | None:
        if not trainer.is_global_zero:
            return None
        k = len(list(self.done.glob("*")))
        return self.plan[k] if k < len(self.plan) else None

    def _preempt(self, trainer) -> None:
        self.done.joinpath(str(len(list(self.done.glob("*"))))).write_text(f"step {trainer.global_step}")
        subprocess.run(["scancel", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=True)
        preemption = next(cb for cb in trainer.callbacks if type(cb).__name__ == "Preemption")
        deadline = time.monotonic() + 60
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._next(trainer) == ("resume", 0, 0) and trainer.global_step > 0:
            self._preempt(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        moment = self._next(trainer)
        if moment is not None and moment[0] == "training" and trainer.global_step == moment[1]:
            self._preempt(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        moment = self._next(trainer)
        if (moment is not None and moment[0] == "validation" and trainer.global_step == moment[1]
                and not trainer.sanity_checking):
            self._preempt(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        moment = self._next(trainer)
        if moment is None or moment[0] != "fid" or trainer.global_step != moment[1]:
            return
        original, calls = pl_module.guided_denoiser, [0]

        def count() -> None:
            calls[0] += 1
            if calls[0] == moment[2]:
                self._preempt(trainer)

        pl_module.guided_denoiser = lambda *args, **kwargs: Counted(original(*args, **kwargs), count)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        moment = self._next(trainer)
        if moment is not None and moment[0] == "save" and trainer.global_step == moment[1]:
            self._preempt(trainer)


def soak_fid(tmp_path: Path) -> dict:
    return {"class_path": "lit_score.callbacks.FID",
            "init_args": {"features": {"class_path": "lit_score.metrics.RandomConvFeatures",
                                       "init_args": {"num_features": 8}},
                          "num_samples": 16, "every_n_steps": 4, "batch_size": 8, "cache_dir": str(tmp_path / "fid"),
                          "sampler": {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 100}}}}


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "val/loss", "val/fid@16")}


@needs_slurm
@pytest.mark.slow  # ~3 min: a 2-node job started six times, beside its uninterrupted twin
def test_a_job_preempted_at_five_random_moments_ends_as_its_uninterrupted_twin(cluster, tmp_path):
    """2 nodes x 1 task, with validation, FID (a slow sampler) and checkpoints: SLURM's SIGUSR1 in a training
    step, in a validation, inside the FID's sampling, during a checkpoint save and right after a resume; every
    start saves, requeues and resumes, and the sixth finishes bitwise equal to the uninterrupted twin (weights,
    EMA, optimizer, every rank's random state, and the train/loss, val/loss and FID curves)."""
    seed = int(os.environ.get("LIT_SCORE_SOAK_SEED", time.time_ns() % 10_000))
    plan = soak_plan(seed)
    print(f"soak seed {seed} (LIT_SCORE_SOAK_SEED={seed} repeats it): {plan}")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "done").mkdir()
    twin_dir, soak_dir = tmp_path / "twin", tmp_path / "soak"
    twin_dir.mkdir(), soak_dir.mkdir()
    fid = soak_fid(tmp_path)
    twin_sub, twin = submit(twin_dir, write_config(twin_dir, SOAK_STEPS, [fid], every=2), 2, 1)
    moments = {"class_path": "test_slurm_cluster.PreemptMoments",
               "init_args": {"plan": str(tmp_path / "plan.json"), "done": str(tmp_path / "done")}}
    soak_sub, soak = submit(soak_dir, write_config(soak_dir, SOAK_STEPS, [moments, fid], every=2), 2, 1,
                            max_restarts=0)
    assert cluster.wait_job(twin, ENDED, 900) == "COMPLETED", (twin_sub.run_dir(twin) / "slurm.out").read_text()[-4000:]
    state = cluster.wait_job(soak, ENDED, 1500)
    run_dir = soak_sub.run_dir(soak)
    log = (run_dir / "slurm.out").read_text()
    assert state == "COMPLETED", log[-6000:]
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["0", "1", "2", "3", "4"], log[-6000:]
    assert re.findall(r"job \d+ start (\d+)", log) == ["1", "2", "3", "4", "5", "6"], log[-6000:]
    assert "crash restart" not in log, "every stop was a pre-emption, none a crash"
    assert log.count("Pre-emption: requeued SLURM job") == 5, log[-6000:]
    # where the starts stopped: after the step in progress, in the validation's first batch, after the step whose
    # FID was cut short, at the first boundary after the save (the save's own validation, if any, or the next step's
    # end, where a validation that follows that step takes the stop), and before the first step
    (_, train, _), (_, validation, _), (_, fid_step, _), (_, save, _), _ = plan
    after_save = (f"during the validation after step {save}" if save % SOAK_VALIDATION_EVERY == 0 else
                  f"during the validation after step {save + 1}" if (save + 1) % SOAK_VALIDATION_EVERY == 0 else
                  f"saving a checkpoint at step {save + 1} and stopping")
    for line in (f"saving a checkpoint at step {train + 1} and stopping",
                 f"during the validation after step {validation}",
                 f"saving a checkpoint at step {fid_step} and stopping",
                 after_save,
                 "during the start of training"):
        assert line in log, (line, log[-6000:])
    twin_run = twin_sub.run_dir(twin)
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    expected = torch.load(twin_run / "checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] == SOAK_STEPS
    for name in ("state_dict", "optimizer_states", "lr_schedulers", "random_state"):
        assert_equal_tree(final[name], expected[name], name)
    for key in (k for k in expected["callbacks"] if k.startswith(("EMA", "FID"))):
        assert_equal_tree(final["callbacks"][key], expected["callbacks"][key], key)
    assert curves(run_dir) == curves(twin_run)
