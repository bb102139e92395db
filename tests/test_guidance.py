"""Guidance against a class-conditional Gaussian mixture with exact p_t(x | y), p_t(x) and p_t(y | x)
(``lit_score.diffusion.densities.ClassConditionalMixture``): the guided fields equal their closed forms, and with
the exact classifier at scale 1 every sampler draws p(x | y) and the likelihood gives log p(x | y)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.distances import energy_distance
from conftest import null_tolerance
from lit_score.diffusion.denoiser import Counted
from lit_score.diffusion.densities import GaussianMixture, three_class_2d
from lit_score.diffusion.guidance import (AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance, Conditioned)
from lit_score.diffusion.likelihood import log_likelihood
from lit_score.diffusion.sdes import VESDE, VPSDE, bcast
from lit_score.sampling import EDMSampler, ODESampler, PCSampler
from lit_score.sampling.sigma import DPMSolverPP
from lit_score.sampling.solvers import AdaptiveSDESampler, DPMSolverPPSDE, EulerSampler, IPNDM, UniPC

pytestmark = pytest.mark.usefixtures("one_thread")

CM = three_class_2d()
SDES = {"vp": lambda: VPSDE(N=100), "ve": lambda: VESDE(0.01, 50.0, N=100)}


def points(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, t and labels (every class and the null class) at random times."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) * 3, torch.rand(n, generator=g, dtype=torch.float64)
            * 0.98 + 0.01, torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0])
def test_classifier_free_field_is_the_weighted_scores(sde_name, w):
    """CFG's score is w grad log p_t(x | y) + (1 - w) grad log p_t(x), in the score view and the denoiser view."""
    sde = SDES[sde_name]()
    x, t, y = points()
    D = CM.denoiser(sde)
    guided = ClassifierFreeGuidance(w).guided(D, y)
    expected = w * CM.score(x, sde, t, y) + (1 - w) * CM.score(x, sde, t)
    assert torch.allclose(guided.score(x, t), expected, rtol=1e-9, atol=1e-9)
    sigma = sde.sigma(t)
    x_hat = x / bcast(sde.scale(t), x)
    expected_D = w * CM.posterior_mean(x_hat, sigma, y) + (1 - w) * CM.posterior_mean(x_hat, sigma)
    assert torch.allclose(guided(x_hat, sigma), expected_D, rtol=1e-9, atol=1e-9)
    assert guided.evaluations == 4  # two calls, each one batched call of 2B images: the conditional and null passes


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_classifier_guidance_adds_w_times_the_classifier_gradient(w):
    """On the unconditional model, ClassifierGuidance's score is grad log p_t(x) + w grad log p_t(y | x); at w = 1
    it is exactly the conditional score grad log p_t(x | y) (Bayes)."""
    sde = VPSDE(N=100)
    x, t, y = points(seed=1)
    guided = ClassifierGuidance(CM.classifier(sde), w).guided(CM.joint.denoiser(sde), y)
    log_py = torch.func.grad(lambda z: CM.class_log_prob(z, sde, t).gather(1, y[:, None]).sum())(x)
    assert torch.allclose(guided.score(x, t), CM.score(x, sde, t) + w * log_py, rtol=1e-8, atol=1e-8)
    if w == 1.0:
        assert torch.allclose(guided.score(x, t), CM.score(x, sde, t, y), rtol=1e-8, atol=1e-8)


def test_autoguidance_extrapolates_from_the_guide():
    """AutoGuidance's score is grad log p_g(x | y) + w (grad log p(x | y) - grad log p_g(x | y)) for a guide p_g (here
    the same classes with wider components): w = 1 is the model, w = 0 the guide."""
    sde = VPSDE(N=100)
    x, t, y = points(seed=2)
    weak = type(CM).from_mixtures(CM.class_probs, [GaussianMixture(m.weights, m.means, m.stds * 1.5)
                                                    for m in CM.classes])
    for w in (0.0, 1.0, 2.0):
        got = AutoGuidance(weak.denoiser(sde), w).guided(CM.denoiser(sde), y).score(x, t)
        expected = weak.score(x, sde, t, y) + w * (CM.score(x, sde, t, y) - weak.score(x, sde, t, y))
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_autoguidance_guides_an_unconditional_model_too():
    """Without labels (an unconditional model) AutoGuidance extrapolates from the unconditional guide."""
    sde = VPSDE(N=100)
    x, t, _ = points(seed=4)
    weak = GaussianMixture(CM.joint.weights, CM.joint.means, CM.joint.stds * 1.5)
    got = AutoGuidance(weak.denoiser(sde), 2.0).guided(CM.joint.denoiser(sde), None)
    expected = weak.score(x, sde, t) + 2.0 * (CM.joint.score(x, sde, t) - weak.score(x, sde, t))
    assert torch.allclose(got.score(x, t), expected, rtol=1e-9, atol=1e-9)
    assert torch.allclose(got.rows(torch.arange(5)).score(x[:5], t[:5]), expected[:5], rtol=1e-9, atol=1e-9)


