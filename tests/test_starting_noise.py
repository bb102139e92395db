"""One seed, one starting noise: every sampler starts image i from the same standard normal z_i
(``lit_score.rng.starting_noise``), scaled to its first time or noise level (prior std * z in the t view, sigma_0 z
in the sigma view), so samplers can be compared image by image. With the exact Gaussian-mixture denoiser a
deterministic ODE sample and a Heun sample of a seed then solve the same probability-flow ODE from the same point."""
from __future__ import annotations

import inspect

import pytest
import torch

import lit_score.sampling as sampling
from lit_score import rng
from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.densities import GaussianMixture
from lit_score.diffusion.sdes import VESDE, VPSDE
from lit_score.sampling import (IPNDM, AdaptiveSDESampler, ConsistencySampler, DPMSolverPP, DPMSolverPP3M,
                                DPMSolverPPSDE, EDMSampler, EulerSampler, ODESampler, PCSampler, Sampler, UniPC,
                                starting_noise)

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = GaussianMixture([0.3, 0.7], [[-2.0, -1.0], [2.0, 1.5]], [0.5, 0.8])
MIX16 = GaussianMixture([0.3, 0.7], torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), [0.5, 0.8])
SDES = {"ve": lambda: VESDE(0.01, 50.0, N=20), "vp": lambda: VPSDE(N=20)}
SEEDS = [3, 0, 2**40 + 7]
SAMPLERS = {
    "pc reverse_diffusion + langevin": lambda: PCSampler("reverse_diffusion", "langevin", steps=3),
    "pc ancestral": lambda: PCSampler("ancestral_sampling", "none", steps=25),  # VP: more steps than beta_max
    "pc euler_maruyama, predictor first": lambda: PCSampler("euler_maruyama", "langevin", steps=3,
                                                            order="predictor_first"),
    "pc annealed langevin alone": lambda: PCSampler("none", "ald", steps=3),
    "ode": lambda: ODESampler(rtol=1e-2, atol=1e-2),
    "adaptive sde": lambda: AdaptiveSDESampler(abstol=0.1, reltol=0.1),
    "edm heun": lambda: EDMSampler(steps=3),
    # no churn at sigma_0 (> S_max), so the first evaluation sees the start itself
    "edm stochastic float64": lambda: EDMSampler(steps=3, S_churn=10.0, S_min=0.05, S_max=20.0, float64=True),
    "dpm-solver++ 2m": lambda: DPMSolverPP(steps=3),
    "dpm-solver++ 3m": lambda: DPMSolverPP3M(steps=3),
    "dpm-solver++ sde": lambda: DPMSolverPPSDE(steps=3),
    "unipc": lambda: UniPC(steps=3),
    "ipndm": lambda: IPNDM(steps=3),
    "euler": lambda: EulerSampler(steps=3),
    "consistency 2 steps": lambda: ConsistencySampler(steps=2, sigma_max=None),  # starts at the SDE's sigma_max
}


class _Stop(Exception):
    pass


class FirstInput(Denoiser):
    """The exact denoiser, recording the first evaluation (of D or of the score) and stopping the sampler there."""

    def __init__(self, sde) -> None:
        self.inner, self.sde, self.first = MIX.denoiser(sde), sde, None

    def __call__(self, x_hat, sigma, cond=None):
        self.first = ("sigma", x_hat, sigma)
        raise _Stop

    def score(self, x, t, cond=None):
        self.first = ("t", x, t)
        raise _Stop


def first_input(sampler: Sampler, sde, start_noise=None) -> tuple[str, torch.Tensor, torch.Tensor]:
    D = FirstInput(sde)
    with pytest.raises(_Stop):
        sampler.sample(D, sde, (2,), SEEDS, start_noise=start_noise)
    return D.first


