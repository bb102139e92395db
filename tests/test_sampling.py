"""Samplers against exact Gaussian-mixture scores: with the true denoiser and score of p_t in place of a network
(``GaussianMixture.denoiser``), every sampler must draw the mixture. Agreement is an energy distance to true samples
below a tolerance set by the spread of the energy distance between independent true-sample sets of the same size
(the statistic's null distribution)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import null_tolerance

from benchmarks.distances import energy_distance
from lit_score.diffusion.densities import GaussianMixture
from lit_score.sampling import (CORRECTORS, IPNDM, PREDICTORS, SCHEDULES, AdaptiveSDESampler, DPMSolverPP,
                                DPMSolverPP3M, DPMSolverPPSDE, EDMSampler, EulerSampler, ODESampler, PCSampler, UniPC,
                                colorize, default_sampler, dopri5, inpaint, seeded_normal)
from lit_score.sampling.sigma import sigma_steps
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE

N = 1000
MIX = GaussianMixture([0.3, 0.7], [[-2.0, -1.0], [2.0, 1.5]], [0.5, 0.8])
MIX16 = GaussianMixture([0.3, 0.7], torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), [0.5, 0.8])
SDES = {"ve": lambda: VESDE(0.01, 50.0, N=100), "vp": lambda: VPSDE(N=100), "subvp": lambda: subVPSDE(N=100)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    return MIX.sample(N, torch.Generator().manual_seed(1)), null_tolerance(MIX, N)


@pytest.fixture(scope="module")
def reference16():
    return MIX16.sample(500, torch.Generator().manual_seed(1)), null_tolerance(MIX16, 500)


SAMPLERS_2D = {
    "euler_maruyama": lambda: PCSampler("euler_maruyama", "none"),
    "reverse_diffusion": lambda: PCSampler("reverse_diffusion", "none"),
    "ancestral_sampling": lambda: PCSampler("ancestral_sampling", "none"),
    "ode_rk45": lambda: ODESampler(),
    "edm_heun_karras": lambda: EDMSampler(steps=18),
    "edm_heun_geometric": lambda: EDMSampler(steps=18, schedule="geometric"),
    "edm_heun_uniform": lambda: EDMSampler(steps=40, schedule="uniform"),
    "edm_stochastic": lambda: EDMSampler(steps=40, S_churn=20.0, S_min=0.05, S_max=50.0, S_noise=1.003),
    "dpm_solver_pp_2m": lambda: DPMSolverPP(steps=20),
}


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("name", SAMPLERS_2D)
def test_sampler_draws_the_mixture_with_exact_score(reference, sde_name, name):
    """Property: with the exact score, each sampler's samples are within the null tolerance of the mixture."""
    if name == "ancestral_sampling" and sde_name == "subvp":
        pytest.skip("ancestral sampling is defined for VE and VP only (tested to raise below)")
    ref, tol = reference
    sde = SDES[sde_name]()
    result = SAMPLERS_2D[name]().sample(MIX.denoiser(sde), sde, (2,), range(N))
    assert result.samples.shape == (N, 2) and result.nfe > 0
    assert energy_distance(result.samples, ref) < tol


@pytest.mark.parametrize("order", ["corrector_first", "predictor_first"])
@pytest.mark.parametrize("sde_name", SDES)
def test_pc_with_langevin_corrector_draws_the_mixture(reference16, sde_name, order):
    """Property: reverse diffusion + Langevin (snr 0.16), in either order, samples a 16-D mixture.

    (The default step 2 (r std(t))^2 is the official snr rule at ||score|| = sqrt(d) / std(t), typical in many
    dimensions; tests/test_pc_corrector.py checks both rules in 2-D and 8-D.)
    """
    ref, tol = reference16
    sde = SDES[sde_name]()
    sampler = PCSampler("reverse_diffusion", "langevin", snr=0.16, order=order)
    result = sampler.sample(MIX16.denoiser(sde), sde, (16,), range(500))
    assert result.nfe == 200
    assert energy_distance(result.samples, ref) < tol


def test_corrector_order_changes_the_chain():
    """Property: the two orders are different algorithms (not a no-op flag) yet both use the same NFE."""
    sde = SDES["ve"]()
    a = PCSampler(order="corrector_first").sample(MIX16.denoiser(sde), sde, (16,), range(4))
    b = PCSampler(order="predictor_first").sample(MIX16.denoiser(sde), sde, (16,), range(4))
    assert a.nfe == b.nfe and not torch.allclose(a.samples, b.samples)