def test_the_interval_guides_only_inside_it():
    """Outside (sigma_lo, sigma_hi] the guided denoiser is the conditional model and makes one pass."""
    sde = VESDE(0.01, 50.0, N=100)
    x, _, y = points(seed=3)
    sigma = torch.cat([torch.full((32,), 0.5), torch.full((32,), 5.0)]).double()
    D = CM.denoiser(sde)
    guided = ClassifierFreeGuidance(3.0, interval=[1.0, 10.0]).guided(D, y)
    out = guided(x, sigma)
    conditional = CM.posterior_mean(x, sigma, y)
    full = ClassifierFreeGuidance(3.0).guided(D, y)(x, sigma)
    assert torch.allclose(out[:32], conditional[:32], atol=1e-12) and torch.allclose(out[32:], full[32:], atol=1e-12)
    assert not torch.allclose(full[:32], conditional[:32])
    outside = ClassifierFreeGuidance(3.0, interval=[1.0, 10.0]).guided(D, y)
    rows = torch.arange(32)
    assert torch.equal(outside.rows(rows)(x[:32], sigma[:32]), out[:32])  # the first 32 images alone
    assert outside.evaluations == 1


N = 1000
SAMPLERS = {
    "pc": (lambda: PCSampler("reverse_diffusion", "langevin", snr=0.16, steps=100), "vp"),
    "ode": (lambda: ODESampler(), "vp"),
    "adaptive_sde": (lambda: AdaptiveSDESampler(), "vp"),
    "edm_heun": (lambda: EDMSampler(steps=30), "ve"),
    "dpm_solver_pp": (lambda: DPMSolverPP(steps=20), "ve"),
    "dpm_solver_pp_sde": (lambda: DPMSolverPPSDE(steps=40, order=2), "ve"),
    "unipc": (lambda: UniPC(steps=15), "ve"),
    "ipndm": (lambda: IPNDM(steps=20, variable=True), "ve"),
    "euler": (lambda: EulerSampler(steps=100), "ve"),
}


@pytest.fixture(scope="module")
def class_one():
    target = CM.classes[1]
    return target.sample(N, torch.Generator().manual_seed(5)), null_tolerance(target, N)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_draws_the_class_with_the_exact_classifier(class_one, name):
    """Classifier guidance at scale 1 with the exact classifier on the unconditional model: the sampler draws
    p(x | y = 1) within the null tolerance of the energy distance, with one guided evaluation per NFE; the
    unguided model (the marginal) is far from it, so the test can fail."""
    ref, tol = class_one
    make, sde_name = SAMPLERS[name]
    sde = SDES[sde_name]()
    labels = torch.ones(N, dtype=torch.long)
    guided = ClassifierGuidance(CM.classifier(sde), 1.0).guided(CM.joint.denoiser(sde), labels)
    counted = Counted(guided)
    result = make().sample(counted, sde, (2,), range(N))
    assert result.nfe == counted.nfe and guided.evaluations == 2 * counted.nfe
    assert energy_distance(result.samples, ref) < tol
    if name == "edm_heun":
        plain = make().sample(CM.joint.denoiser(sde), sde, (2,), range(N)).samples
        assert energy_distance(plain, ref) > 10 * tol


def test_conditioned_model_at_scale_one_is_the_conditional_model(class_one):
    """Classifier-free guidance at w = 1 draws p(x | y) (the conditional pass alone), through the batched call."""
    ref, tol = class_one
    sde = VESDE(0.01, 50.0, N=100)
    labels = torch.ones(N, dtype=torch.long)
    samples = EDMSampler(steps=30).sample(ClassifierFreeGuidance(1.0).guided(CM.denoiser(sde), labels), sde, (2,),
                                          range(N)).samples
    assert energy_distance(samples, ref) < tol
    bound = EDMSampler(steps=30).sample(Conditioned(CM.denoiser(sde), {"class_labels": labels}), sde, (2,),
                                        range(N)).samples
    assert torch.allclose(samples, bound, atol=1e-5)


def test_the_likelihood_of_the_guided_model_is_log_p_x_given_y():
    """The probability-flow ODE's likelihood through classifier guidance (scale 1, exact classifier) is the closed
    form log p(x | y) within 0.1 nats, and differs from log p(x) by more than that."""
    sde = VPSDE(N=100)
    x, y = CM.sample(200, torch.Generator().manual_seed(6))
    x = x.float()
    guided = ClassifierGuidance(CM.classifier(sde), 1.0).guided(CM.joint.denoiser(sde), y)
    logp = log_likelihood(guided.score, sde, x, range(200), probe="exact").logp
    exact = CM.log_prob(x.double(), sde, 1e-5, y)
    assert (logp - exact).abs().max() < 0.1
    assert (CM.log_prob(x.double(), sde, 1e-5) - exact).abs().max() > 0.5


def test_bad_guidance_options_are_named():
    with pytest.raises(ValueError, match="finite"):
        ClassifierFreeGuidance(float("nan"))
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(2.0, interval=[5.0, 1.0])
    with pytest.raises(ValueError, match="not loaded"):
        AutoGuidance("runs/x.ckpt").guided(CM.denoiser(VPSDE()), torch.zeros(2, dtype=torch.long))
