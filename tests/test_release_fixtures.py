"""Checkpoints and an export folder written by release 0.1 (tests/fixtures/release_0_1, made by its
make_fixtures.py with that release) load today and give the samples that release drew from them: one model per
0.1 parametrisation (VP and VE continuous DSM, discrete DDPM and SMLD, EDM), five samplers, the EMA weights.

Since 0.2 every sampler starts from the same noise per seed (``lit_score.rng.starting_noise``), the draw the
t-view samplers (PC, ODE) made in 0.1, so their samples are 0.1's as they are. The sigma-view samplers (EDM Heun,
DPM-Solver++, ...) started in 0.1 from draw 0 of each seed's noise stream, ``seeded_normal(seeds, shape, step=0)``,
times sigma_0: they are given that draw as ``start_noise`` and must then give 0.1's samples (so a change of
their dynamics still fails here), and without it must not (the start did change)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_score.data_space import to_uint8
from lit_score.runtime.module import ScoreModel
from lit_score.sampling import DPMSolverPP, EDMSampler, ODESampler, PCSampler, Sampler, SigmaSampler, seeded_normal

HERE = Path(__file__).parent / "fixtures" / "release_0_1"
MODELS = list(json.loads((HERE / "models.json").read_text()))
SAMPLERS = {"default": None, "edm_heun": EDMSampler(steps=5),
            "pc_langevin": PCSampler("reverse_diffusion", "langevin", snr=0.16, steps=25),
            "ode": ODESampler(rtol=1e-3, atol=1e-3), "dpm_solver_pp": DPMSolverPP(steps=8)}
SEEDS = [0, 1, 2, 3]
SCORE_TIMES = [1.0, 0.5, 0.1, 0.01]  # as make_fixtures.py

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recorded():
    with np.load(HERE / "samples.npz") as f:
        return dict(f)


def same_images(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The fraction of pixels within one uint8 level."""
    return float((np.abs(ours.astype(int) - theirs.astype(int)) <= 1).mean())


class Release01Start(Sampler):
    """A sigma-view sampler started from release 0.1's starting noise: draw 0 of each seed's noise stream."""

    def __init__(self, inner: SigmaSampler) -> None:
        self.inner = inner

    def sample(self, D, sde, shape, seeds, device="cpu", start_noise=None):
        return self.inner.sample(D, sde, shape, seeds, device, seeded_normal(seeds, shape, step=0, device=device))


def check(model: ScoreModel, key: str, recorded: dict) -> None:
    x = torch.randn(len(SCORE_TIMES), *model.data_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        score = model.score_fn(x, torch.tensor(SCORE_TIMES))
    # float32 round-off: about 1e-7 of the largest value for score_sde's parametrisations, 4e-5 for EDM's
    expected = torch.from_numpy(recorded[f"{key}/score"])
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    for name, sampler in SAMPLERS.items():
        sampler = model.sampler_in_use(sampler)
        images = lambda s: to_uint8(s.samples, model.data_space.centered).numpy()  # noqa: E731
        if isinstance(sampler, SigmaSampler):  # today's start is not 0.1's; with 0.1's it is 0.1's sampler
            assert same_images(images(model.sample(SEEDS, sampler)), recorded[f"{key}/{name}/samples"]) < 0.9
            sampler = Release01Start(sampler)
        result = model.sample(SEEDS, sampler)
        assert result.nfe == int(recorded[f"{key}/{name}/nfe"]), (key, name)
        assert same_images(images(result), recorded[f"{key}/{name}/samples"]) >= 0.99, (key, name)


@pytest.mark.parametrize("name", MODELS)
def test_release_checkpoint_gives_the_release_samples(name, recorded):
    """Property: a 0.1 checkpoint loads (weights_only) with its EMA weights as the weights to sample with; its
    score at fixed points is the release's to float32 round-off, and each sampler gives that release's images
    (>= 99% of pixels within one level) at the same NFE."""
    model = ScoreModel.load_from_checkpoint(HERE / f"{name}.ckpt", map_location="cpu").eval()
    assert model.ema is not None and model.sampling_net is model.ema
    check(model, name, recorded)


def test_release_export_gives_the_release_samples(recorded):
    """Property: a 0.1 export folder (EMA weights, 0.1 class paths) loads with from_pretrained and gives that
    release's images with each sampler."""
    model = ScoreModel.from_pretrained(str(HERE / "vp_dsm_export")).eval()
    check(model, "vp_dsm_export", recorded)
