"""Paper-protocol evaluation: the same numbers for any number of processes, resumable shards, the protocol on record.

A small NCSN++ on 16x16 digits, 256 samples, a random conv feature network for FID and another as IS classifier.
"""
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_score.errors import CheckpointError, ConfigurationError
from lit_score.evaluate import (Evaluator, inception_score, load_experiment, load_reference, load_weights,
                                save_reference)
from lit_score.diffusion.likelihood import Likelihood
from lit_score.metrics import RandomConvFeatures
from lit_score.sampling import EDMSampler

ROOT = Path(__file__).resolve().parents[1]

TINY = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
model:
  net:
    class_path: lit_score.networks.NCSNpp
    init_args: {nf: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}
  sde:
    class_path: lit_score.diffusion.sdes.VESDE
    init_args: {sigma_min: 0.01, sigma_max: 10.0, N: 20}
data:
  class_path: lit_score.data.DigitsDataModule
  init_args: {image_size: 16}
"""

EVAL = """
evaluation:
  num_samples: 256
  batch_size: 32
  shard_size: 32
  sampler:
    class_path: lit_score.sampling.EDMSampler
    init_args: {{steps: {steps}}}
  features:
    class_path: lit_score.metrics.RandomConvFeatures
    init_args: {{num_features: 16}}
  classifier:
    class_path: lit_score.metrics.RandomConvFeatures
    init_args: {{num_features: 10, seed: 1}}
  kid_subset_size: 64
  bpd: false
  cache_dir: {cache}
