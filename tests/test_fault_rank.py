"""A dead rank ends every rank: `lit-score fit` with 2 real DDP processes (Lightning's launcher, gloo on CPU), one of
them killed with kill -9 (or stopped with SIGSTOP) mid-training. Every process is gone within a stated bound, the
survivor's one line names the rank that died, and a restart from the last periodic checkpoint reaches the state of
an uninterrupted 2-process run, bit for bit."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lit_score.callbacks.dead_rank import DEFAULT_TIMEOUT, Peer, describe, exit_status, peer_failure, \
    process_group_timeout, stop_message
from lit_score.cli.config import expand_config_args
from lit_score.cli.lightning_cli import ScoreCLI
from lit_score.errors import DataError
from test_resume import ENV, MAX_STEPS, assert_same_state, write_config

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

BOUND = 60  # seconds from the kill until every process is gone (measured: under 1 s; 4 s where a survivor watches)
TWO_RANKS = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
             "--trainer.limit_val_batches", "1")  # (TINY's 0.02 of the validation set is no batch per rank)
KILL_STEP = 7  # after the periodic checkpoint at step 6
LINE = re.compile(r"^lit-score: .*every rank stops.*$", re.MULTILINE)


class KillRank(L.Callback):
    """After optimizer step ``step``, rank ``rank`` writes its pid and the time to ``marker`` and sends itself
    ``signum`` (``DataError``: raises one, a problem to fix first); the other ranks sleep ``others_sleep`` seconds
    there (busy outside any collective)."""

    def __init__(self, rank: int, step: int, marker: str, signum: str = "SIGKILL", others_sleep: float = 0.0) -> None:
        self.rank, self.step, self.marker = rank, step, Path(marker)
        self.signum, self.others_sleep = signum, others_sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            self.marker.write_text(f"{os.getpid()} {time.time()}")
            if self.signum == "DataError":
                raise DataError("images/0042.png cannot be decoded")
            os.kill(os.getpid(), signal.Signals[self.signum])
        elif self.others_sleep:
            time.sleep(self.others_sleep)


@dataclass
class Ended:
    returncode: int  # rank 0's
    output: str
    victim: int  # the pid of the rank that was killed or stopped
    gone_after: float  # seconds from the kill until no process of the run was left

    def lines(self) -> list[str]:
        return LINE.findall(self.output)


def _group_alive(pgid: int) -> bool:
    """Whether a process of process group ``pgid`` is still running (zombies excepted)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def fit_two_ranks(tmp_path: Path, kill: dict, *args: str, deadline: float = 300) -> Ended:
    """`lit-score fit` of TINY with 2 processes, a :class:`KillRank` of ``kill`` and the options ``args``; waits
    until every process of the run is gone (and kills them all ``deadline`` seconds after the start)."""
    marker = tmp_path / "killed"
    config = write_config(tmp_path, "fault", [{"class_path": "test_fault_rank.KillRank",
                                                "init_args": {"marker": str(marker), **kill}}])
    log = tmp_path / "output.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lit_score", "fit", "--config", str(config),
                                 "--trainer.logger.init_args.version", "run", *TWO_RANKS, *args], env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    try:
        while proc.poll() is None or _group_alive(proc.pid):
            assert time.monotonic() - start < deadline, f"still running after {deadline} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        gone = time.time()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    output = log.read_text()
    assert marker.exists(), f"no rank was killed:\n{output[-3000:]}"
    victim, killed = marker.read_text().split()
    return Ended(proc.returncode, output, int(victim), gone - float(killed))


