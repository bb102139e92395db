"""Post-hoc EMA (Karras et al. 2024): the power-function EMA's weights, reconstruction of another width from
snapshots of a synthetic trajectory, and the callback's state across a resume, bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lit_score.diffusion.ema import (CHECKPOINT_KEY, PowerEMA, find_snapshots, gamma_to_sigma_rel, reconstruct,
                                   save_snapshot, sigma_rel_to_gamma)
from lit_score.cli.tools import posthoc_ema_main as main
from test_resume import fit, last_checkpoint, write_config

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


def test_sigma_rel_and_gamma_as_the_paper():
    """EDM2 section 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; the two maps invert each other."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.01, 0.07, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        sigma_rel_to_gamma(0.3)


def test_tracked_average_weighs_each_step_by_the_power_profile():
    """Property: after n updates, step k's weight is int_{k-1}^k (g + 1) tau^g dtau / n^(g + 1) (impulse responses)."""
    n, g = 50, sigma_rel_to_gamma(0.1)
    ema = PowerEMA([0.1])
    for k in range(1, n + 1):
        ema.update({"w": torch.eye(n, dtype=torch.float64)[k - 1]})
    k = np.arange(1, n + 1)
    expected = (k ** (g + 1) - (k - 1) ** (g + 1)) / n ** (g + 1)
    np.testing.assert_allclose(ema.shadows[0]["w"].numpy(), expected, rtol=1e-10, atol=1e-15)


def test_reconstruction_matches_the_directly_tracked_ema(tmp_path):
    """Property: from snapshots of the 0.05 and 0.10 profiles every 100 of 4000 steps of a random-walk-plus-drift
    trajectory, the reconstructed sigma_rel 0.07 (and 0.03, 0.15) EMA equals the one tracked alongside within 1e-3
    relative, while the tracked profiles differ from it by over 10%."""
    g = torch.Generator().manual_seed(0)
    n, every = 4000, 100
    walk = torch.cumsum(torch.randn(n, 64, generator=g, dtype=torch.float64), 0) * 0.01
    trajectory = walk + torch.sin(torch.arange(n)[:, None] / 300.0 + 6 * torch.rand(64, generator=g, dtype=torch.float64))
    tracked, direct = PowerEMA([0.05, 0.10]), PowerEMA([0.07, 0.03, 0.15])
    for i in range(n):
        tracked.update({"w": trajectory[i]})
        direct.update({"w": trajectory[i]})
        if (i + 1) % every == 0:
            for sigma_rel, shadow in zip(tracked.sigma_rels, tracked.shadows):
                save_snapshot(tmp_path, i + 1, sigma_rel, shadow)
    snapshots = find_snapshots(tmp_path)
    assert len(snapshots) == 2 * n // every
    for sigma_rel, shadow in zip(direct.sigma_rels, direct.shadows):
        state, info = reconstruct(snapshots, sigma_rel)
        truth = shadow["w"]
        assert info["step"] == n and len(info["coefficients"]) == len(snapshots)
        assert (state["w"] - truth).norm() / truth.norm() < 1e-3, sigma_rel
    truth = direct.shadows[0]["w"]
    assert min((s["w"] - truth).norm() / truth.norm() for s in tracked.shadows) > 0.1
    early, info = reconstruct(snapshots, 0.07, step=2000)  # at an earlier step, from the snapshots up to it
    assert info["step"] == 2000 and len(info["snapshots"]) == 40


PHEMA = {"class_path": "lit_score.callbacks.PostHocEMA", "init_args": {"sigma_rels": [0.05, 0.1], "every_n_steps": 4}}


def snapshot_files(run_dir: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run_dir / "posthoc_ema").glob("*.pt"))}


def test_posthoc_ema_state_survives_a_resume_bitwise(tmp_path, one_thread):
    """A run stopped at step 7 and resumed to 14 has the uninterrupted run's profiles (in last.ckpt and in every
    snapshot, steps 4, 8, 12 and the final 14) bit for bit; the update count is the optimizer step count."""
    from test_resume import MAX_STEPS, assert_equal_tree

    reference = fit(write_config(tmp_path, "plain", [PHEMA]), "plain")
    assert reference.global_step == MAX_STEPS
    fit(write_config(tmp_path, "first", [PHEMA]), "run", "--trainer.max_steps", "7")
    assert last_checkpoint(tmp_path, "run")["global_step"] == 7
    fit(write_config(tmp_path, "resume", [PHEMA]), "run", "--ckpt_path", "last")
    expected, resumed = last_checkpoint(tmp_path, "plain"), last_checkpoint(tmp_path, "run")
    assert_equal_tree(resumed[CHECKPOINT_KEY], expected[CHECKPOINT_KEY], CHECKPOINT_KEY)
    state = next(v for k, v in expected["callbacks"].items() if k.startswith("PostHocEMA"))
    assert state["num_updates"] == MAX_STEPS
    reference_files = snapshot_files(tmp_path / "runs/tiny/plain")
    assert sorted({v["step"] for v in reference_files.values()}) == [4, 8, 12, 14]
    run_files = snapshot_files(tmp_path / "runs/tiny/run")
    assert set(reference_files) <= set(run_files)  # the stopped run also wrote its step-7 snapshot
    for name, snap in reference_files.items():
        assert_equal_tree(run_files[name], snap, name)