def test_annealed_langevin_on_discrete_levels_draws_the_mixture(reference):
    """Property: Song & Ermon's Algorithm 1 (L = 10 geometric levels sigma_max..sigma_min, T = 100 steps each,
    step eps sigma_i^2 / sigma_L^2 with eps = 2e-5) converges to the mixture; eps = 0 puts the levels on the
    VE SDE's discrete sigmas."""
    ref, tol = reference
    sde = VESDE(0.01, 50.0, N=10)
    sampler = PCSampler("none", "ald", n_steps_each=100, step_lr=2e-5, eps=0.0)
    result = sampler.sample(MIX.denoiser(sde), sde, (2,), range(N))
    assert result.nfe == 1000
    assert energy_distance(result.samples, ref) < tol


def test_tolerance_rejects_a_wrong_distribution(reference):
    """Property: the test statistic has power: the mixture with weights 0.4/0.6 instead of 0.3/0.7 fails it."""
    ref, tol = reference
    wrong = GaussianMixture([0.4, 0.6], MIX.means, MIX.stds)
    assert energy_distance(wrong.sample(N, torch.Generator().manual_seed(5)), ref) > tol


ALL_SAMPLERS = {**SAMPLERS_2D, "pc_langevin": lambda: PCSampler(), "ald": lambda: PCSampler("none", "ald"),
                "ode_denoise": lambda: ODESampler(denoise=True)}


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_image_depends_only_on_its_seed(name):
    """Property: a seed's sample is the same alone and in a batch with other seeds (so any process split agrees)."""
    sde = VPSDE(N=30)
    sampler = ALL_SAMPLERS[name]()
    together = sampler.sample(MIX.denoiser(sde), sde, (2,), [11, 7, 3]).samples
    alone = sampler.sample(MIX.denoiser(sde), sde, (2,), [7]).samples
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-5)
    again = sampler.sample(MIX.denoiser(sde), sde, (2,), [11, 7, 3]).samples
    assert torch.equal(together, again)


def test_seeded_normal_is_standard_normal_and_per_seed():
    """Property: the counter-based noise has mean 0, variance 1, and row i depends only on (seed_i, step)."""
    z = seeded_normal(range(4000), (25,), step=3)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.02
    assert torch.equal(seeded_normal([9, 4], (3,), 1)[1], seeded_normal([4], (3,), 1)[0])
    assert not torch.equal(seeded_normal([4], (3,), 1), seeded_normal([4], (3,), 2))