def last_step(tmp_path: Path) -> int:
    return torch.load(tmp_path / "runs/tiny/run/checkpoints/last.ckpt", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def reference_two_ranks(tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted 2-process run."""
    tmp_path = tmp_path_factory.mktemp("reference_two_ranks")
    proc = subprocess.run([sys.executable, "-m", "lit_score", "fit", "--config", str(write_config(tmp_path, "plain")),
                           "--trainer.logger.init_args.version", "run", *TWO_RANKS], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every rank stops" not in proc.stderr, "a rank that finished was taken for dead"
    return torch.load(tmp_path / "runs/tiny/run/checkpoints/last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def rank_1_killed(tmp_path_factory) -> tuple[Path, Ended, int]:
    """A 2-process run whose rank 1 was killed with kill -9 after step 7: its folder, its end, the step of its
    last.ckpt."""
    tmp_path = tmp_path_factory.mktemp("rank_1_killed")
    ended = fit_two_ranks(tmp_path, {"rank": 1, "step": KILL_STEP})
    return tmp_path, ended, last_step(tmp_path)


@pytest.mark.slow  # ~25 s: 2 processes (make test-slow, in CI)
def test_kill_9_of_rank_1_ends_every_rank(rank_1_killed):
    """kill -9 of rank 1 after step 7: rank 0 stops at once, with one line naming rank 1, its pid and the signal
    and the checkpoint of step 6, and exit status 1."""
    tmp_path, ended, step = rank_1_killed
    assert ended.gone_after < BOUND, ended.output[-3000:]
    last = tmp_path / "runs/tiny/run/checkpoints/last.ckpt"
    assert ended.lines() == [f"lit-score: rank 1 (pid {ended.victim}) died (killed by SIGKILL); every rank stops; "
                             f"restart to resume from the last checkpoint {last}"], ended.output[-3000:]
    assert ended.returncode == 1
    assert step == 6


@pytest.mark.slow
def test_the_restart_after_a_dead_rank_is_exact(rank_1_killed, reference_two_ranks):
    """`--ckpt_path last` after rank 1's kill -9 resumes from step 6 and ends in the state of an uninterrupted
    2-process run."""
    tmp_path, _, _ = rank_1_killed
    resumed = subprocess.run([sys.executable, "-m", "lit_score", "fit", "--config",
                              str(write_config(tmp_path, "resume")), "--trainer.logger.init_args.version", "run",
                              "--ckpt_path", "last", *TWO_RANKS], env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_step(tmp_path) == MAX_STEPS
    assert_same_state(torch.load(tmp_path / "runs/tiny/run/checkpoints/last.ckpt", weights_only=True),
                      reference_two_ranks)


@pytest.mark.slow
def test_kill_9_of_rank_0_ends_the_other_rank(tmp_path):
    """kill -9 of rank 0 (the launcher) after step 7: rank 1 stops at once, with one line naming rank 0."""
    ended = fit_two_ranks(tmp_path, {"rank": 0, "step": KILL_STEP})
    assert ended.gone_after < BOUND, ended.output[-3000:]
    assert ended.returncode == -signal.SIGKILL
    [line] = ended.lines()
    assert line.startswith(f"lit-score: rank 0 (pid {ended.victim}) died; every rank stops; restart to resume from "
                           "the last checkpoint "), ended.output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("victim,named", [(1, "rank 1 (pid {}) died (killed by SIGKILL)"), (0, "rank 0 (pid {}) died")])
def test_a_rank_busy_outside_collectives_is_ended_too(tmp_path, victim, named):
    """The survivor sleeps 120 s after the step where its peer dies, in no collective (as an NCCL rank waits for a
    peer that is gone): Lightning's launcher's ranks watch each other and it stops within seconds, naming the dead
    rank."""
    ended = fit_two_ranks(tmp_path, {"rank": victim, "step": KILL_STEP, "others_sleep": 120})
    assert ended.gone_after < BOUND, ended.output[-3000:]
    assert [line.split(";")[0] for line in ended.lines()] == [f"lit-score: {named.format(ended.victim)}"], \
        ended.output[-3000:]


@pytest.mark.slow
def test_a_rank_that_stops_on_a_problem_to_fix_passes_its_status_on(tmp_path):
    """Rank 1 stops on a DataError (its own line, status 2): rank 0 names it and exits with 2 too, which the SLURM
    templates do not retry."""
    ended = fit_two_ranks(tmp_path, {"rank": 1, "step": KILL_STEP, "signum": "DataError"})
    assert ended.gone_after < BOUND, ended.output[-3000:]
    assert "lit-score: error: images/0042.png cannot be decoded" in ended.output
    [line] = ended.lines()
    assert line.startswith(f"lit-score: rank 1 (pid {ended.victim}) exited with status 2; every rank stops"), line
    assert ended.returncode == 2


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_every_rank_at_the_timeout(tmp_path):
    """Rank 1 stopped (SIGSTOP) after step 7, with --dead_rank.timeout 10: rank 0's collective times out after 10 s
    (Lightning's default would wait 30 minutes), rank 0 says so, ends rank 1 and exits with status 1."""
    ended = fit_two_ranks(tmp_path, {"rank": 1, "step": KILL_STEP, "signum": "SIGSTOP"}, "--dead_rank.timeout", "10",
                          deadline=120)
    assert 10 <= ended.gone_after < 10 + BOUND, ended.output[-3000:]
    [line] = ended.lines()
    assert line.startswith("lit-score: a collective timed out: some rank stopped answering (Timed out waiting "
                           "10000ms"), line
    assert ended.returncode == 1


def test_strategies_given_by_name_get_the_timeout_and_a_given_one_keeps_its_own():
    """Within process_group_timeout: `ddp`, its variants and `auto` on several devices time out after the given
    seconds; a DDPStrategy object keeps its own timeout; afterwards the registry is as it was (reads the strategy's
    private ``_timeout``: Lightning has no public getter)."""
    registry = {name: dict(StrategyRegistry[name]) for name in StrategyRegistry.available_strategies()}
    own = DDPStrategy(timeout=timedelta(minutes=3))
    with process_group_timeout(42):
        for strategy in ("ddp", "auto", "ddp_find_unused_parameters_true", own):
            trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
            assert isinstance(trainer.strategy, DDPStrategy)
            assert trainer.strategy._timeout == (timedelta(minutes=3) if strategy is own else timedelta(seconds=42))
        assert trainer.strategy is own
        assert StrategyRegistry.get("ddp_find_unused_parameters_true")._ddp_kwargs == {"find_unused_parameters": True}
    assert {name: dict(StrategyRegistry[name]) for name in StrategyRegistry.available_strategies()} == registry


def test_the_cli_sets_the_timeout_and_keeps_the_one_a_strategy_class_is_given(tmp_path):
    """`lit-score`: 600 s by default, --dead_rank.timeout overrides it, and --trainer.strategy as a class with its
    own timeout keeps that."""
    def timeout(*options: str) -> timedelta:
        args = expand_config_args(["--config", str(write_config(tmp_path, "cli"))]) + [
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", *options]
        return ScoreCLI(run=False, args=args, save_config_callback=None).trainer.strategy._timeout

    assert timeout("--trainer.strategy", "ddp") == timedelta(seconds=DEFAULT_TIMEOUT) == timedelta(minutes=10)
    assert timeout("--dead_rank.timeout", "90") == timedelta(seconds=90)
    assert timeout("--dead_rank.timeout", "90", "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                   "--trainer.strategy.timeout", "0:30:00") == timedelta(minutes=30)


def test_collective_failures_are_told_from_other_errors():
    """gloo's broken connections and timeouts and torch's DistError, also as the cause of another error, are a peer's
    failure; other errors are not."""
    reset = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                         "[127.0.0.1]:13222: Connection reset by peer. This is typically caused by a remote worker")
    timed_out = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
                             "out waiting 8000ms for recv operation to complete")
    for err in (reset, timed_out, dist.DistBackendError("NCCL error: remote process exited"),
                dist.DistNetworkError("Connection closed by peer")):
        assert peer_failure(err) is err
    try:
        try:
            raise reset
        except RuntimeError as cause:
            raise ValueError("while saving") from cause
    except ValueError as wrapped:
        assert peer_failure(wrapped) is reset
    for err in (RuntimeError("CUDA out of memory"), ValueError("Connection reset by peer"), KeyboardInterrupt()):
        assert peer_failure(err) is None


def test_the_line_names_the_rank_and_what_to_do():
    """The rank, its pid and its end where known; the checkpoint to resume from; status 2 after the dead rank's 2."""
    peer = Peer(rank=3, host="h", pid=1234, ppid=1, start=5)
    assert describe(peer, -signal.SIGKILL) == "rank 3 (pid 1234) died (killed by SIGKILL)"
    assert describe(peer, None) == "rank 3 (pid 1234) died"
    assert describe(peer, 2) == "rank 3 (pid 1234) exited with status 2"
    assert [exit_status(s) for s in (None, -signal.SIGKILL, 1, 2, 143)] == [1, 1, 1, 2, 1]
    fit = SimpleNamespace(state=SimpleNamespace(fn="fit"), checkpoint_callbacks=[], ckpt_path=None)
    assert stop_message(fit, describe(peer, -signal.SIGKILL)) == (
        "lit-score: rank 3 (pid 1234) died (killed by SIGKILL); every rank stops; no checkpoint was written yet: a "
        "restart starts the run again")
    fit.ckpt_path = "runs/x/checkpoints/last.ckpt"  # resumed from it, nothing saved since
    assert stop_message(fit, describe(peer, None)).endswith(
        "rank 3 (pid 1234) died; every rank stops; restart to resume from the last checkpoint "
        "runs/x/checkpoints/last.ckpt")
    fit.checkpoint_callbacks = [SimpleNamespace(last_model_path="runs/x/checkpoints/epoch=1-step=6.ckpt")]
    assert stop_message(fit, "x").endswith("from the last checkpoint runs/x/checkpoints/epoch=1-step=6.ckpt")
    predict = SimpleNamespace(state=SimpleNamespace(fn="predict"))
    assert stop_message(predict, "x") == "lit-score: x; every rank stops; run it again"
