"""Likelihoods through the probability-flow ODE against closed forms: with the exact score of a Gaussian
mixture the ODE's log-density is the exact log p_eps, and on quantised Gaussian data the bits/dim bound sits
just above the data's known discrete entropy."""
from __future__ import annotations

import math

import pytest
import torch

from lit_score.data_space import DataSpace, dequantize
from lit_score.diffusion.likelihood import Likelihood, bits_per_dim, log_likelihood
from lit_score.diffusion.densities import GaussianMixture
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE

MIX = GaussianMixture([0.3, 0.7], [[-2.0, -1.0], [2.0, 1.5]], [0.5, 0.8])
SDES = {"ve": lambda: VESDE(0.01, 50.0), "vp": lambda: VPSDE(), "subvp": lambda: subVPSDE()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sde_name", SDES)
def test_exact_trace_matches_exact_log_density(sde_name):
    """Property: with the exact divergence, every image's log p agrees with the closed form within 0.1 nats."""
    sde = SDES[sde_name]()
    x = MIX.sample(200, torch.Generator().manual_seed(3))
    result = log_likelihood(MIX.score_fn(sde), sde, x, range(200), probe="exact")
    exact = MIX.log_prob(x, sde, 1e-5)
    assert (result.logp - exact).abs().max() < 0.1


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("sde_name", SDES)
def test_hutchinson_estimate_is_unbiased(sde_name, probe):
    """Property: with one Hutchinson probe per image the mean log p over 500 images is within 4 standard errors
    of the exact mean (the estimator is unbiased; its per-image noise averages out)."""
    sde = SDES[sde_name]()
    x = MIX.sample(500, torch.Generator().manual_seed(4))
    err = log_likelihood(MIX.score_fn(sde), sde, x, range(500), probe=probe).logp - MIX.log_prob(x, sde, 1e-5)
    assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(500)
    assert float(err.std()) > 0  # the probes are random: per-image errors do vary


def _gaussian_score(mu: float, s: float, sde):
    g = GaussianMixture([1.0], [[mu] * 4], [s])
    return g, g.score_fn(sde)


def test_bits_per_dim_of_quantised_gaussian_data():
    """Property: 8-bit data from N(0.5, 0.1^2) per dim have discrete entropy H (summed over the 256 bins), i.e. the
    known bits/dim of a perfect model. With the exact score, each image's bits/dim is the closed form
    -log p(y) / (D ln 2) + 8 of its dequantised y, and their mean is H within 4 standard errors (the bound's gap
    to H is negligible for s >> 1/256)."""
    mu, s, D, n = 0.5, 0.1, 4, 400
    g = torch.Generator().manual_seed(0)
    k = torch.round((mu + s * torch.randn(n, D, generator=g, dtype=torch.float64)).clamp(0, 1) * 255)
    x = (k / 255).float()
    edges = torch.arange(257, dtype=torch.float64) / 256
    cdf = torch.special.ndtr((edges - mu) / s)
    p = cdf[1:] - cdf[:-1]
    p = p / p.sum()
    entropy = float(-(p * torch.log2(p.clamp_min(1e-300))).sum())  # bits per dim of the quantised data
    sde = VPSDE()
    mixture, score = _gaussian_score(mu, s, sde)
    bpd, nfe = Likelihood(probe="exact").bits_per_dim(score, sde, x, range(n), DataSpace((D,), centered=False))
    assert nfe > 0
    y = dequantize(x, range(n), centered=False)
    closed_form = -mixture.log_prob(y, sde, 1e-5) / (D * math.log(2)) + 8
    torch.testing.assert_close(bpd.double(), closed_form, atol=1e-2, rtol=0)
    assert abs(float(bpd.mean()) - entropy) < 4 * float(bpd.std()) / math.sqrt(n)
    assert math.isclose(entropy, 0.5 * math.log2(2 * math.pi * math.e * s**2) + 8, abs_tol=0.01)


def test_centered_and_uncentered_data_give_the_same_bits_per_dim():
    """Property: the offset is right: one data set in [0, 1] (offset 8) and mapped to [-1, 1] (offset 7), each
    with its exact model (N(0.5, 0.1^2) vs N(0, 0.2^2)), has the same bits/dim up to the ODE's error."""
    mu, s, D, n = 0.5, 0.1, 4, 50
    x = (torch.round((mu + s * torch.randn(n, D, generator=torch.Generator().manual_seed(1))).clamp(0, 1) * 255) / 255)
    sde = VPSDE()  # std(eps) ~ 1e-3: p_eps is the data density in both spaces (VE's 0.01 would blur them unequally)
    _, score01 = _gaussian_score(mu, s, sde)
    _, score11 = _gaussian_score(0.0, 2 * s, sde)
    like = Likelihood(probe="exact")
    bpd01, _ = like.bits_per_dim(score01, sde, x, range(n), DataSpace((D,), centered=False))
    bpd11, _ = like.bits_per_dim(score11, sde, 2 * x - 1, range(n), DataSpace((D,), centered=True))
    torch.testing.assert_close(bpd01, bpd11, atol=1e-2, rtol=0)  # a wrong offset would differ by 1 bit


def test_bits_per_dim_counts_into_a_progress_bar():
    """Property: given a progress bar (``lit-score test`` and ``lit-score-eval`` pass theirs), bits_per_dim counts its
    score evaluations and then its images into it, and gives the values it gives without one."""
    import io

    from lit_score.progress import Progress

    sde, n = VPSDE(), 6
    _, score = _gaussian_score(0.5, 0.1, sde)
    x = torch.round(torch.rand(n, 4, generator=torch.Generator().manual_seed(2)) * 255) / 255
    like, space = Likelihood(rtol=1e-3, atol=1e-3), DataSpace((4,), centered=False)
    plain, nfe = like.bits_per_dim(score, sde, x, range(n), space)
    progress = Progress("bpd", n, enabled=True, file=io.StringIO())
    shown, shown_nfe = like.bits_per_dim(score, sde, x, range(n), space, progress)
    assert torch.equal(shown, plain) and shown_nfe == nfe
    assert progress.done == n and progress.last_nfe == nfe and progress.nfe >= nfe


def test_dequantisation_stays_in_its_bin():
    """Property: each dequantised value lies in its level's bin [k/256, (k+1)/256), in either data space."""
    x = torch.tensor([[0.0, 1.0, 128 / 255, 3 / 255]])
    y = dequantize(x, [7], centered=False)
    k = torch.round(x * 255)
    assert ((y >= k / 256) & (y < (k + 1) / 256)).all()
    yc = dequantize(2 * x - 1, [7], centered=True)
    torch.testing.assert_close((yc + 1) / 2, y)


def test_bits_per_dim_offsets():
    """Property: log p = 0 gives 8 bits/dim for [0, 1] data, 7 for [-1, 1] data and 0 for continuous data."""
    zero = torch.zeros(1)
    assert float(bits_per_dim(zero, 10, centered=False)) == 8.0
    assert float(bits_per_dim(zero, 10, centered=True)) == 7.0
    assert float(bits_per_dim(zero, 10, centered=False, num_levels=None)) == 0.0


def test_bad_inputs_are_named():
    """Property: bad settings and data outside the declared space raise errors that say what is wrong."""
    with pytest.raises(ValueError, match="probe must be one of"):
        Likelihood(probe="sobol")
    with pytest.raises(ValueError, match=r"data must lie in \[0, 1\]"):
        dequantize(torch.tensor([[-0.5]]), [0], centered=False)
    with pytest.raises(ValueError, match="one seed per image"):
        log_likelihood(MIX.score_fn(VPSDE()), VPSDE(), torch.zeros(3, 2), [0, 1])
