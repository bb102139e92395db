"""EDM's preconditioning and loss (Karras et al. 2022) on Gaussian data N(mu, s0^2 I), where the ideal denoiser,
the score and the loss minimum have closed forms: E[x0 | x] = mu + s0^2 / (s0^2 + sigma^2) (x - mu), posterior
variance s0^2 sigma^2 / (s0^2 + sigma^2) per dimension."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_score.diffusion.likelihood import log_likelihood
from lit_score.diffusion.losses import DSMLoss, EDMLoss
from lit_score.diffusion.densities import GaussianMixture
from lit_score.runtime.module import ScoreModel
from lit_score.diffusion.denoiser import EDMPrecond, NetworkDenoiser, VEPrecond, VPPrecond
from lit_score.sampling import EDMSampler, ODESampler, PCSampler
from lit_score.diffusion.sdes import VESDE, VPSDE

MU, S0, SIGMA_DATA, D = 0.3, 0.7, 0.5, 2
GAUSSIAN = GaussianMixture([1.0], [[MU] * D], [S0])


def ideal_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MU + S0**2 / (S0**2 + sigma[:, None] ** 2) * (x - MU)


class EDMOracle(nn.Module):
    """The network F an EDM-preconditioned model needs to be exact, from the paper's Table 1 written out here:
    it sees c_in x and c_noise = ln(sigma) / 4 (whatever its embedding: networks embed the c_noise they get)."""

    def __init__(self) -> None:
        super().__init__()
        self.data_shape = (D,)

    def forward(self, u, label):
        sigma = torch.exp(4 * label)[:, None]
        root = torch.sqrt(sigma**2 + SIGMA_DATA**2)
        x = u * root
        c_skip, c_out = SIGMA_DATA**2 / root**2, sigma * SIGMA_DATA / root
        return (ideal_denoiser(x, sigma[:, 0]) - c_skip * x) / c_out


class NativeOracle(nn.Module):
    """score_sde's own parametrisation of the exact score: the noise -std score for VP (label 999 t), sigma * score
    for VE with the label EDM's VE c_noise = ln(sigma / 2) (what a Fourier embedding takes)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x, label):
        if self.kind == "vp":
            sde = VPSDE()
            t = label / 999
            return -sde.marginal_prob(torch.zeros_like(t), t)[1][:, None] * GAUSSIAN.score(x, sde, t).to(x)
        sigma = 2 * label.exp()
        return sigma[:, None] * GAUSSIAN.score(x, VESDE(0.002, 80.0), VESDE(0.002, 80.0).t_from_sigma(sigma)).to(x)


def points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2 - 1)  # 0.01 to 50
    x = MU + torch.randn(n, D, generator=g, dtype=torch.float64) * torch.sqrt(S0**2 + sigma[:, None] ** 2)
    return x, sigma


