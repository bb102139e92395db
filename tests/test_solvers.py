"""The fast solvers against independent oracles.

Order of convergence: for Gaussian data N(mu, diag(s^2)) the sigma-view probability-flow ODE has the closed-form
solution x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)) (x(sigma0) - mu), with the exact denoiser
D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu); each deterministic solver's error at sigma_min must fall with the
number of steps at the solver's order. Stochastic solvers: exact Gaussian-mixture scores, energy distance to true
samples within the null level. k-diffusion (a second, well-kept library) must give the same outputs on the same
denoiser, sigmas and noise.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
from conftest import IN_CI, ScoreDenoiser, Spy, null_tolerance, require

from benchmarks.distances import energy_distance
from lit_score.diffusion.denoiser import Counted
from lit_score.diffusion.densities import GaussianMixture
from lit_score.sampling import (AdaptiveSDESampler, DPMSolverPP, DPMSolverPP3M, DPMSolverPPSDE, EDMSampler,
                                EulerSampler, IPNDM, UniPC, adaptive_sde, dpm_solver_pp, euler, ipndm, unipc)
from lit_score.rng import SeededNoise, seeded_prior
from lit_score.sampling.sigma import edm_sample, karras_schedule, sigma_steps
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE

pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 0.1, 2.0], dtype=torch.float64)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MU + S**2 / (S**2 + sigma[:, None] ** 2) * (x - MU)


def exact_flow(x0: torch.Tensor, sigma0: float, sigma1: float) -> torch.Tensor:
    return MU + ((S**2 + sigma1**2) / (S**2 + sigma0**2)).sqrt() * (x0 - MU)


def _x0(sigma0: float) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma0


def _slope(solve, steps=(64, 128, 256), D=gaussian_denoiser, grid=None) -> float:
    """Least-squares slope of -log(error) against log(steps): the observed order of convergence."""
    errors = []
    for n in steps:
        sigmas = grid(n) if grid else karras_schedule(None, n, SIGMA_MIN, SIGMA_MAX)
        x0 = _x0(float(sigmas[0]))
        out = solve(D, x0.clone(), sigmas)
        errors.append(float((out - exact_flow(x0, float(sigmas[0]), float(sigmas[-1]))).abs().max()))
    lx = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    ly = torch.tensor([-math.log(e) for e in errors], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


DETERMINISTIC = {  # name: (solver on a grid without the final sigma = 0, theoretical order)
    "euler": (euler, 1),
    "edm_heun": (lambda D, x, s: edm_sample(D, x, s, None), 2),
    "dpm_solver_pp_2m": (dpm_solver_pp, 2),
    "dpm_solver_pp_2m_heun": (lambda D, x, s: dpm_solver_pp(D, x, s, None, 2, 0.0, solver_type="heun"), 2),
    "dpm_solver_pp_3m": (lambda D, x, s: dpm_solver_pp(D, x, s, order=3), 3),
    "dpm_solver_pp_3m_sde_eta0": (lambda D, x, s: dpm_solver_pp(D, x, s, None, 3, 0.0), 3),
    "unipc_1_bh2": (lambda D, x, s: unipc(D, x, s, 1, "bh2"), 2),
    "unipc_2_bh1": (lambda D, x, s: unipc(D, x, s, 2, "bh1"), 3),
    "unipc_2_bh2": (lambda D, x, s: unipc(D, x, s, 2, "bh2"), 3),
    "unipc_3_bh2": (lambda D, x, s: unipc(D, x, s, 3, "bh2"), 4),
    "unip_3_no_corrector": (lambda D, x, s: unipc(D, x, s, 3, "bh2", corrector=False), 3),
    "ipndm_fixed_4": (lambda D, x, s: ipndm(D, x, s, 4), 2),  # fixed-step coefficients on a non-uniform grid
    "ipndm_v_1": (lambda D, x, s: ipndm(D, x, s, 1, variable=True), 1),
    "ipndm_v_2": (lambda D, x, s: ipndm(D, x, s, 2, variable=True), 2),
    "ipndm_v_3": (lambda D, x, s: ipndm(D, x, s, 3, variable=True), 3),
    "ipndm_v_4": (lambda D, x, s: ipndm(D, x, s, 4, variable=True), 4),
}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_error_falls_at_the_solver_order(name):
    """Property: against the closed-form flow of Gaussian data, the error falls as steps^-order (karras grid)."""
    solve, order = DETERMINISTIC[name]
    slope = _slope(solve)
    assert order - 0.3 <= slope <= order + 0.6, f"{name}: observed order {slope:.2f}, expected {order}"


def test_ipndm_fixed_coefficients_are_the_variable_ones_on_a_uniform_grid():
    """Property: on a grid uniform in sigma, iPNDM's fixed Adams-Bashforth weights are the variable-step ones."""
    sigmas = torch.linspace(5.0, 0.01, 40, dtype=torch.float64)
    x = _x0(5.0)
    torch.testing.assert_close(ipndm(gaussian_denoiser, x, sigmas, 4), ipndm(gaussian_denoiser, x, sigmas, 4, True),
                               rtol=1e-10, atol=1e-10)


