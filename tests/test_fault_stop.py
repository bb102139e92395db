"""A stop request inside the long parts of a fit: SIGUSR1 during the FID callback's sampling stops it at the
sampler step in progress (no further network evaluation; the sample grid due at the same step does not start),
the run saves ``last.ckpt`` at its last optimizer step and exits 138, and the resumed run evaluates that FID, draws
that grid and runs the validation it cut short, ending bitwise equal to an uninterrupted run (weights, EMA,
optimizer, random state, the train/loss, val/loss and FID curves, the grid images). The same
request ends the FID reference statistics after the batch in progress, and every rank of a distributed
feature pass at the same round."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_score.data_space import DataSpace
from lit_score.diffusion.denoiser import Counted
from lit_score.progress import Interrupted
from lit_score.metrics.features import RandomConvFeatures
from lit_score.metrics.frechet import metric_tag, ordered_statistics
from lit_score.metrics.reference import cache_path, reference_key, reference_statistics
from test_resume import (assert_same_curve, assert_same_state, fit, fit_process, last_checkpoint, loss_curve,
                         write_config)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

FID_SAMPLES = 16
FID_STEPS = 4  # steps 4, 8 and 12, as validation (val_check_interval 4 in TINY)
STOP_STEP, STOP_NFE = 8, 5


def grid_callback() -> dict:
    return {"class_path": "lit_score.callbacks.SampleGrid",
            "init_args": {"every_n_steps": FID_STEPS, "num_samples": 4, "batch_size": 4, "at_start": False,
                          "sampler": {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 5}}}}


def fid_callback(cache_dir: Path) -> dict:
    """A slow sampler (EDM's, 100 steps: 199 evaluations an image) in two batches of 8 images."""
    return {"class_path": "lit_score.callbacks.FID",
            "init_args": {"features": {"class_path": "lit_score.metrics.RandomConvFeatures",
                                       "init_args": {"num_features": 8}},
                          "num_samples": FID_SAMPLES, "every_n_steps": FID_STEPS, "batch_size": 8,
                          "cache_dir": str(cache_dir),
                          "sampler": {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 100}}}}


class SignalDuringSampling(L.Callback):
    """After optimizer step ``step``, counts the network evaluations of the sampling that follows and sends
    ``signum`` to this process at evaluation ``nfe``; writes ``<nfe at the signal> <evaluations in all>`` to
    ``record`` when the fit ends (or stops)."""

    def __init__(self, step: int, nfe: int, record: str, signum: str = "SIGUSR1") -> None:
        self.step, self.nfe, self.record, self.signum = step, nfe, record, signal.Signals[signum]
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or "guided_denoiser" in vars(pl_module):
            return
        original = pl_module.guided_denoiser

        def count() -> None:
            self.calls += 1
            if self.calls == self.nfe:
                os.kill(os.getpid(), self.signum)

        pl_module.guided_denoiser = lambda *args, **kwargs: Counted(original(*args, **kwargs), count)

    def _write(self) -> None:
        Path(self.record).write_text(f"{self.nfe} {self.calls}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._write()


@pytest.fixture(scope="module")
def fid_reference(tmp_path_factory) -> tuple[dict, Path, Path]:
    """An uninterrupted run with the FID and sample-grid callbacks: its final checkpoint, run directory and FID
    cache."""
    tmp_path = tmp_path_factory.mktemp("fid_reference")
    cache = tmp_path / "cache"
    fit(write_config(tmp_path, "plain", [fid_callback(cache), grid_callback()]), "plain")
    return last_checkpoint(tmp_path, "plain"), tmp_path / "runs/tiny/plain", cache


@pytest.mark.slow
def test_sigusr1_during_fid_sampling_stops_at_the_sampler_step_and_resume_is_exact(tmp_path, fid_reference):
    reference, reference_dir, cache = fid_reference
    tag = metric_tag("fid", FID_SAMPLES)
    assert [s for s, _ in loss_curve(reference_dir, tag)] == [4, 8, 12]
    record = tmp_path / "evaluations.txt"
    signalling = {"class_path": "test_fault_stop.SignalDuringSampling",
                  "init_args": {"step": STOP_STEP, "nfe": STOP_NFE, "record": str(record)}}
    stopped = fit_process(write_config(tmp_path, "signal", [signalling, fid_callback(cache), grid_callback()]), "run")
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert record.read_text() == f"{STOP_NFE} {STOP_NFE}", "no network evaluation after the signal's"
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("lit-score:")]
    assert lines == [f"lit-score: stopped by SIGUSR1 during the validation after step {STOP_STEP}; "
                     f"{tmp_path}/runs/tiny/run/checkpoints/last.ckpt is at step {STOP_STEP}: resume with "
                     f"`lit-score fit --resume {tmp_path}/runs/tiny/run`"], stopped.stderr[-3000:]
    saved = last_checkpoint(tmp_path, "run")
    assert saved["global_step"] == STOP_STEP
    assert [s for s, _ in loss_curve(tmp_path / "runs/tiny/run", tag)] == [4], "the cut FID was not logged"
    grids = lambda run: sorted(p.name for p in (run / "samples").glob("*.png"))  # noqa: E731
    assert grids(tmp_path / "runs/tiny/run") == ["step_00000004.png"], "the grid after it did not start"

    fit(write_config(tmp_path, "resume", [fid_callback(cache), grid_callback()]), "run", "--ckpt_path", "last")
    assert_same_state(last_checkpoint(tmp_path, "run"), reference)
    for curve in ("train/loss", "val/loss", tag):
        assert_same_curve(tmp_path / "runs/tiny/run", reference_dir, curve)
    run_dir = tmp_path / "runs/tiny/run"
    assert grids(run_dir) == grids(reference_dir) == [f"step_{s:08d}.png" for s in (4, 8, 12)]
    for name in grids(run_dir):
        assert (run_dir / "samples" / name).read_bytes() == (reference_dir / "samples" / name).read_bytes(), name


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class _Data(L.LightningDataModule):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.dataset, self.data_space = _Images(n), DataSpace((3, 8, 8), centered=True)

    def cache_key(self) -> str:
        return f"stop-test-{len(self.dataset)}"

    def full_dataset(self) -> _Images:
        return self.dataset