"""


def evaluator(out_dir: Path, cache: Path, steps: int = 3, **kwargs) -> Evaluator:
    """The Evaluator that EVAL describes."""
    args = dict(out_dir=str(out_dir), num_samples=256, batch_size=32, shard_size=32,
                sampler=EDMSampler(steps=steps), features=RandomConvFeatures(num_features=16),
                classifier=RandomConvFeatures(num_features=10, seed=1), kid_subset_size=64, bpd=False,
                cache_dir=str(cache))
    return Evaluator(**{**args, **kwargs})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny experiment, a checkpoint whose EMA and raw weights differ, and one single-process evaluation."""
    tmp = tmp_path_factory.mktemp("evaluation")
    (tmp / "tiny.yaml").write_text(TINY)
    (tmp / "eval.yaml").write_text(EVAL.format(steps=3, cache=tmp / "cache"))
    experiment = load_experiment(tmp / "tiny.yaml")
    state = experiment.model.state_dict()
    g = torch.Generator().manual_seed(0)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    torch.save({"state_dict": state, "ema_state_dict": ema, "global_step": 7}, tmp / "tiny.ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the subprocess runs below (OMP_NUM_THREADS=1)
    try:
        results = evaluator(tmp / "one", tmp / "cache").run(experiment.model, experiment.datamodule, tmp / "tiny.ckpt",
                                                             config="tiny.yaml")
    finally:
        torch.set_num_threads(threads)
    return tmp, experiment, results


def run_cli(tmp: Path, out: str, *extra: str, devices: int = 1, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lit_score.evaluate", "--config", str(tmp / "tiny.yaml"), "--config",
           str(tmp / "eval.yaml"), "--ckpt_path", str(tmp / "tiny.ckpt"), "--evaluation.out_dir", str(tmp / out),
           "--trainer.devices", str(devices), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    return proc


@pytest.mark.slow  # ~25 s: 2 DDP processes (make test-slow, in CI)
def test_two_ddp_processes_give_the_same_samples_and_numbers_as_one(setup):
    """`python -m lit_score.evaluate --trainer.devices 2` (two gloo processes) writes bit-identical shards and gives
    exactly the FID, KID and IS of one process; the work was split over both. Its reference statistics, computed
    anew by the two processes (another cache_dir), count every training image once, as the one process's did."""
    tmp, experiment, one = setup
    run_cli(tmp, "two", "--evaluation.cache_dir", str(tmp / "cache2"), devices=2)
    two = json.loads((tmp / "two" / "results.json").read_text())
    assert two["protocol"]["world_size"] == 2 and one["protocol"]["world_size"] == 1
    experiment.datamodule.setup("fit")
    num_train = len(experiment.datamodule.train_set)  # 1617: odd, so the two processes' shares differ
    assert two["protocol"]["reference"]["count"] == one["protocol"]["reference"]["count"] == num_train
    assert len(list((tmp / "cache2").iterdir())) == 1
    for key in ("fid", "kid_mean", "kid_std", "inception_score", "is_mean", "is_std"):
        assert two[key] == one[key], key
    for i in range(8):
        a = torch.load(tmp / "one" / "samples" / f"shard_{i:06d}.pt", weights_only=True)
        b = torch.load(tmp / "two" / "samples" / f"shard_{i:06d}.pt", weights_only=True)
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["features"], b["features"])
    assert math.isfinite(one["fid"]) and one["fid"] > 0 and one["nfe"] == 5


def test_protocol_is_recorded_in_json_and_tensorboard(setup):
    """results.json states n, seeds, sampler, NFE, weights, checkpoint step and reference set; TensorBoard has the
    FID and IS scalars at the checkpoint's step and the protocol as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, experiment, one = setup
    saved = json.loads((tmp / "one" / "results.json").read_text())
    assert saved["fid"] == one["fid"] and saved["complete"]
    protocol = saved["protocol"]
    assert protocol["samples"]["num_samples"] == 256 and protocol["samples"]["seeds"] == [0, 255]
    assert protocol["samples"]["sampler"] == {"class_path": "lit_score.sampling.sigma.EDMSampler", "init_args": {
        "steps": 3, "schedule": "karras", "sigma_min": None, "sigma_max": None, "S_churn": 0.0, "S_min": 0.0,
        "S_max": "inf", "S_noise": 1.0, "float64": False}}
    assert protocol["samples"]["weights"] == "ema" and protocol["checkpoint"]["global_step"] == 7
    assert protocol["reference"]["count"] > 1000 and protocol["reference"]["key"].startswith("digits-16px-gray")
    metrics = protocol["metrics"]
    features = RandomConvFeatures(num_features=16)
    assert metrics["n"] == 256 and metrics["feature_network"]["identity"] == features.identity
    assert metrics["feature_network"]["weights_hash"] == features.identity.split("-")[-1]
    assert metrics["kid"] == {"subsets": 100, "subset_size": 64, "features": 10000, "seed": 2020}
    assert set(saved) == {"complete", "n", "fid", "kid_mean", "kid_std", "nfe", "inception_score", "is_mean",
                          "is_std", "protocol"}
    assert "seed_sets" not in protocol["samples"] and "seed_sets" not in metrics
    events = EventAccumulator(str(tmp / "one" / "tensorboard"))
    events.Reload()
    assert {"eval/fid@256", "eval/kid@256", "eval/is@256", "eval/nfe"} <= set(events.Tags()["scalars"])
    (fid,) = events.Scalars("eval/fid@256")
    assert fid.step == 7 and fid.value == pytest.approx(one["fid"], rel=1e-6)


def test_stopped_run_resumes_from_its_shards_with_the_same_result(setup):
    """A run that stops after 3 shards (max_shards) reports itself incomplete; the next run keeps those shard files
    untouched, draws only the rest, and gives exactly the uninterrupted result."""
    tmp, experiment, one = setup
    out, cache = tmp / "resumed", tmp / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = evaluator(out, cache, max_shards=3).run(experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
        assert first == {"complete": False, "shards_left": 5, "num_shards": 8}
        kept = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("shard_*.pt")}
        assert len(kept) == 3
        second = evaluator(out, cache).run(experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
    finally:
        torch.set_num_threads(threads)
    assert second["protocol"]["resumed_shards"] == 3
    assert {n: (out / "samples" / n).stat().st_mtime_ns for n in kept} == kept
    assert second["fid"] == one["fid"] and second["inception_score"] == one["inception_score"]


@pytest.fixture(scope="module")
def three_sets(setup, one_thread):
    """`lit-score-eval ... --evaluation.num_samples 64 --evaluation.seed_sets 3` (in-process): its results.json and
    what it printed."""
    from lit_score.evaluate.cli import run as evaluate

    tmp, experiment, one = setup
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate(["--config", str(tmp / "tiny.yaml"), "--config", str(tmp / "eval.yaml"), "--ckpt_path",
                  str(tmp / "tiny.ckpt"), "--evaluation.out_dir", str(tmp / "sets3"), "--trainer.devices", "1",
                  "--evaluation.num_samples", "64", "--evaluation.seed_sets", "3"])
    return json.loads((tmp / "sets3" / "results.json").read_text()), printed.getvalue()


def test_three_seed_sets_report_each_sets_numbers_their_minimum_and_mean(setup, three_sets):
    """EDM's protocol in one command: set k holds seeds 64k..64k+63, and its FID, KID and IS equal exactly those of
    a one-set run with first_seed 64k (the oracle); the minimum, mean and sample std over the sets are numpy's, the
    top-level numbers are the lowest-FID set's, the reference is named, TensorBoard has each set's FID with the min
    and mean, and one line sums it up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, experiment, one = setup
    results, printed = three_sets
    sets = results["seed_sets"]
    assert [s["seeds"] for s in sets] == [[0, 63], [64, 127], [128, 191]] and results["n"] == 64
    assert len(list((tmp / "sets3" / "samples").glob("shard_*.pt"))) == 6
    for k, s in enumerate(sets):
        alone = evaluator(tmp / f"set{k}", tmp / "cache", num_samples=64, first_seed=64 * k).run(
            experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
        assert alone["protocol"]["samples"]["seeds"] == s["seeds"]
        for key in ("fid", "kid_mean", "kid_std", "inception_score", "is_mean", "is_std", "nfe"):
            assert s[key] == alone[key], (k, key)
    fids = np.array([s["fid"] for s in sets])
    assert len(set(fids)) == 3
    summary = results["over_seed_sets"]
    assert summary["fid"]["min"] == fids.min() and summary["fid"]["argmin"] == fids.argmin()
    assert summary["fid"]["mean"] == pytest.approx(fids.mean(), rel=1e-12)
    assert summary["fid"]["sample_std"] == pytest.approx(fids.std(ddof=1), rel=1e-9)
    assert summary["inception_score"]["max"] == max(s["inception_score"] for s in sets)
    best = sets[results["best_seed_set"]]
    assert results["fid"] == fids.min() == best["fid"] and results["inception_score"] == best["inception_score"]
    assert summary["reference"]["key"] == one["protocol"]["reference"]["key"]
    assert summary["reference"]["source"] == "training set of the DataModule (cached)"
    assert results["protocol"]["metrics"]["seed_sets"] == [[0, 63], [64, 127], [128, 191]]
    line = next(line for line in printed.splitlines() if "seed sets" in line)
    assert line.startswith("lit-score-eval: FID@64 over 3 seed sets: ") and "(seeds 128..191)" in line
    assert f"min {fids.min():.4g} (set {fids.argmin()})" in line and f"mean {fids.mean():.4g}" in line
    events = EventAccumulator(str(tmp / "sets3" / "tensorboard"))
    events.Reload()
    for tag, value in [*((f"eval/fid@64/set_{k}", f) for k, f in enumerate(fids)), ("eval/fid@64/min", fids.min()),
                       ("eval/fid@64/mean", fids.mean()), ("eval/fid@64", fids.min())]:
        assert events.Scalars(tag)[0].value == pytest.approx(value, rel=1e-6), tag


def test_a_restart_after_the_first_seed_set_reuses_its_shards(setup, three_sets):
    """A run stopped once the first set's 2 shards are done (max_shards) leaves them untouched on restart, which
    samples only the other 4 and reports exactly what the uninterrupted command did; another seed_sets in the same
    out_dir is refused, naming it."""
    tmp, experiment, one = setup
    out = tmp / "sets3_resumed"
    first = evaluator(out, tmp / "cache", num_samples=64, seed_sets=3, max_shards=2).run(
        experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
    assert first == {"complete": False, "shards_left": 4, "num_shards": 6}
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("shard_*.pt")}
    assert sorted(kept) == ["shard_000000.pt", "shard_000001.pt"]
    assert [torch.load(out / "samples" / n, weights_only=True)["seeds"] for n in sorted(kept)] == [[0, 31], [32, 63]]
    second = evaluator(out, tmp / "cache", num_samples=64, seed_sets=3).run(
        experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
    assert second["protocol"]["resumed_shards"] == 2
    assert {n: (out / "samples" / n).stat().st_mtime_ns for n in kept} == kept
    assert len(list((out / "samples").glob("shard_*.pt"))) == 6
    assert second["seed_sets"] == three_sets[0]["seed_sets"]
    assert second["over_seed_sets"] == three_sets[0]["over_seed_sets"]
    for seed_sets in (2, 1):
        with pytest.raises(ValueError, match=rf"another protocol \(samples: .*seed_sets: 3 -> {seed_sets}"):
            evaluator(out, tmp / "cache", num_samples=64, seed_sets=seed_sets).run(
                experiment.model, experiment.datamodule, tmp / "tiny.ckpt")


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "3"])
def test_seed_sets_must_be_a_whole_number_of_at_least_one(value, tmp_path):
    with pytest.raises(ConfigurationError, match=rf"^seed_sets must be a whole number >= 1 .*got {value!r}$"):
        evaluator(tmp_path, tmp_path, seed_sets=value)


def test_lit_score_eval_refuses_bad_seed_sets_in_one_line(setup, capsys, monkeypatch):
    """`--evaluation.seed_sets 0` and `... three` are one-line errors with exit status 2, before any output."""
    from lit_score.errors import run_reporting_errors
    from lit_score.evaluate.cli import run as evaluate

    tmp, experiment, one = setup
    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).parent / "lit-score-eval")])
    with pytest.raises(ConfigurationError, match="export_reference writes one sample set's statistics"):
        evaluator(tmp, tmp, seed_sets=3, export_reference=str(tmp / "x.npz"))
    for value, message in (("0", "seed_sets must be a whole number >= 1"),
                           ("three", "evaluation.seed_sets: Expected a <class 'int'>")):
        try:
            status = run_reporting_errors(lambda: evaluate(
                ["--config", str(tmp / "tiny.yaml"), "--config", str(tmp / "eval.yaml"), "--ckpt_path",
                 str(tmp / "tiny.ckpt"), "--evaluation.out_dir", str(tmp / "bad"), "--evaluation.seed_sets", value])
                and 0, "lit-score-eval")
        except SystemExit as exit_:  # what the parser refuses exits at once
            status = exit_.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and lines[-2].startswith("lit-score-eval: error: ") and message in lines[-2], lines
    assert not (tmp / "bad").exists()


