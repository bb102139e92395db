"""The Langevin corrector keeps p_t invariant, and the PC sampler converges with NFE, with exact Gaussian-mixture
scores. Sample sets of p_t are stratified (component counts exactly n w_k), so the energy distance between two
exact sets (its null level, measured here) is small; a kernel that moves mass between modes or changes the spread
within them shows above it."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from benchmarks.distances import energy_distance
from lit_score.diffusion.densities import GaussianMixture
from lit_score.sampling import CORRECTORS, PCSampler
from lit_score.rng import SeededNoise
from lit_score.sampling.pc import PCState
from lit_score.diffusion.sdes import SDE, VESDE, VPSDE

MIX2 = GaussianMixture([0.15, 0.25, 0.6], [[-3.0, 0.0], [0.0, 3.0], [2.5, -1.5]], [[0.3, 1.0], [1.0, 0.4], [0.6, 0.8]])
_g = torch.Generator().manual_seed(0)
MIX8 = GaussianMixture([0.2, 0.3, 0.5], 2.5 * torch.randn(3, 8, generator=_g), 0.3 + torch.rand(3, 8, generator=_g))
MIXES = {2: MIX2, 8: MIX8}
SDES = {"ve": lambda: VESDE(0.01, 50.0, N=1000), "vp": lambda: VPSDE(N=1000)}
TIMES = {"ve": [0.3, 0.6], "vp": [0.05, 0.5]}  # marginal std about 0.13 and 1.7 (VE), 0.17 and 0.96 (VP)
N = 2000

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_pt(mix: GaussianMixture, sde: SDE, t: float, n: int, seed: int) -> torch.Tensor:
    """n samples of p_t, round(n w_k) of them from component k."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.round(mix.weights * n).long()
    counts[-1] = n - counts[:-1].sum()
    k = torch.repeat_interleave(torch.arange(len(counts)), counts)
    x0 = mix.means[k] + mix.stds[k] * torch.randn(n, mix.dim, generator=g, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, torch.full((n,), t, dtype=torch.float64))
    return (mean + std[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


@lru_cache(maxsize=None)
def tolerance(dim: int, sde_name: str, t: float) -> float:
    """Three times the largest |energy distance| between 6 pairs of independent exact sets of p_t."""
    mix, sde = MIXES[dim], SDES[sde_name]()
    null = [energy_distance(exact_pt(mix, sde, t, N, 10 + 2 * k), exact_pt(mix, sde, t, N, 11 + 2 * k))
            for k in range(6)]
    return 3 * max(abs(v) for v in null)


def run_corrector(mix: GaussianMixture, sde: SDE, x: torch.Tensor, t: float, steps: int, rule: str) -> torch.Tensor:
    score = mix.score_fn(sde)
    state = PCState(sde, sde.reverse(score), score, SeededNoise(range(len(x)), (mix.dim,)), 0.16, steps, 2e-5,
                    1.0, rule)
    return CORRECTORS["langevin"](state, x, torch.full((len(x),), t))[0]


@pytest.mark.parametrize("rule", ["marginal_std", "official"])
@pytest.mark.parametrize("t_index", [0, 1])
@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("dim", MIXES)
def test_langevin_corrector_keeps_pt_invariant(dim, sde_name, t_index, rule):
    """Property: 50 Langevin steps (snr 0.16) from exact samples of p_t leave them distributed as p_t."""
    t = TIMES[sde_name][t_index]
    mix, sde = MIXES[dim], SDES[sde_name]()
    x = run_corrector(mix, sde, exact_pt(mix, sde, t, N, 2), t, 50, rule)
    assert torch.isfinite(x).all()
    assert energy_distance(x, exact_pt(mix, sde, t, N, 1)) < tolerance(dim, sde_name, t)


def test_langevin_corrector_moves_the_samples():
    """Property: the invariance above is not a corrector that does nothing: from p_t it mixes (the samples move
    by about the marginal std), and from a wrong start (all points at one mode) it pulls mass to the others."""
    mix, sde, t = MIX2, SDES["vp"](), 0.5
    x0 = exact_pt(mix, sde, t, N, 2)
    x = run_corrector(mix, sde, x0, t, 50, "marginal_std")
    std = float(sde.marginal_prob(torch.zeros(1), torch.tensor([t]))[1])
    assert float((x - x0).norm(dim=1).median()) > 0.5 * std
    start = exact_pt(mix, sde, t, N, 3)[:: 10]
    start = start[mix.log_prob(start, sde, t).argsort()][-50:].repeat(10, 1)  # 500 copies near the modes
    before = energy_distance(start, exact_pt(mix, sde, t, N, 1))
    after = energy_distance(run_corrector(mix, sde, start, t, 400, "marginal_std"), exact_pt(mix, sde, t, N, 1))
    assert after < 0.5 * before


def mode_fractions(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples nearest (in the data's metric) to each component: the component of largest density."""
    logp = -0.5 * (((x.double()[:, None, :] - mix.means) / mix.stds) ** 2 + 2 * torch.log(mix.stds)).sum(-1)
    return torch.bincount((logp + torch.log(mix.weights)).argmax(1), minlength=len(mix.weights)).double() / len(x)


@pytest.mark.parametrize("sde_name", SDES)
def test_pc_sampler_converges_with_nfe(sde_name):
    """Property: reverse diffusion + Langevin with the exact score on the 2-D mixture is no worse at 300 levels than
    at 30 and reaches the null level, and its mode weights match the true weights within 4 binomial std errors."""
    mix, sde = MIX2, SDES[sde_name]()
    ref = mix.sample(N, torch.Generator().manual_seed(1))
    null = [energy_distance(mix.sample(N, torch.Generator().manual_seed(20 + 2 * k)),
                            mix.sample(N, torch.Generator().manual_seed(21 + 2 * k))) for k in range(6)]
    tol = 3 * max(abs(v) for v in null)
    dist = {}
    for steps in (30, 300):
        result = PCSampler("reverse_diffusion", "langevin", steps=steps).sample(mix.denoiser(sde), sde, (2,), range(N))
        assert result.nfe == 2 * steps
        dist[steps] = energy_distance(result.samples, ref)
    assert dist[300] < tol and dist[300] <= max(dist[30], tol)
    fractions, truth = mode_fractions(mix, result.samples), mode_fractions(mix, ref)
    assert ((fractions - truth).abs() < 4 * torch.sqrt(truth * (1 - truth) / N) * 2**0.5).all()