def test_dopri5_solves_linear_odes_per_row():
    """Property: y' = -k y gives y0 exp(-k t) to the tolerance, each row's steps independent of the others."""
    k = torch.tensor([0.5, 3.0, 20.0], dtype=torch.float64)
    y0 = torch.ones(3, 2, dtype=torch.float64)
    sol = dopri5(lambda t, y, k_rows: -k_rows * y, y0, 0.0, 1.0, rtol=1e-8, atol=1e-8, cond=k[:, None])
    torch.testing.assert_close(sol.y, torch.exp(-k)[:, None].expand(3, 2), rtol=1e-6, atol=1e-8)
    assert sol.nfe[0] < sol.nfe[2]  # the stiffer row needs more steps than the easy one
    alone = dopri5(lambda t, y: -20.0 * y, y0[2:], 0.0, 1.0, rtol=1e-8, atol=1e-8)
    assert torch.equal(alone.y[0], sol.y[2]) and alone.nfe[0] == sol.nfe[2]
    back = dopri5(lambda t, y: -5.0 * y, y0[:1], 1.0, 0.0, rtol=1e-8, atol=1e-8)  # backwards in time
    torch.testing.assert_close(back.y, torch.full_like(back.y, math.exp(5.0)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedules_run_from_sigma_max_to_sigma_min_then_zero(name):
    """Property: every time discretisation decreases from sigma_max to sigma_min, then appends sigma_N = 0."""
    sde = VPSDE()
    sigmas = sigma_steps(sde, 10, name, 0.002, 80.0)
    assert len(sigmas) == 11 and float(sigmas[-1]) == 0.0
    assert math.isclose(float(sigmas[0]), 80.0, rel_tol=1e-6) and math.isclose(float(sigmas[-2]), 0.002, rel_tol=1e-6)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_schedule_is_rho_7():
    """Property: the karras schedule is linear in sigma^(1/7)."""
    roots = sigma_steps(VESDE(), 6, "karras", 0.002, 80.0)[:-1] ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(5), rtol=1e-6, atol=1e-9)


def test_edm_and_dpm_nfe():
    """Property: Heun uses 2N - 1 evaluations, DPM-Solver++(2M) one per step."""
    sde = VESDE(0.01, 50.0)
    assert EDMSampler(steps=18).sample(MIX.denoiser(sde), sde, (2,), [0]).nfe == 35
    assert DPMSolverPP(steps=20).sample(MIX.denoiser(sde), sde, (2,), [0]).nfe == 20


def test_inpainting_samples_near_the_conditional():
    """Property: fixing x_1 = 2, PC inpainting keeps x_1 and draws x_2 close to the exact conditional
    p(x_2 | x_1 = 2) = N(1.5, 0.8^2), far from the unconditional marginal of x_2 (mean 0.75, std 1.6).
    Replacement is an approximation of conditional sampling (the noisy known part is drawn independently of
    the unknown part), so the match is checked on the first two moments within 0.15, not exactly."""
    sde = VPSDE(N=100)
    n = 1000
    data = torch.tensor([[2.0, 0.0]]).expand(n, 2)
    mask = torch.tensor([1.0, 0.0])
    result = inpaint(PCSampler("reverse_diffusion", "none"), MIX.denoiser(sde), sde, data, mask, range(n))
    assert torch.allclose(result.samples[:, 0], data[:, 0], atol=1e-2)
    x2 = result.samples[:, 1]
    assert abs(float(x2.mean()) - 1.5) < 0.15 and abs(float(x2.std()) - 0.8) < 0.15


def test_colorization_keeps_the_gray_and_picks_the_matching_colour():
    """Property: colorized pixels have exactly the given channel mean, and >= 95% of them take the colour of the
    mixture component with that gray level: warm (0.9, 0.5, 0.1) has mean 0.5, cold (-0.9, -0.5, -0.1) mean -0.5."""
    warm, cold = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([-0.9, -0.5, -0.1])
    mix = GaussianMixture([0.5, 0.5], torch.stack([warm, cold]), [0.05, 0.05])
    sde = VESDE(0.01, 5.0, N=100)
    n = 200
    gray = torch.tensor([0.5, -0.5]).repeat_interleave(n // 2).reshape(n, 1, 1, 1)
    D = mix.denoiser(sde)  # pixels (B, 3, 1, 1) are points of R^3
    result = colorize(PCSampler("reverse_diffusion", "langevin"), D, sde, gray, range(n))
    x = result.samples.reshape(n, 3)
    torch.testing.assert_close(x.mean(1), gray.flatten(), atol=1e-3, rtol=0)
    assert ((x[: n // 2] - warm).norm(dim=1) < 0.3).float().mean() >= 0.95
    assert ((x[n // 2:] - cold).norm(dim=1) < 0.3).float().mean() >= 0.95


def test_bad_inputs_are_named():
    """Property: unknown names and impossible settings raise errors that say what is wrong."""
    with pytest.raises(ValueError, match="predictor must be one of .*'reverse_diffusion'.*, got 'heun'"):
        PCSampler(predictor="heun")
    with pytest.raises(ValueError, match="corrector must be one of .*, got 'hmc'"):
        PCSampler(corrector="hmc")
    with pytest.raises(ValueError, match="order"):
        PCSampler(order="both")
    with pytest.raises(ValueError, match="step_rule 'song_ermon' is not one of the langevin corrector's: "
                                         "marginal_std, official"):
        PCSampler(corrector="langevin", step_rule="song_ermon")
    with pytest.raises(ValueError, match="schedule must be one of .*'karras'.*, got 'cosine'"):
        EDMSampler(schedule="cosine")
    sde = subVPSDE(N=10)
    with pytest.raises(TypeError, match="ancestral sampling exists for VESDE and VPSDE only"):
        PCSampler("ancestral_sampling", "none").sample(MIX.denoiser(sde), sde, (2,), [0])
    with pytest.raises(ValueError, match="annealed Langevin needs a positive noise level"):
        PCSampler("none", "ald", eps=0.0).sample(MIX.denoiser(VPSDE(N=10)), VPSDE(N=10), (2,), [0])
    assert {"euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none"} <= set(PREDICTORS.names())
    assert {"langevin", "ald", "none"} <= set(CORRECTORS.names())
    assert isinstance(default_sampler(VESDE()), PCSampler)


BAD_ARGUMENTS = [  # (sampler, argument, value, the valid range as the message says it)
    (PCSampler, "steps", -5, "an integer >= 1 (or None: the SDE's N)"), (PCSampler, "steps", 2.5, "an integer"),
    (PCSampler, "n_steps_each", 0, "an integer >= 1"), (PCSampler, "snr", 0.0, "a number > 0"),
    (PCSampler, "snr", float("nan"), "a number > 0"), (PCSampler, "step_lr", -1e-5, "a number > 0"),
    (PCSampler, "eps", -1e-3, "a number >= 0"), (PCSampler, "denoise", "yes", "true or false"),
    (ODESampler, "rtol", 0.0, "a number > 0"), (ODESampler, "atol", -1e-5, "a number > 0"),
    (ODESampler, "eps", -1.0, "a number >= 0"), (ODESampler, "max_steps", 0, "an integer >= 1"),
    (ODESampler, "step_control", "global", "one of 'image', 'batch'"),
    (AdaptiveSDESampler, "safety", 1.5, "a number in (0, 1]"), (AdaptiveSDESampler, "reltol", -0.01, "a number >= 0"),
    (AdaptiveSDESampler, "exp", 0.0, "a number > 0"), (AdaptiveSDESampler, "h_init", -0.01, "a number > 0"),
    (AdaptiveSDESampler, "max_iters", 0, "an integer >= 1"), (AdaptiveSDESampler, "eps", -1e-5, "a number >= 0"),
    (EDMSampler, "steps", -5, "an integer >= 1"), (EDMSampler, "steps", True, "an integer >= 1"),
    (EDMSampler, "S_churn", -1.0, "a number >= 0"), (EDMSampler, "S_noise", -1.0, "a number >= 0"),
    (EDMSampler, "S_min", -0.05, "a number >= 0"), (EDMSampler, "sigma_min", 0.0, "a number > 0"),
    (EDMSampler, "sigma_max", -80.0, "a number > 0"), (EDMSampler, "float64", "no", "true or false"),
    (DPMSolverPP, "steps", 0, "an integer >= 1"), (DPMSolverPP3M, "schedule", "cosine", "one of "),
    (DPMSolverPPSDE, "order", 4, "one of 1, 2, 3"), (DPMSolverPPSDE, "eta", -1.0, "a number >= 0"),
    (DPMSolverPPSDE, "s_noise", -0.5, "a number >= 0"), (UniPC, "order", 0, "one of 1, 2, 3"),
    (UniPC, "variant", "bh3", "one of 'bh1', 'bh2'"), (UniPC, "corrector", None, "true or false"),
    (IPNDM, "order", 5, "one of 1, 2, 3, 4"), (EulerSampler, "steps", -1, "an integer >= 1"),
]


@pytest.mark.parametrize("cls, argument, value, valid", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{a}={v!r}" for c, a, v, _ in BAD_ARGUMENTS])
def test_a_bad_argument_fails_at_construction_in_one_line(cls, argument, value, valid):
    """Property: every sampler checks its arguments when it is made (``--model.sampler.init_args.steps -5`` fails
    before any run): a ValueError of one line naming the argument, its valid range and the value given."""
    with pytest.raises(ValueError) as info:
        cls(**{argument: value})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{argument} must be {valid}") and message.endswith(
        f", got {value!r}"), message


def test_related_arguments_are_checked_together():
    """Property: S_max below S_min and sigma_min not below sigma_max name both values."""
    with pytest.raises(ValueError, match=r"^S_max must be a number >= S_min = 1, got 0.5$"):
        EDMSampler(S_min=1.0, S_max=0.5)
    with pytest.raises(ValueError, match=r"^sigma_min must be below sigma_max, got sigma_min = 2.0 and "
                                         r"sigma_max = 1.0$"):
        UniPC(sigma_min=2.0, sigma_max=1.0)
