"""`--evaluation.guidance_scales`: FID, KID and IS of a guided class-conditional model at several guidance scales,
each scale's shards apart and resumable, its numbers those of an evaluation at that scale alone.

A tiny DDPM++ (3 classes, random weights) with classifier-free guidance, 24 samples per scale from EDM's sampler
with 3 steps, random conv features, and reference statistics of random images.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lit_score.data_space import DataSpace
from lit_score.diffusion.denoiser import EDMPrecond
from lit_score.diffusion.guidance import AutoGuidance, ClassifierFreeGuidance
from lit_score.diffusion.losses import EDMLoss
from lit_score.diffusion.sdes import VESDE
from lit_score.errors import ConfigurationError
from lit_score.evaluate import Evaluator, save_reference
from lit_score.evaluate.evaluator import guidance_sweep_summary, scale_folder
from lit_score.metrics import RandomConvFeatures
from lit_score.networks import DDPMpp
from lit_score.runtime.module import ScoreModel
from lit_score.sampling import EDMSampler

SCALES = [0, 1, 3]
NUM_SAMPLES = 24
METRICS = ("fid", "kid_mean", "kid_std", "inception_score", "is_mean", "is_std", "nfe")


def tiny_model(num_classes: int = 3, guidance=None, seed: int = 0) -> ScoreModel:
    torch.manual_seed(seed)
    net = DDPMpp(num_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 num_classes=num_classes, label_dropout=0.1 if num_classes else 0.0, init_scale=1.0)
    return ScoreModel(net, VESDE(0.002, 80.0), EDMLoss(), EDMPrecond(),
                      data_space=DataSpace((1, 8, 8), True, num_classes=num_classes), guidance=guidance).eval()


def evaluator(out_dir, reference, **kwargs) -> Evaluator:
    """As tests/test_evaluation.py's, smaller: 3 shards of 8 samples, a reference file instead of a data set."""
    args = dict(out_dir=str(out_dir), num_samples=NUM_SAMPLES, batch_size=8, shard_size=8,
                sampler=EDMSampler(steps=3), features=RandomConvFeatures(num_features=8),
                classifier=RandomConvFeatures(num_features=5, seed=1), is_splits=2, kid_subsets=10,
                kid_subset_size=8, bpd=False, reference=str(reference))
    return Evaluator(**{**args, **kwargs})


class Counting:
    """Counts the model's sample() calls (one per batch of 8 seeds)."""

    def __init__(self, model: ScoreModel) -> None:
        self.model, self.calls, self.inner = model, 0, model.sample

    def __enter__(self):
        def sample(*args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        self.model.sample = sample
        return self

    def __exit__(self, *exc):
        del self.model.sample


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, one_thread):
    """Reference statistics of 64 random images, the model, and a sweep over SCALES counted in sample() calls."""
    tmp = tmp_path_factory.mktemp("sweep")
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = RandomConvFeatures(num_features=8)(images).double()
    save_reference(tmp / "ref.npz", features.mean(0), torch.from_numpy(np.cov(features.numpy(), rowvar=False)),
                   "score_sde", features)
    model = tiny_model(guidance=ClassifierFreeGuidance(1.0))
    own = model.guidance
    with Counting(model) as counter:
        results = evaluator(tmp / "sweep", tmp / "ref.npz", guidance_scales=SCALES).run(model, None)
    assert model.guidance is own and own.scale == 1.0  # restored
    assert counter.calls == 3 * 3
    return tmp, model, results