def test_a_stop_request_ends_the_reference_statistics_after_the_batch_in_progress(tmp_path):
    """The check runs after every batch: raising at the second stops the pass there; nothing is cached, so the
    next run computes the statistics whole."""
    data, features = _Data(20), RandomConvFeatures(num_features=8, width=4)
    checks = []

    def interrupt() -> None:
        checks.append(len(checks))
        if len(checks) == 2:
            raise Interrupted(signal.SIGTERM, "stopped by SIGTERM")

    with pytest.raises(Interrupted, match="SIGTERM"):
        reference_statistics(data, features, tmp_path, batch_size=4, interrupt=interrupt)
    assert checks == [0, 1], "stopped after the batch in progress"
    assert not cache_path(reference_key(data, features), tmp_path).exists()
    random_state = torch.get_rng_state()
    whole = reference_statistics(data, features, tmp_path, batch_size=4, interrupt=lambda: None)
    assert whole.count == 20
    # Computing them leaves the global random state alone: a run that finds them cached trains the same.
    assert torch.equal(torch.get_rng_state(), random_state)


def _round_worker(rank: int, world: int, tmp: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    embedded = []

    def features_of(k: int) -> torch.Tensor:
        if rank == 1 and k == 3:  # rank 1's stop request, during round 1 (chunks 2 and 3)
            raise Interrupted(signal.SIGUSR1, "stopped by SIGUSR1")
        embedded.append(k)
        return torch.full((2, 4), float(k))

    try:
        ordered_statistics(6, features_of, 4)
        outcome = "finished"
    except Interrupted as stop:
        outcome = f"{stop.signum.name} {stop.code}"
    Path(tmp, f"rank{rank}.txt").write_text(f"{outcome} {embedded}")
    torch.distributed.destroy_process_group()


def test_a_stop_request_on_one_rank_stops_every_rank_at_the_same_round(tmp_path):
    """Two gloo processes: rank 1 is interrupted in round 1; both raise its Interrupted (exit 138) at the end of
    that round, and neither starts round 2 (chunks 4 and 5), so no collective is left waiting."""
    torch.multiprocessing.spawn(_round_worker, args=(2, str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text() == "SIGUSR1 138 [0, 2]"
    assert (tmp_path / "rank1.txt").read_text() == "SIGUSR1 138 [1]"


class SignalDuringFeatures(L.Callback):
    """Sends ``signum`` to this process at the FID feature network's call ``call`` (the reference statistics
    at fit start); writes the calls made to ``record`` when the fit stops."""

    def __init__(self, call: int, record: str, signum: str = "SIGUSR1") -> None:
        self.call, self.record, self.signum, self.calls = call, record, signal.Signals[signum], 0

    def setup(self, trainer, pl_module, stage) -> None:
        features = next(cb for cb in trainer.callbacks if type(cb).__name__ == "FID").features
        forward = features.forward

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.call:
                os.kill(os.getpid(), self.signum)
            return forward(*args, **kwargs)

        features.forward = counted

    def on_exception(self, trainer, pl_module, exception) -> None:
        Path(self.record).write_text(str(self.calls))


@pytest.mark.slow
def test_sigusr1_during_the_reference_statistics_stops_after_that_batch(tmp_path):
    """A fresh run signalled during the FID reference pass (the digits, 8 images a batch): it stops after that
    batch, exits 138 saying no checkpoint was written yet, and caches nothing."""
    record, cache = tmp_path / "calls.txt", tmp_path / "cache"
    signalling = {"class_path": "test_fault_stop.SignalDuringFeatures",
                  "init_args": {"call": 3, "record": str(record)}}
    fid = fid_callback(cache)
    stopped = fit_process(write_config(tmp_path, "signal", [fid, signalling]), "run")
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert record.read_text() == "3", "no feature batch after the signal's"
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("lit-score:")]
    assert lines == ["lit-score: stopped by SIGUSR1 during the start of the fit; no checkpoint was written yet"], \
        stopped.stderr[-3000:]
    assert not list(cache.glob("*.pt")) and not (tmp_path / "runs/tiny/run/checkpoints").exists()