def _gaussian_sde(name):
    return {"ve": lambda: VESDE(0.01, 50.0), "vp": lambda: VPSDE(), "subvp": lambda: subVPSDE()}[name]()


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("solver", ["dpm_solver_pp_3m", "unipc_2_bh2"])
def test_order_through_the_sde_score_and_sigma_view(sde_name, solver):
    """Property: with the exact score of each SDE's Gaussian marginal, turned into a denoiser by the sigma view,
    the solver still follows the closed-form flow at its order on the sampler's own grid."""
    sde = _gaussian_sde(sde_name)
    mix = GaussianMixture([1.0], MU[None], S[None])
    D = ScoreDenoiser(mix.score_fn(sde), sde)
    solve, order = DETERMINISTIC[solver]
    slope = _slope(solve, D=D, grid=lambda n: sigma_steps(sde, n, "karras", None, None)[:-1])
    assert order - 0.3 <= slope <= order + 0.6, f"{solver} on {sde_name}: observed order {slope:.2f}"


# ---- k-diffusion: the same solvers on identical inputs --------------------------------------------------------


@pytest.fixture(scope="module")
def kd():
    """k_diffusion.sampling alone: its package __init__ imports training dependencies the solvers do not need."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        if IN_CI:
            pytest.fail("CI=true but k-diffusion is not installed (make setup installs it with --no-deps)")
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion, see pyproject's dev extras)")
    saved = {k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith("k_diffusion.")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = pkg
    try:
        yield importlib.import_module("k_diffusion.sampling")
    finally:
        for k in [k for k in sys.modules if k == "k_diffusion" or k.startswith("k_diffusion.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _noise_list(n: int, shape=(16, 4)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _ours_and_theirs(n: int = 12):
    noise = _noise_list(n + 1)
    mine, theirs = iter(noise), iter(noise)
    return (lambda: next(mine)), (lambda *a: next(theirs))


def _grid(n: int = 12) -> torch.Tensor:
    return torch.cat([karras_schedule(None, n, SIGMA_MIN, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)])


def test_euler_heun_and_2m_match_k_diffusion(kd):
    """Property: Euler, EDM's Heun and DPM-Solver++(2M) give k-diffusion's outputs to float64 precision."""
    sigmas, x = _grid(), _x0(SIGMA_MAX)
    torch.testing.assert_close(euler(gaussian_denoiser, x, sigmas),
                               kd.sample_euler(gaussian_denoiser, x.clone(), sigmas, disable=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(edm_sample(gaussian_denoiser, x, sigmas, None),
                               kd.sample_heun(gaussian_denoiser, x.clone(), sigmas, disable=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpm_solver_pp(gaussian_denoiser, x, sigmas),
                               kd.sample_dpmpp_2m(gaussian_denoiser, x.clone(), sigmas, disable=True),
                               rtol=1e-12, atol=1e-12)


def test_stochastic_edm_matches_k_diffusion(kd, monkeypatch):
    """Property: EDM's stochastic sampler (churn at every level) gives k-diffusion's sample_heun given its noise."""
    sigmas, x = _grid(), _x0(SIGMA_MAX)
    ours, theirs = _ours_and_theirs()
    monkeypatch.setattr(torch, "randn_like", lambda like, *a, **k: theirs())
    expected = kd.sample_heun(gaussian_denoiser, x.clone(), sigmas, disable=True, s_churn=5.0, s_noise=1.003)
    monkeypatch.undo()
    got = edm_sample(gaussian_denoiser, x, sigmas, ours, S_churn=5.0, S_noise=1.003)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_pp_2m_sde_matches_k_diffusion(kd, eta, solver_type):
    """Property: DPM-Solver++(2M) SDE gives k-diffusion's sample_dpmpp_2m_sde on the same noise sequence."""
    sigmas, x = _grid(), _x0(SIGMA_MAX)
    ours, theirs = _ours_and_theirs()
    got = dpm_solver_pp(gaussian_denoiser, x, sigmas, ours, 2, eta, 1.0, solver_type)
    expected = kd.sample_dpmpp_2m_sde(gaussian_denoiser, x.clone(), sigmas, disable=True, eta=eta,
                                      noise_sampler=theirs, solver_type=solver_type)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_pp_3m_sde_matches_k_diffusion_where_their_formulas_agree(kd, eta):
    """Property: with two steps before the final denoising step (orders 1 and 2 only), DPM-Solver++(3M) SDE gives
    k-diffusion's sample_dpmpp_3m_sde. Beyond that they differ on purpose: k-diffusion weights the second divided
    difference by half the Taylor coefficient, which the order test shows costs an order."""
    sigmas, x = _grid(3), _x0(SIGMA_MAX)
    ours, theirs = _ours_and_theirs()
    got = dpm_solver_pp(gaussian_denoiser, x, sigmas, ours, 3, eta)
    expected = kd.sample_dpmpp_3m_sde(gaussian_denoiser, x.clone(), sigmas, disable=True, eta=eta,
                                      noise_sampler=theirs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers(order, variant):
    """Property: UniPC gives diffusers' UniPCMultistepScheduler (data prediction, karras sigmas of its VP schedule;
    x_VP = x_hat / sqrt(1 + sigma^2)) up to its float32 coefficients, over the steps before its lower-order final
    steps; the other B(h) variant is 100 times further off."""
    diffusers = require("diffusers")
    n = 12
    scheduler = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, prediction_type="sample",
                                                  use_karras_sigmas=True)
    scheduler.set_timesteps(n)
    sigmas = scheduler.sigmas.double()
    x_hat = _x0(float(sigmas[0]))
    x = x_hat / math.sqrt(1 + float(sigmas[0]) ** 2)
    last = n - 3
    for i in range(last):
        s = float(sigmas[i])
        x0 = gaussian_denoiser(x * math.sqrt(1 + s**2), torch.full((x.shape[0],), s, dtype=torch.float64))
        x = scheduler.step(x0, scheduler.timesteps[i], x).prev_sample
    theirs = x * math.sqrt(1 + float(sigmas[last]) ** 2)
    ours = unipc(gaussian_denoiser, x_hat, sigmas[:last + 1], order, variant)
    other = unipc(gaussian_denoiser, x_hat, sigmas[:last + 1], order, "bh1" if variant == "bh2" else "bh2")
    assert float((ours - theirs).abs().max()) < 2e-6 < float((other - theirs).abs().max()) / 10


