"""Parity with the official score_sde_pytorch PC sampler: given the same inputs, score and noise, our predictors,
our correctors with ``step_rule="official"`` and the whole PCSampler reproduce the official outputs, recorded in
tests/reference/pc_reference.npz by tests/reference/make_pc_reference.py (which runs the official code)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ScoreDenoiser

import lit_score.sampling.pc as pc
from lit_score.sampling import CORRECTORS, PREDICTORS, PCSampler
from lit_score.diffusion.sdes import VESDE, VPSDE

HERE = Path(__file__).parent / "reference"
_spec = importlib.util.spec_from_file_location("make_pc_reference", HERE / "make_pc_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)
DATA = np.load(HERE / "pc_reference.npz")

pytestmark = pytest.mark.usefixtures("one_thread")


def _get(key: str) -> torch.Tensor:
    return torch.from_numpy(DATA[key])


def _sde(kind: str):
    return VESDE(**ref.SDES["ve"]) if kind == "ve" else VPSDE(**ref.SDES["vp"])


class Replay:
    """Hands out the recorded official noise in order and checks that all of it is used."""

    def __init__(self, draws: torch.Tensor) -> None:
        self.draws, self.used = draws, 0

    def __call__(self) -> torch.Tensor:
        z = self.draws[self.used]
        self.used += 1
        return z


def _close(ours: torch.Tensor, official: torch.Tensor) -> None:
    scale = float(official.abs().max())
    torch.testing.assert_close(ours, official, rtol=2e-5, atol=2e-6 * max(scale, 1.0))


@pytest.mark.parametrize("ti", [0, 1, 2])
@pytest.mark.parametrize("role,name", ref.STEP_CASES)
@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_each_step_matches_the_official_update(kind, role, name, ti):
    """Property: one predictor step, or one corrector call (2 Langevin steps, snr 0.16, official step rule), at
    t = 1, 0.5 and eps gives the official x and x_mean."""
    key = f"step/{kind}/{name}/{ti}"
    sde = _sde(kind)
    score = lambda x, t: ref.gaussian_score(kind, x, t)  # noqa: E731
    noise = Replay(_get(f"{key}/noise"))
    state = pc.PCState(sde, sde.reverse(score), score, noise, ref.SNR, ref.N_STEPS, 2e-5, 1.0, "official")
    op = PREDICTORS[name] if role == "predictor" else CORRECTORS[name]
    x, x_mean = op(state, _get(f"{key}/x"), _get(f"{key}/t"))
    assert noise.used == len(noise.draws)
    _close(x, _get(f"{key}/x_new"))
    _close(x_mean, _get(f"{key}/x_mean"))


@pytest.mark.parametrize("kind,predictor,corrector", ref.LOOP_CASES)
def test_pc_sampler_matches_the_official_sampler(monkeypatch, kind, predictor, corrector):
    """Property: PCSampler (official step rule, the SDE's default eps) run on the official prior draw and noise
    returns the official denoised samples with the same number of score evaluations."""
    key = f"loop/{kind}/{predictor}/{corrector}"
    noise = Replay(_get(f"{key}/noise"))
    monkeypatch.setattr(pc, "SeededNoise", lambda *args, **kwargs: noise)
    sde = _sde(kind)
    sampler = PCSampler(predictor, corrector, snr=ref.SNR, n_steps_each=ref.N_STEPS,
                        step_rule="official" if corrector != "none" else None)
    result = sampler.sample(ScoreDenoiser(lambda x, t: ref.gaussian_score(kind, x, t), sde), sde, ref.SHAPE,
                            range(ref.BATCH), x_init=_get(f"{key}/prior"))
    assert noise.used == len(noise.draws)
    assert result.nfe == int(DATA[f"{key}/nfe"])
    _close(result.samples, _get(f"{key}/samples"))


def test_default_langevin_rule_is_not_the_official_one():
    """Property: the parity above is a property of step_rule='official': the default rule gives other samples."""
    key = "loop/ve/reverse_diffusion/langevin"
    noise = Replay(_get(f"{key}/noise"))
    pc_default = PCSampler("reverse_diffusion", "langevin", snr=ref.SNR, n_steps_each=ref.N_STEPS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pc, "SeededNoise", lambda *args, **kwargs: noise)
        out = pc_default.sample(ScoreDenoiser(lambda x, t: ref.gaussian_score("ve", x, t), _sde("ve")), _sde("ve"),
                                ref.SHAPE, range(ref.BATCH), x_init=_get(f"{key}/prior")).samples
    assert not torch.allclose(out, _get(f"{key}/samples"), rtol=1e-3, atol=1e-3)