def test_the_sweep_reports_each_scale_and_the_models_own_at_the_top(sweep):
    tmp, model, results = sweep
    entries = results["guidance_sweep"]
    assert [e["scale"] for e in entries] == [0.0, 1.0, 3.0]
    for e in entries:
        assert all(e[k] is not None and math.isfinite(e[k]) for k in METRICS), e
        assert e["nfe"] == 5
    assert results["guidance"] == {"method": "ClassifierFreeGuidance", "interval": None, "model_scale": 1.0,
                                   "scales": [0.0, 1.0, 3.0], "top_level_scale": 1.0,
                                   "top_level_is": "the model's guidance scale"}
    assert all(results[k] == entries[1][k] for k in METRICS) and results["complete"] and results["n"] == NUM_SAMPLES
    saved = json.loads((tmp / "sweep" / "results.json").read_text())
    assert saved["guidance_sweep"] == entries and saved["fid"] == results["fid"]
    assert saved["protocol"]["samples"]["guidance"] == {"method": "ClassifierFreeGuidance", "scale": "swept",
                                                        "interval": None}
    assert saved["protocol"]["metrics"]["guidance_scales"] == [0.0, 1.0, 3.0]
    folders = sorted(p.name for p in (tmp / "sweep").iterdir() if p.is_dir())
    assert folders == ["guidance_0", "guidance_1", "guidance_3", "tensorboard"]
    assert all(len(list((tmp / "sweep" / f"guidance_{w}").glob("shard_*.pt"))) == 3 for w in SCALES)
    assert (tmp / "sweep" / "fid_vs_guidance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = guidance_sweep_summary(results)
    assert len(lines) == 3 and lines[2].startswith(f"guidance scale 3 (ClassifierFreeGuidance): FID@{NUM_SAMPLES} "
                                                   f"{entries[2]['fid']:.4g}, IS ")
    assert lines[1].endswith("(the top-level metrics)") and not lines[0].endswith("(the top-level metrics)")


def test_each_scale_gives_exactly_the_numbers_of_an_evaluation_at_that_scale_alone(sweep):
    """Oracle: the model's guidance set to scale w, no sweep: the same samples, bit for bit, hence the same FID, KID,
    IS; their shards carry the sweep's fingerprint for w. Scale 1 and scale 3 draw different samples."""
    tmp, model, results = sweep
    images = {}
    try:
        for entry in results["guidance_sweep"]:
            w = entry["scale"]
            model.guidance.scale = w
            alone = evaluator(tmp / f"alone_{w:g}", tmp / "ref.npz").run(model, None)
            assert "guidance_sweep" not in alone
            assert alone["protocol"]["samples"]["guidance"]["scale"] == w
            for key in METRICS:
                assert alone[key] == entry[key], (w, key)
            for i in range(3):
                a = torch.load(tmp / f"alone_{w:g}" / "samples" / f"shard_{i:06d}.pt", weights_only=True)
                b = torch.load(tmp / "sweep" / scale_folder(w) / f"shard_{i:06d}.pt", weights_only=True)
                assert torch.equal(a["images"], b["images"]) and a["fingerprint"] == b["fingerprint"]
            images[w] = a["images"]
    finally:
        model.guidance.scale = 1.0
    fids = {e["scale"]: e["fid"] for e in results["guidance_sweep"]}
    assert fids[1.0] != fids[3.0] and fids[0.0] != fids[1.0]
    assert not torch.equal(images[1.0], images[3.0])


def test_a_rerun_reuses_every_shard_and_a_longer_sweep_samples_only_the_new_scale(sweep):
    tmp, model, results = sweep
    out = tmp / "sweep"
    kept = {p.relative_to(out): p.stat().st_mtime_ns for p in out.glob("guidance_*/shard_*.pt")}
    assert len(kept) == 9
    with Counting(model) as counter:
        again = evaluator(out, tmp / "ref.npz", guidance_scales=SCALES).run(model, None)
    assert counter.calls == 0 and again["protocol"]["resumed_shards"] == 9
    assert again["guidance_sweep"] == results["guidance_sweep"]
    with Counting(model) as counter:
        longer = evaluator(out, tmp / "ref.npz", guidance_scales=[*SCALES, 1.5]).run(model, None)
    assert counter.calls == 3 and longer["protocol"]["resumed_shards"] == 9
    assert longer["guidance_sweep"][:3] == results["guidance_sweep"] and longer["guidance_sweep"][3]["scale"] == 1.5
    assert len(list((out / "guidance_1.5").glob("shard_*.pt"))) == 3
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept


def test_another_method_interval_or_a_plain_run_never_reuses_the_shards(sweep):
    """The shards' fingerprint holds the guidance's method, scale and interval; an out_dir with a sweep refuses a
    sweep with another interval and an evaluation without a sweep."""
    tmp, model, results = sweep
    samples = evaluator(tmp / "x", tmp / "ref.npz", guidance_scales=SCALES).protocol(
        model, None, {"sha256": "0"}, None)["samples"]
    prints = {Evaluator.fingerprint(Evaluator.scale_samples(samples, w)) for w in (0.0, 1.0, 3.0)}
    assert len(prints) == 3
    for other in (ClassifierFreeGuidance(1.0, interval=[0.5, 5.0]), AutoGuidance("guide.ckpt", 1.0)):
        guided = tiny_model(guidance=other)
        part = evaluator(tmp / "x", tmp / "ref.npz", guidance_scales=SCALES).protocol(
            guided, None, {"sha256": "0"}, None)["samples"]
        assert Evaluator.fingerprint(Evaluator.scale_samples(part, 1.0)) not in prints
    model.guidance.interval = (0.5, 5.0)
    try:
        with pytest.raises(ValueError, match=r"another protocol \(samples: guidance: .*'interval': None.* -> "
                                             r".*'interval': \[0.5, 5.0\]"):
            evaluator(tmp / "sweep", tmp / "ref.npz", guidance_scales=SCALES).run(model, None)
    finally:
        model.guidance.interval = None
    with pytest.raises(ValueError, match=r"another protocol \(samples: guidance: .*'scale': 'swept'.* -> "
                                         r".*'scale': 1.0"):
        evaluator(tmp / "sweep", tmp / "ref.npz").run(model, None)


def test_seed_sets_give_each_scale_the_minimum_over_its_sets(sweep):
    """With 2 seed sets of 16, each scale's FID is the lower of its sets', which are those of a 2-set evaluation at
    that scale alone."""
    tmp, model, _ = sweep
    results = evaluator(tmp / "sets", tmp / "ref.npz", num_samples=16, seed_sets=2, guidance_scales=[3, 0]).run(
        model, None)
    assert [e["scale"] for e in results["guidance_sweep"]] == [3.0, 0.0]
    assert results["guidance"]["top_level_scale"] == 3.0  # the model's 1 is not swept: the first scale
    assert results["guidance"]["top_level_is"].startswith("the first swept scale")
    for e in results["guidance_sweep"]:
        fids = [s["fid"] for s in e["seed_sets"]]
        assert len(fids) == 2 and e["fid"] == min(fids) == e["over_seed_sets"]["fid"]["min"]
    assert results["fid"] == results["guidance_sweep"][0]["fid"]
    model.guidance.scale = 3.0
    try:
        alone = evaluator(tmp / "sets_alone", tmp / "ref.npz", num_samples=16, seed_sets=2).run(model, None)
    finally:
        model.guidance.scale = 1.0
    assert alone["seed_sets"] == results["guidance_sweep"][0]["seed_sets"]
    assert "min over 2 seed sets: " in guidance_sweep_summary(results)[0]


def test_tensorboard_has_fid_against_the_scale(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, model, results = sweep
    events = EventAccumulator(str(tmp / "sweep" / "tensorboard"))
    events.Reload()
    fid = events.Scalars(f"eval/fid_vs_guidance@{NUM_SAMPLES}")
    by_step = {e.step: e.value for e in fid}  # the last of the runs that wrote there
    for entry in results["guidance_sweep"]:
        assert by_step[round(100 * entry["scale"])] == pytest.approx(entry["fid"], rel=1e-6)
    assert f"eval/is_vs_guidance@{NUM_SAMPLES}" in events.Tags()["scalars"]
    assert "eval/guidance_sweep/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize("num_classes", [3, 0])
def test_a_model_without_guidance_is_refused_in_one_line(num_classes, tmp_path):
    model = tiny_model(num_classes=num_classes)
    with pytest.raises(ConfigurationError) as err:
        evaluator(tmp_path / "out", tmp_path / "ref.npz", guidance_scales=[1, 2]).run(model, None)
    message = str(err.value)
    assert "\n" not in message and "--model.guidance ClassifierFreeGuidance" in message
    assert "AutoGuidance or ClassifierGuidance" in message
    assert not (tmp_path / "out").exists()


def test_an_unconditional_model_whose_guidance_is_not_applied_is_refused(tmp_path):
    model = tiny_model(num_classes=0, guidance=AutoGuidance("guide.ckpt"))
    with pytest.raises(ConfigurationError, match=r"^evaluation.guidance_scales .*this model is unconditional.*"
                                                 r"--model.guidance ClassifierGuidance$"):
        evaluator(tmp_path / "out", tmp_path / "ref.npz", guidance_scales=[1, 2]).run(model, None)


@pytest.mark.parametrize("scales, message", [([], "non-empty list"), ([1, float("nan")], "finite numbers"),
                                             ([1, 2, 1.0], "lists a scale twice"), ("1,2", "list of numbers"),
                                             ([True], "finite numbers")])
def test_bad_scales_are_refused(scales, message, tmp_path):
    with pytest.raises(ConfigurationError, match=message):
        evaluator(tmp_path, tmp_path / "ref.npz", guidance_scales=scales)


def test_export_reference_is_refused_with_a_sweep(tmp_path):
    with pytest.raises(ConfigurationError, match="export_reference writes one sample set's statistics, but "
                                                 "guidance_scales sweeps 2"):
        evaluator(tmp_path, tmp_path / "ref.npz", guidance_scales=[1, 2], export_reference=str(tmp_path / "x.npz"))


def test_scale_folders_name_the_scale():
    assert [scale_folder(w) for w in (0.0, 1.0, 1.5, -2.0, 1.0000001)] == [
        "guidance_0", "guidance_1", "guidance_1.5", "guidance_-2", "guidance_1.0000001"]


def test_the_command_line_takes_a_list_of_scales():
    """`--evaluation.guidance_scales [1,2,3,5]` as lit-score-eval parses it (the Evaluator's arguments)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Evaluator, "evaluation")
    config = parser.parse_args(["--evaluation.guidance_scales", "[1,2,3.5,5]"])
    assert config.evaluation.guidance_scales == [1.0, 2.0, 3.5, 5.0]
    assert parser.parse_args([]).evaluation.guidance_scales is None