# ---- samplers: NFE, seeds, distributions ------------------------------------------------------------------------

MIX = GaussianMixture([0.2, 0.5, 0.3], [[-2.0, -1.0], [2.0, 1.5], [0.0, 3.0]], [[0.5, 0.3], [0.8, 0.6], [0.4, 0.7]])
SDES = {"ve": lambda: VESDE(0.01, 50.0, N=100), "vp": lambda: VPSDE(N=100), "subvp": lambda: subVPSDE(N=100)}
N = 1000


@pytest.fixture(scope="module")
def reference():
    return MIX.sample(N, torch.Generator().manual_seed(1)), null_tolerance(MIX, N)


SAMPLERS_2D = {
    "dpm_solver_pp_2m_sde": (lambda: DPMSolverPPSDE(steps=40, order=2), 40),
    "dpm_solver_pp_3m_sde": (lambda: DPMSolverPPSDE(steps=40, order=3), 40),
    "dpm_solver_pp_3m": (lambda: DPMSolverPP3M(steps=20), 20),
    "unipc": (lambda: UniPC(steps=15), 15),
    "ipndm": (lambda: IPNDM(steps=20, variable=True), 20),
    "euler": (lambda: EulerSampler(steps=100), 100),
    "adaptive_sde_per_batch": (lambda: AdaptiveSDESampler(step_control="batch"), None),
}


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("name", SAMPLERS_2D)
def test_sampler_draws_the_mixture_with_exact_score(reference, sde_name, name):
    """Property: with the exact score, each sampler's samples are within the null tolerance of the mixture, and it
    reports the evaluations it ran (one per step for the multistep solvers)."""
    ref, tol = reference
    sde = SDES[sde_name]()
    make, nfe = SAMPLERS_2D[name]
    D = Counted(MIX.denoiser(sde))
    result = make().sample(D, sde, (2,), range(N))
    assert result.nfe == D.nfe and (nfe is None or result.nfe == nfe)
    assert result.samples.shape == (N, 2) and result.samples.dtype == torch.float32
    assert energy_distance(result.samples, ref) < tol


M16 = GaussianMixture([0.2, 0.5, 0.3], torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 1.5,
                      torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2)


@pytest.mark.parametrize("sde_name", SDES)
def test_adaptive_per_image_draws_a_16d_mixture(sde_name):
    """Property: with a step size per image the adaptive solver draws an anisotropic 16-D mixture within the null
    tolerance. (Its per-image error norm averages over an image's elements; with 2 elements it is too noisy a
    statistic: on the 2-D mixture under VE the energy distance is ~0.1, five times the null level.)"""
    sde = SDES[sde_name]()
    result = AdaptiveSDESampler().sample(M16.denoiser(sde), sde, (16,), range(500))
    ref = M16.sample(500, torch.Generator().manual_seed(1))
    assert energy_distance(result.samples, ref) < null_tolerance(M16, 500)