def test_updates_once_per_optimizer_step_with_accumulation(tmp_path, one_thread):
    """With 2 batches per optimizer step the profiles are updated once per step (over the trained network, not the
    EMA network), and the reconstruction command writes a checkpoint (read with weights_only=True) whose EMA
    network (ema.*) is the reconstruction and whose net.* the template's, which `lit-score predict` samples from."""
    from lit_score.cli.lightning_cli import run_cli

    trainer = fit(write_config(tmp_path, "accumulate", [PHEMA]), "acc", "--trainer.accumulate_grad_batches", "2",
                  "--trainer.max_steps", "6")
    assert trainer.global_step == 6
    run_dir = tmp_path / "runs/tiny/acc"
    state = next(v for k, v in last_checkpoint(tmp_path, "acc")["callbacks"].items() if k.startswith("PostHocEMA"))
    assert state["num_updates"] == 6
    snapshots = snapshot_files(run_dir)
    assert sorted({v["step"] for v in snapshots.values()}) == [4, 6]
    assert all(k.startswith("net.") for snap in snapshots.values() for k in snap["state_dict"])
    out = tmp_path / "ema_0.07.ckpt"
    assert main([str(run_dir), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    template = last_checkpoint(tmp_path, "acc")
    expected, _ = reconstruct(find_snapshots(run_dir), 0.07)
    assert_close = torch.testing.assert_close
    assert "ema_state_dict" not in ckpt and set(ckpt["state_dict"]) == set(template["state_dict"])
    for k, v in ckpt["state_dict"].items():
        assert_close(v, expected["net." + k[4:]] if k.startswith("ema.") else template["state_dict"][k], rtol=0, atol=0)
    assert "optimizer_states" not in ckpt and ckpt["posthoc_ema"]["sigma_rel"] == 0.07
    cli = run_cli(["predict", "--config", str(write_config(tmp_path, "predict")), "--ckpt_path", str(out),
                   "--data.init_args.num_samples", "2", "--model.sampler", "EDMSampler",
                   "--model.sampler.steps", "2", "--trainer.logger.init_args.version", "predict"])
    assert cli.trainer.state.finished
    assert cli.model.sampling_net is cli.model.ema  # the weights predict sampled with
    for k, v in cli.model.ema.state_dict().items():
        assert_close(v.cpu(), expected["net." + k], rtol=0, atol=0)
    with pytest.raises(SystemExit):
        main([str(run_dir), "--sigma-rel", "0.07"])  # no --out
    assert main([str(tmp_path), "--sigma-rel", "0.07", "--out", str(out)]) == 2  # no snapshots there


def test_sweep_evaluates_each_sigma_rel(tmp_path, one_thread):
    """`lit-score posthoc-ema RUN --sweep` writes one checkpoint and one lit-score-eval result per sigma_rel, each
    evaluation run on that sigma_rel's reconstruction, and sweep.json with their FIDs."""
    import json

    import yaml

    fit(write_config(tmp_path, "short", [PHEMA]), "short", "--trainer.max_steps", "4")
    run_dir = tmp_path / "runs/tiny/short"
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(yaml.safe_dump({"evaluation": {
        "num_samples": 4, "batch_size": 4, "shard_size": 4, "inception_score": False, "kid": False, "bpd": False,
        "tensorboard": False, "cache_dir": str(tmp_path / "cache"),
        "sampler": {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 2}},
        "features": {"class_path": "lit_score.metrics.RandomConvFeatures",
                     "init_args": {"num_features": 4, "width": 4}}}}))
    out = tmp_path / "sweep"
    assert main([str(run_dir), "--sweep", "0.05", "0.1", "--config", str(write_config(tmp_path, "eval_model")),
                 "--config", str(evaluation), "--sweep-dir", str(out), "--trainer.accelerator", "cpu"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.1] and all(r["fid"] > 0 for r in rows)
    for r in rows:
        result = json.loads((out / f"eval_{r['sigma_rel']:.3f}" / "results.json").read_text())
        assert result["fid"] == r["fid"] and result["nfe"] == 3
        assert torch.load(r["checkpoint"], weights_only=True)["posthoc_ema"]["sigma_rel"] == r["sigma_rel"]
    assert rows[0]["fid"] != rows[1]["fid"]
