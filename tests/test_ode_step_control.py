"""The probability-flow ODE solver's two step controls against scipy's RK45 (what the official score_sde ODE sampler
calls), on the exact score of a Gaussian mixture in float64 at equal rtol / atol.

``batch`` must be scipy on the flattened batch (same NFE, same end state to float64 rounding); ``image`` must be
scipy on each image alone (each image's own NFE and end state).
"""
import pytest
import torch

from benchmarks.ode_nfe import mixture, scipy_rk45_nfe
from lit_score.sampling import ODESampler
from lit_score.rng import seeded_prior
from lit_score.sampling.ode import dopri5, probability_flow
from lit_score.diffusion.sdes import VESDE, VPSDE

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def _problem(sde, dim=8, batch=6):
    field = probability_flow(mixture(dim).score_fn(sde), sde, (dim,))
    return field, seeded_prior(sde, range(batch), (dim,)).double()


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-3), (VESDE(0.01, 50.0), 1e-5)])
def test_shared_step_is_scipy_rk45_on_the_flattened_batch(sde, eps):
    field, y0 = _problem(sde)
    nfe, y_ref = scipy_rk45_nfe(field, y0, sde.T, eps, TOL, TOL)
    sol = dopri5(field, y0, sde.T, eps, TOL, TOL, step_control="batch")
    assert sol.nfe.tolist() == [nfe] * len(y0)
    torch.testing.assert_close(sol.y, y_ref, rtol=1e-10, atol=1e-10 * float(y_ref.abs().max()))


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-3), (VESDE(0.01, 50.0), 1e-5)])
def test_per_image_step_is_scipy_rk45_on_each_image_alone(sde, eps):
    field, y0 = _problem(sde)
    sol = dopri5(field, y0, sde.T, eps, TOL, TOL, step_control="image")
    for i in range(len(y0)):
        nfe, y_ref = scipy_rk45_nfe(field, y0[i:i + 1], sde.T, eps, TOL, TOL)
        assert int(sol.nfe[i]) == nfe, f"image {i}"
        torch.testing.assert_close(sol.y[i:i + 1], y_ref, rtol=1e-10, atol=1e-10 * float(y_ref.abs().max()))
    assert len(set(sol.nfe.tolist())) > 1  # the images did take different numbers of steps


def test_sampler_reports_max_and_mean_nfe_for_both_controls():
    sde, mix = VPSDE(), mixture(8)
    image = ODESampler(rtol=1e-4, atol=1e-4, step_control="image").sample(mix.denoiser(sde), sde, (8,), range(6))
    batch = ODESampler(rtol=1e-4, atol=1e-4, step_control="batch").sample(mix.denoiser(sde), sde, (8,), range(6))
    assert image.nfe_mean < image.nfe and batch.nfe_mean == batch.nfe
    with pytest.raises(ValueError, match="step_control"):
        ODESampler(step_control="global")