def test_every_sampler_class_is_covered():
    """Property: the table below holds every concrete sampler lit_score.sampling exports."""
    exported = {c for c in vars(sampling).values()
                if inspect.isclass(c) and issubclass(c, Sampler) and not inspect.isabstract(c)}
    assert {type(make()) for make in SAMPLERS.values()} == exported


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_starts_from_the_seeds_starting_noise(name, sde_name):
    """Property: the first point any sampler evaluates the model at is the seed's starting noise z scaled to its
    first time (x_T = prior std * z at t = T) or noise level (x_hat = sigma_0 z at sigma_0 = sigma(T)): the same z
    for every sampler, in the scaled view x_hat = sigma(T) z (VP's prior std 1 is s(T) sigma(T) to 5e-5). A
    ``start_noise`` given replaces z."""
    sde = SDES[sde_name]()
    sigma_T = float(sde.sigma(torch.tensor(sde.T, dtype=torch.float64)))
    z = starting_noise(SEEDS, (2,))
    for start in (None, torch.randn(len(SEEDS), 2, generator=torch.Generator().manual_seed(5))):
        view, x, level = first_input(SAMPLERS[name](), sde, start)
        if view == "t":  # the score at x_T
            torch.testing.assert_close(level, torch.full_like(level, sde.T), rtol=0, atol=0)
            x_hat = x / sde.scale(level)[:, None]
            z_seen = x / sde.prior_from_noise(torch.ones(1))
        else:  # D at x_hat = sigma_0 z
            torch.testing.assert_close(level.double(), torch.full_like(level.double(), sigma_T), rtol=1e-6, atol=0)
            x_hat, z_seen = x, x / level[:, None]
        expected = z if start is None else start
        torch.testing.assert_close(z_seen.float(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x_hat.double(), sigma_T * expected.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_start_is_drawn_first_and_no_later_noise_reuses_it(name, monkeypatch):
    """Property: a whole run draws from the seeds' generators the starting noise first (draw 0 of the prior
    stream) and never that draw again: later noise (PC's predictor and corrector, EDM's churn, the SDE solvers')
    comes from other draws."""
    draws = []
    philox_draw = rng._Philox.draw

    def logged(self, step, stream=rng.NOISE_STREAM):
        draws.append((step, stream))
        return philox_draw(self, step, stream)

    monkeypatch.setattr(rng._Philox, "draw", logged)
    sde = VESDE(0.01, 50.0, N=20)
    SAMPLERS[name]().sample(MIX.denoiser(sde), sde, (2,), SEEDS)
    assert draws[0] == (0, rng.PRIOR_STREAM) and draws.count((0, rng.PRIOR_STREAM)) == 1, draws


@pytest.mark.parametrize("sde", [VESDE(0.01, 50.0), VPSDE()], ids=["ve", "vp"])
def test_ode_and_heun_samples_of_a_seed_agree_image_by_image(sde):
    """Property: with the exact denoiser, the adaptive probability-flow ODE (t view, denoised at eps) and EDM's Heun
    (sigma view, N levels down to sigma(eps), then D) of the same seed solve the same ODE from the same x_T, so
    they differ by Heun's discretisation error alone. Heun is second order: its error at N steps is 4/3 of
    |Heun_N - Heun_2N| (Richardson), measured here per image; each image is within twice that (plus 1e-3 for the
    ODE's own tolerance), while images of different seeds are more than 10 times farther apart."""
    seeds, shape, eps, N = range(32), (16,), 1e-3, 20
    D = MIX16.denoiser(sde)
    sigma_eps = float(sde.sigma(torch.tensor(eps, dtype=torch.float64)))
    ode = ODESampler(rtol=1e-6, atol=1e-6, eps=eps, denoise=True).sample(D, sde, shape, seeds).samples
    heun = EDMSampler(steps=N, sigma_min=sigma_eps).sample(D, sde, shape, seeds).samples
    heun2 = EDMSampler(steps=2 * N, sigma_min=sigma_eps).sample(D, sde, shape, seeds).samples
    error, richardson = (ode - heun).norm(dim=1), (heun - heun2).norm(dim=1)
    tolerance = 2 * richardson + 1e-3
    assert (error <= tolerance).all(), (error / tolerance).max()
    wrongly_paired = (ode - heun.roll(1, 0)).norm(dim=1)
    assert wrongly_paired.min() > 10 * tolerance.max(), (wrongly_paired.min(), tolerance.max())