@pytest.mark.slow
def test_killed_process_resumes_from_its_shards(setup):
    """SIGKILL half-way through a real run; the restarted command reuses the finished shards and gives the same FID."""
    tmp, experiment, one = setup
    (tmp / "slow.yaml").write_text(EVAL.format(steps=10, cache=tmp / "cache"))
    reference = run_cli(tmp, "slow_ref", "--config", str(tmp / "slow.yaml"))
    assert reference.returncode == 0
    proc = run_cli(tmp, "killed", "--config", str(tmp / "slow.yaml"), wait=False)
    shards = tmp / "killed" / "samples"
    deadline = time.time() + 240
    while len(list(shards.glob("shard_*.pt"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.pt")}
    assert 3 <= len(kept) < 8
    run_cli(tmp, "killed", "--config", str(tmp / "slow.yaml"))
    resumed = json.loads((tmp / "killed" / "results.json").read_text())
    expected = json.loads((tmp / "slow_ref" / "results.json").read_text())
    assert resumed["protocol"]["resumed_shards"] == len(kept)
    assert {n: (shards / n).stat().st_mtime_ns for n in kept} == kept
    assert resumed["fid"] == expected["fid"]


def test_another_protocol_in_the_same_out_dir_is_refused(setup):
    """Re-running into an out_dir with different settings names the settings instead of mixing samples."""
    tmp, experiment, one = setup
    with pytest.raises(ValueError, match=r"another protocol \(samples: .*num_samples: 256 -> 300"):
        evaluator(tmp / "one", tmp / "cache", num_samples=300).run(experiment.model, experiment.datamodule,
                                                                  tmp / "tiny.ckpt")


def test_test_set_bits_per_dim_are_the_likelihood_of_the_first_test_images(setup, capsys):
    """bpd = mean of Likelihood.bits_per_dim over the first test images (seed = index), sharded by batch; the
    samples and the bits/dim show progress with an ETA."""
    tmp, experiment, one = setup
    likelihood = Likelihood(rtol=0.1, atol=0.1)
    ev = evaluator(tmp / "bpd", tmp / "cache", num_samples=32, shard_size=32, bpd=True, likelihood=likelihood,
                   bpd_num_images=2, bpd_batch_size=1, inception_score=False, kid=False)
    results = ev.run(experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
    bars = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "ETA 00:00" in line]
    assert any(b.startswith("samples for FID@32: 100%") and "images 32/32, NFE 5 per image" in b for b in bars)
    assert any(b.startswith("test-set bits/dim of 2 images: 100%") and "images 2/2, NFE" in b for b in bars)
    model, data = experiment.model, experiment.datamodule
    x = torch.stack([data.test_dataloader().dataset[i][0] for i in range(2)])  # (image, label) pairs
    expected = torch.cat([likelihood.bits_per_dim(model.score_fn, model.sde, x[i:i + 1], [i], model.data_space)[0]
                          for i in (0, 1)])
    assert results["bpd"]["num_images"] == 2
    assert results["bpd"]["mean"] == pytest.approx(float(expected.double().mean()), rel=1e-9)
    assert len(list((tmp / "bpd" / "bpd").glob("shard_*.pt"))) == 2


def test_checkpoint_weights_are_chosen_and_missing_ema_is_explained(setup, tmp_path):
    """weights=ema loads ema_state_dict, raw loads state_dict; a checkpoint without EMA says to use raw."""
    tmp, experiment, one = setup
    model = experiment.model
    ckpt = torch.load(tmp / "tiny.ckpt", weights_only=True)
    load_weights(model, tmp / "tiny.ckpt", "ema")
    assert torch.equal(model.state_dict()["net.all_modules.1.weight"], ckpt["ema_state_dict"]["net.all_modules.1.weight"])
    info = load_weights(model, tmp / "tiny.ckpt", "raw")
    assert info["global_step"] == 7
    assert torch.equal(model.state_dict()["net.all_modules.1.weight"], ckpt["state_dict"]["net.all_modules.1.weight"])
    torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "raw_only.ckpt")
    with pytest.raises(CheckpointError, match="evaluation.weights: raw"):
        load_weights(model, tmp_path / "raw_only.ckpt", "ema")


def test_inception_score_of_known_distributions():
    """Uniform predictions give IS 1; confident predictions spread evenly over K classes give IS K."""
    assert inception_score(torch.zeros(100, 10))[0] == pytest.approx(1.0)
    confident = torch.eye(10).repeat(10, 1) * 100
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_streamed_inception_score_equals_torch_fidelity_for_uneven_splits():
    """Oracle: torch-fidelity's isc_features_to_metric without shuffling, 23 logits in 5 splits (sizes 4 and 5),
    fed to ours in batches of 3 that straddle the split boundaries."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    from lit_score.evaluate import InceptionScore

    logits = torch.randn(23, 7, generator=torch.Generator().manual_seed(0)) * 3
    theirs = isc_features_to_metric(logits, splits=5, shuffle=False)
    score = InceptionScore(23, 5)
    for chunk in logits.split(3):
        score.update(chunk)
    mean, std = score.compute()
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)
    assert std > 0


def test_reference_files_of_edm_and_score_sde_load_and_round_trip(tmp_path):
    """EDM's mu/sigma .npz is read as is; score_sde's pool_3 activations give their mean and unbiased covariance
    (numpy's) and their first rows for KID; what save_reference writes in either format loads back the same."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(50, 4)).astype(np.float32)
    np.savez(tmp_path / "edm.npz", mu=acts.mean(0, dtype=np.float64),
             sigma=np.cov(acts.astype(np.float64), rowvar=False))
    np.savez(tmp_path / "score_sde.npz", pool_3=acts)
    edm, sde = load_reference(tmp_path / "edm.npz", 4), load_reference(tmp_path / "score_sde.npz", 4, keep_features=7)
    assert edm.count == -1 and edm.features is None and sde.count == 50
    np.testing.assert_allclose(sde.mean.numpy(), acts.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sde.cov.numpy(), np.cov(acts.astype(np.float64), rowvar=False), rtol=1e-10)
    torch.testing.assert_close(edm.cov, sde.cov, rtol=1e-10, atol=1e-12)
    assert torch.equal(sde.features, torch.from_numpy(acts[:7]))
    save_reference(tmp_path / "out_edm.npz", sde.mean, sde.cov, "edm")
    save_reference(tmp_path / "out_sde.npz", sde.mean, sde.cov, "score_sde", torch.from_numpy(acts))
    with np.load(tmp_path / "out_edm.npz") as saved:
        assert sorted(saved.files) == ["mu", "sigma"] and saved["mu"].dtype == np.float64
        assert np.array_equal(saved["sigma"], sde.cov.numpy())
    with np.load(tmp_path / "out_sde.npz") as saved:
        assert saved.files == ["pool_3"] and np.array_equal(saved["pool_3"], acts)
    with pytest.raises(ValueError, match="none were given"):
        save_reference(tmp_path / "x.npz", sde.mean, sde.cov, "score_sde")


def test_bad_reference_files_are_refused_with_the_reason(tmp_path):
    """Missing keys, misshapen mu/sigma, another network's dimension and a file that is no .npz each name the
    problem."""
    rng = np.random.default_rng(0)
    cases = {"keys.npz": dict(x=rng.normal(size=(5, 4))),
             "shape.npz": dict(mu=np.zeros(4), sigma=np.zeros((4, 3))),
             "dims.npz": dict(mu=np.zeros(16), sigma=np.eye(16)),
             "pool.npz": dict(pool_3=np.zeros(7))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "text.npz").write_text("not an archive")
    for name, message in (("keys.npz", r"holds \['x'\]; expected 'mu' and 'sigma' \(EDM's fid-refs\) or 'pool_3'"),
                          ("shape.npz", r"sigma a matrix \(D, D\); got \(4,\) and \(4, 3\)"),
                          ("dims.npz", r"16-dimensional statistics but the feature network gives 2048"),
                          ("pool.npz", r"pool_3 must hold activations \(N >= 2, D\)"),
                          ("text.npz", "cannot read .* as a .npz archive")):
        with pytest.raises(ValueError, match=message):
            load_reference(tmp_path / name, num_features=2048)
    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        load_reference(tmp_path / "missing.npz")


def test_export_writes_the_samples_statistics_in_both_formats(setup):
    """Re-running the finished evaluation with export_reference writes the mean and covariance of every sample's
    features (EDM format) or every feature vector (score_sde format); as a reference it gives FID 0 to the same
    samples."""
    tmp, experiment, one = setup
    feats = torch.cat([torch.load(tmp / "one" / "samples" / f"shard_{i:06d}.pt", weights_only=True)["features"]
                       for i in range(8)]).numpy()
    for fmt in ("edm", "score_sde"):
        path = tmp / f"export_{fmt}.npz"
        results = evaluator(tmp / "one", tmp / "cache", export_reference=str(path), reference_format=fmt).run(
            experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
        assert results["fid"] == one["fid"] and results["exported"] == {"path": str(path), "format": fmt}
        ref = load_reference(path, 16)
        np.testing.assert_allclose(ref.mean.numpy(), feats.mean(0), rtol=1e-9)
        np.testing.assert_allclose(ref.cov.numpy(), np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
        again = evaluator(tmp / "one", tmp / "cache", reference=str(path), kid=fmt == "score_sde").run(
            experiment.model, experiment.datamodule, tmp / "tiny.ckpt")
        assert again["fid"] == pytest.approx(0, abs=1e-6)
        assert (again["kid_mean"] is None) == (fmt == "edm")


INCEPTION_EVAL = """
evaluation:
  num_samples: 8
  batch_size: 4
  shard_size: 4
  sampler:
    class_path: lit_score.sampling.EDMSampler
    init_args: {{steps: 2}}
  features:
    class_path: lit_score.metrics.InceptionV3
    init_args: {{weights_path: {weights}}}
  is_splits: 2
  kid_subsets: 10
  kid_subset_size: 4
  classifier: null
  reference: {reference}
  bpd: false
"""


@pytest.mark.slow
def test_inception_evaluation_under_one_and_two_processes(setup, inception_weights):
    """`lit-score-eval` with InceptionV3 (random-weight file; IS from its logits) against a score_sde-format
    reference of 12 training images' pool3 features writes FID, KID and IS, identical from 1 and 2 gloo processes,
    and records n, the network with its weights hash, the reference and the sampler."""
    from lit_score.metrics import InceptionV3

    tmp, experiment, one = setup
    features = InceptionV3(str(inception_weights))
    experiment.datamodule.setup("fit")
    images = torch.stack([experiment.datamodule.train_set[i][0] for i in range(12)])  # (image, label) pairs
    save_reference(tmp / "pool3.npz", torch.zeros(2048), torch.eye(2048), "score_sde",
                   features(experiment.model.data_space.to_uint8(images)))
    (tmp / "inception.yaml").write_text(INCEPTION_EVAL.format(weights=inception_weights, reference=tmp / "pool3.npz"))
    results = []
    for devices in (1, 2):
        run_cli(tmp, f"inception{devices}", "--config", str(tmp / "inception.yaml"), devices=devices)
        results.append(json.loads((tmp / f"inception{devices}" / "results.json").read_text()))
    keys = ("fid", "kid_mean", "kid_std", "inception_score", "is_mean", "is_std")
    assert all(math.isfinite(results[0][k]) for k in keys) and results[0]["fid"] > 0 and results[0]["is_mean"] > 1
    assert [r[k] for r in results for k in keys] == [results[0][k] for k in keys] * 2
    record = results[1]["protocol"]
    assert record["world_size"] == 2 and record["metrics"]["n"] == 8
    assert record["metrics"]["feature_network"]["identity"] == features.identity
    assert record["metrics"]["feature_network"]["init_args"]["weights_path"] == str(inception_weights)
    assert record["metrics"]["classifier"]["class_path"].endswith("InceptionV3Logits")
    assert record["reference"]["count"] == 12 and record["reference"]["source"] == str(tmp / "pool3.npz")
    assert record["samples"]["sampler"]["init_args"]["steps"] == 2