def test_edm_preconditioned_oracle_is_the_ideal_denoiser():
    """Property: the EDM preconditioning around the network of Table 1's exact target gives E[x0 | x]."""
    x, sigma = points()
    D_ = NetworkDenoiser(EDMOracle(), EDMPrecond(SIGMA_DATA), VESDE(0.002, 80.0))
    torch.testing.assert_close(D_(x, sigma), ideal_denoiser(x, sigma), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_vp_and_ve_preconditionings_are_the_sde_parametrisations(kind):
    """Property: EDM's VP and VE preconditionings around score_sde-parametrised exact networks give E[x0 | x]."""
    x, sigma = points()
    sigma = sigma.clamp(0.01, 40)
    precond = VPPrecond(0.1, 20.0, 1000) if kind == "vp" else VEPrecond()
    D_ = NetworkDenoiser(NativeOracle(kind), precond, VPSDE() if kind == "vp" else VESDE(0.002, 80.0))
    torch.testing.assert_close(D_(x, sigma), ideal_denoiser(x, sigma), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("sde", [VESDE(0.002, 80.0), VPSDE()], ids=["ve", "vp"])
def test_edm_model_exposes_the_exact_score(sde):
    """Property: the score of the EDM-parametrised oracle under any SDE is the exact score of the perturbed data."""
    model = ScoreModel(EDMOracle(), sde, loss=EDMLoss(sigma_data=SIGMA_DATA))
    t = torch.linspace(0.02, 1.0, 32, dtype=torch.float64)
    x = GAUSSIAN.sample(32, torch.Generator().manual_seed(1)).double() * 3
    torch.testing.assert_close(model.score_fn(x, t), GAUSSIAN.score(x, sde, t), rtol=1e-8, atol=1e-8)


def edm_minimum(P_mean=-1.2, P_std=1.2) -> float:
    """E_sigma[lambda(sigma) s0^2 sigma^2 / (s0^2 + sigma^2)], ln sigma ~ N(P_mean, P_std^2), by Gauss-Hermite."""
    z, w = np.polynomial.hermite_e.hermegauss(120)
    sigma = np.exp(P_mean + P_std * z)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return float(np.sum(w * weight * S0**2 * sigma**2 / (S0**2 + sigma**2)) / math.sqrt(2 * math.pi))


def test_edm_loss_of_the_ideal_denoiser_is_its_closed_form_minimum(one_thread):
    """Property: the EDM loss at the exact denoiser equals the weighted posterior variance integrated over the
    log-normal; tolerance 4 standard errors of 20 independent batch means. A wrong weighting (e.g. 1 / sigma^2, the
    VP/VE loss's) or sigma distribution moves it far outside."""
    loss, sde = EDMLoss(sigma_data=SIGMA_DATA), VESDE(0.002, 80.0)
    D_ = NetworkDenoiser(EDMOracle(), loss.default_precond(sde), sde)
    values = [float(loss(D_, GAUSSIAN.sample(10_000, torch.Generator().manual_seed(10 + k)).double(),
                         torch.Generator().manual_seed(100 + k))) for k in range(20)]
    mean, se = np.mean(values), np.std(values, ddof=1) / math.sqrt(len(values))
    expected = edm_minimum()
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    assert abs(expected - 1.0) > 20 * se  # sigma_data != s0: the minimum is not the trivial 1 of unit weighting


@pytest.mark.parametrize("sampler", [EDMSampler(steps=32), PCSampler("reverse_diffusion", "none", steps=500),
                                     ODESampler(rtol=1e-5, atol=1e-5)], ids=["edm_heun", "pc", "ode"])
def test_samplers_draw_gaussian_moments_from_an_edm_model(sampler, one_thread):
    """Property: every sampler kind draws N(mu, s0^2) from the EDM-parametrised oracle (VP SDE's time variable for PC
    and the ODE, the VE sigma view for Heun); mean and variance within 4 standard errors of n = 4000 samples."""
    sde = VESDE(0.002, 80.0) if isinstance(sampler, EDMSampler) else VPSDE()
    model = ScoreModel(EDMOracle(), sde, loss=EDMLoss(sigma_data=SIGMA_DATA)).float()
    n = 4000
    result = model.sample(torch.arange(n), sampler)
    x = result.samples.double()
    assert result.nfe > 0 and x.shape == (n, D)
    assert (x.mean(0) - MU).abs().max() < 4 * S0 / math.sqrt(n)
    assert (x.var(0) - S0**2).abs().max() < 4 * S0**2 * math.sqrt(2 / (n - 1))


def test_probability_flow_likelihood_of_an_edm_model(one_thread):
    """Property: the probability-flow log-likelihood of the EDM-parametrised oracle is the exact log density."""
    sde = VPSDE()
    model = ScoreModel(EDMOracle(), sde, loss=EDMLoss(sigma_data=SIGMA_DATA))
    x = GAUSSIAN.sample(16, torch.Generator().manual_seed(2))
    result = log_likelihood(model.score_fn, sde, x, torch.arange(16), probe="exact")
    assert (result.logp - GAUSSIAN.log_prob(x.double()).float()).abs().max() < 0.01