def test_adaptive_nfe_falls_as_the_tolerance_loosens():
    """Property: looser tolerances take fewer evaluations; the reported NFE is the slowest image's (2 per try + 1)."""
    sde = VESDE(0.01, 50.0)
    nfe = []
    for reltol in (0.005, 0.02, 0.08):
        counted = []
        score = MIX.score_fn(sde)
        x, per_image = adaptive_sde(lambda x, t: counted.append(1) or score(x, t), sde,
                                    seeded_prior(sde, range(64), (2,)), SeededNoise(range(64), (2,)), 1e-5,
                                    abstol=1e-3, reltol=reltol)
        assert len(counted) == int(per_image.max()) and per_image.min() < per_image.max()
        nfe.append(len(counted))
    assert nfe[0] > nfe[1] > nfe[2], nfe
    result = AdaptiveSDESampler(reltol=0.08, abstol=1e-3, eps=1e-5).sample(MIX.denoiser(sde), sde, (2,), range(64))
    assert result.nfe == nfe[2] + 1


def test_adaptive_per_batch_control_moves_every_image_together():
    """Property: with step_control='batch' all images take the same tries, so per-image NFE is one number."""
    sde = VPSDE()
    _, per_image = adaptive_sde(MIX.score_fn(sde), sde, seeded_prior(sde, range(32), (2,)),
                                SeededNoise(range(32), (2,)), 1e-3, per_image=False)
    assert per_image.min() == per_image.max()


SEEDED = {"dpm_solver_pp_3m_sde": lambda: DPMSolverPPSDE(steps=15), "adaptive_sde": lambda: AdaptiveSDESampler(),
          "unipc": lambda: UniPC(steps=8), "euler_float64": lambda: EulerSampler(steps=8, float64=True)}


@pytest.mark.parametrize("name", SEEDED)
def test_image_depends_only_on_its_seed(name):
    """Property: a seed's sample is the same alone and in a batch with other seeds."""
    sde = VPSDE(N=30)
    sampler = SEEDED[name]()
    together = sampler.sample(MIX.denoiser(sde), sde, (2,), [11, 7, 3]).samples
    alone = sampler.sample(MIX.denoiser(sde), sde, (2,), [7]).samples
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: EDMSampler(steps=10, float64=True), lambda: DPMSolverPP(float64=True),
                                  lambda: UniPC(float64=True)])
def test_float64_steps_in_float64_and_calls_the_network_in_float32(make):
    """Property: float64 samplers feed the network float32 inputs, return float32 samples, and agree with the
    float32 sampler to float32 accuracy without being the same computation."""
    sde = VESDE(0.01, 50.0)
    spy = Spy(MIX.denoiser(sde))
    sampler = make()
    x64 = sampler.sample(spy, sde, (2,), range(200)).samples
    assert set(spy.calls) == {(torch.float32, torch.float32)} and x64.dtype == torch.float32
    sampler.float64 = False
    x32 = sampler.sample(MIX.denoiser(sde), sde, (2,), range(200)).samples
    torch.testing.assert_close(x64, x32, rtol=1e-4, atol=1e-4)
    assert not torch.equal(x64, x32)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="order must be one of 1, 2, 3, got 4"):
        DPMSolverPPSDE(order=4)
    with pytest.raises(ValueError, match="eta must be a number >= 0, got -1.0"):
        DPMSolverPPSDE(eta=-1.0)
    with pytest.raises(ValueError, match="solver_type must be one of 'midpoint', 'heun', got 'rk4'"):
        DPMSolverPPSDE(solver_type="rk4")
    with pytest.raises(ValueError, match="variant must be one of 'bh1', 'bh2', got 'bh3'"):
        UniPC(variant="bh3")
    with pytest.raises(ValueError, match="order must be one of 1, 2, 3, 4, got 5"):
        IPNDM(order=5)
    with pytest.raises(ValueError, match="step_control"):
        AdaptiveSDESampler(step_control="pixel")
    with pytest.raises(ValueError, match="abstol must be a number > 0, got 0.0"):
        AdaptiveSDESampler(abstol=0.0)
    with pytest.raises(ValueError, match="needs a noise source"):
        dpm_solver_pp(gaussian_denoiser, _x0(1.0), _grid(3), None, 2, 1.0)
    with pytest.raises(RuntimeError, match="did not reach eps"):
        sde = VPSDE()
        adaptive_sde(MIX.score_fn(sde), sde, seeded_prior(sde, [0], (2,)), SeededNoise([0], (2,)), 1e-3, max_iters=3)
