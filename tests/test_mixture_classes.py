"""The exact class-conditional oracle ``ClassConditionalMixture`` against independent derivations: Bayes' rule and
normalisation of its densities, autograd gradients of its log-densities, the calibration of its class posterior,
its posterior means (Gaussian conjugacy for one component, self-normalised importance sampling for mixtures), and
the exact Bayes identity classifier guidance relies on, sigma^2 grad log p(y | x_hat) + D(x_hat) = D(x_hat | y)."""
from __future__ import annotations

import math

import pytest
import torch

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.densities import ClassConditionalMixture, GaussianMixture, three_class_2d
from lit_score.diffusion.sdes import VESDE, VPSDE
from lit_score.networks.cond import NULL_CLASS

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = three_class_2d()
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
SDES = {"vp": VPSDE, "ve": VESDE}
# (sde, t): the data itself, and perturbed ones from little noise to (nearly) the prior
STATES = [(None, None), ("vp", 0.05), ("vp", 0.5), ("vp", 1.0), ("ve", 0.1), ("ve", 0.5), ("ve", 0.9)]


def _state(name, t):
    return (None, None) if name is None else (SDES[name](), t)


def _perturbed_samples(n: int, sde, t, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, y): joint samples of the data pushed through the SDE's kernel x_t = scale x_0 + std z (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0, y = MIX.sample(n, g, dtype=torch.float64)
    if sde is None:
        return x0, y
    scale, std = sde.marginal_prob(torch.ones(n, dtype=torch.float64), torch.full((n,), float(t), dtype=torch.float64))
    return scale[:, None] * x0 + std[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64), y


def _mixed_labels(n: int, seed: int) -> torch.Tensor:
    return torch.randint(NULL_CLASS, 3, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,t", STATES)
def test_marginal_is_the_prior_weighted_sum_of_the_class_densities(name, t):
    """Property: log p_t(x) = logsumexp_y(log pi_y + log p_t(x | y)); each log p_t(x | y) is that of class y's own
    GaussianMixture (its independent code path); a label -1 (or no labels) is the marginal. All to float64
    rounding (1e-12 on log-densities of size ~10)."""
    sde, t = _state(name, t)
    x, _ = _perturbed_samples(300, sde, t, seed=1)
    per_class = torch.stack([MIX.log_prob(x, sde, t, y=c) for c in range(3)], 1)
    for c in range(3):
        torch.testing.assert_close(per_class[:, c], MIX.classes[c].log_prob(x, sde, t), rtol=0, atol=1e-12)
    marginal = MIX.log_prob(x, sde, t)
    torch.testing.assert_close(marginal, torch.logsumexp(PI.log() + per_class, 1), rtol=0, atol=1e-12)
    labels = _mixed_labels(300, seed=2)
    mixed = MIX.log_prob(x, sde, t, y=labels)
    expected = torch.where(labels < 0, marginal, per_class.gather(1, labels.clamp(min=0)[:, None])[:, 0])
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(MIX.log_prob(x, sde, t, y=torch.full((300,), NULL_CLASS)), marginal, rtol=0, atol=0)


def _quadrature_error_bound(weights, means, variances, h: float, L: float) -> float:
    """A bound on |h^2 sum_grid p - 1| for p = sum_k w_k N(m_k, diag(v_k)) on the midpoint grid of step h on
    [-L, L]^2: the lattice sum of a Gaussian over all of R aliases by at most 2 sum_j exp(-2 pi^2 j^2 v / h^2) per
    dimension (Poisson summation), and the lattice points beyond the box carry at most the Gaussian mass beyond
    L - h (a monotone tail: each cell's value is below the integral over the cell before it)."""
    alias = 2 * torch.exp(-2 * math.pi**2 * variances / h**2) / (1 - torch.exp(-2 * math.pi**2 * variances / h**2))
    alias = (torch.prod(1 + alias, -1) - 1)
    sd = variances.sqrt()
    tail = 0.5 * (torch.erfc((L - h - means) / (sd * math.sqrt(2))) + torch.erfc((L - h + means) / (sd * math.sqrt(2))))
    return float((weights * (alias + tail.sum(-1))).sum())


@pytest.mark.parametrize("h", [0.1, 0.5])
@pytest.mark.parametrize("name,t", [(None, None), ("vp", 0.5), ("ve", 0.3)])
def test_densities_integrate_to_one(name, t, h):
    """Property: the marginal and every class density integrate to 1 on a midpoint grid of step h on [-10, 10]^2,
    within the grid's derived error bound (aliasing + truncation: ~1e-14 for h = 0.1; ~7e-6 for h = 0.5 on the
    unperturbed data, whose error is ~1e-6) plus 1e-10 for the rounding of a float64 sum of up to 40 000 terms.
    A wrong normalising constant or a lost weight misses by far more."""
    sde, t = _state(name, t)
    L = 10.0
    axis = torch.arange(-L + h / 2, L, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    if sde is None:
        scale, std = 1.0, 0.0
    else:
        scale, std = (float(v) for v in sde.marginal_prob(torch.ones((), dtype=torch.float64),
                                                        torch.tensor(float(t), dtype=torch.float64)))
    cases = [(None, MIX.joint)] + [(c, MIX.classes[c]) for c in range(3)]
    for label, gm in cases:
        integral = float(MIX.log_prob(grid, sde, t, y=label).exp().sum()) * h**2
        bound = _quadrature_error_bound(gm.weights[:, None], scale * gm.means, scale**2 * gm.stds**2 + std**2, h, L)
        assert abs(integral - 1) <= bound + 1e-10, (label, integral, bound)


@pytest.mark.parametrize("name", list(SDES))
def test_scores_are_the_gradients_of_the_log_densities(name):
    """Property: score(x, sde, t, y) = autograd grad_x log_prob(x, sde, t, y) in float64, conditional (labels mixed
    with -1) and marginal, at times from near 0 to T and per-sample times; relative agreement 1e-9. The denoiser's
    exact score is the same, and so is Tweedie's score from its residual (the sigma-view posterior mean), which
    ties the sigma view to the t view."""
    sde = SDES[name]()
    den = MIX.denoiser(sde)
    n = 200
    for t in [1e-3, 0.05, 0.3, 0.7, 1.0, "mixed"]:
        if t == "mixed":
            t = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.99 + 0.01
            x = torch.cat([_perturbed_samples(1, sde, float(ti), seed=100 + i)[0] for i, ti in enumerate(t)])
        else:
            x, _ = _perturbed_samples(n, sde, t, seed=3)
        t_vec = torch.as_tensor(t, dtype=torch.float64).expand(n)
        for labels in [None, _mixed_labels(n, seed=4)]:
            x = x.detach().requires_grad_(True)
            grad, = torch.autograd.grad(MIX.log_prob(x, sde, t, y=labels).sum(), x)
            score = MIX.score(x.detach(), sde, t, y=labels)
            tol = 1e-9 * (1 + float(grad.abs().max()))
            torch.testing.assert_close(score, grad, rtol=1e-9, atol=tol)
            cond = None if labels is None else {"class_labels": labels}
            torch.testing.assert_close(den.score(x.detach(), t_vec, cond), score, rtol=0, atol=0)
            tweedie = Denoiser.score(den, x.detach(), t_vec, cond)
            torch.testing.assert_close(tweedie, score, rtol=1e-9, atol=tol)


@pytest.mark.parametrize("name,t", STATES)
def test_class_posterior_is_bayes_rule_and_calibrated(name, t):
    """Property: log p_t(y | x) rows are normalised (logsumexp 0 to 1e-12) and equal log pi_y + log p_t(x | y) -
    log p_t(x) (1e-12). Calibration on 20 000 joint samples (x_t, y): the mean of p_t(c | x_t) is pi_c within 5
    standard errors of that mean, and the mean of p_t(c | x_t) - 1{y = c} is 0 within 5 sqrt(pi_c (1 - pi_c) / n)
    (its variance E[p (1 - p)] is at most the binomial pi_c (1 - pi_c))."""
    sde, t = _state(name, t)
    n = 20_000
    x, y = _perturbed_samples(n, sde, t, seed=6)
    logp = MIX.class_log_prob(x, sde, t)
    assert logp.shape == (n, 3) and logp.dtype == torch.float64
    torch.testing.assert_close(logp.logsumexp(1), torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-12)
    head = x[:500]
    bayes = PI.log() + torch.stack([MIX.log_prob(head, sde, t, y=c) for c in range(3)], 1) - MIX.log_prob(head, sde, t)[:, None]
    torch.testing.assert_close(logp[:500], bayes, rtol=0, atol=1e-10)
    p = logp.exp()
    for c in range(3):
        pi = float(PI[c])
        assert abs(float(p[:, c].mean()) - pi) <= 5 * float(p[:, c].std()) / math.sqrt(n) + 1e-12, (c, float(p[:, c].mean()))
        gap = float((p[:, c] - (y == c).double()).mean())
        assert abs(gap) <= 5 * math.sqrt(pi * (1 - pi) / n), (c, gap)


def test_posterior_mean_of_one_gaussian_component_is_the_conjugate_closed_form():
    """Property: for a class that is one Gaussian N(mu, diag(s^2)), E[x_0 | x_hat, y] = mu + s^2 / (s^2 + sigma^2)
    (x_hat - mu) per coordinate (Gaussian conjugacy, derived here), to 1e-12, at per-sample sigmas; the denoiser's
    residual is D - x_hat."""
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 1.2], dtype=torch.float64)
    mix = ClassConditionalMixture([0.7, 0.3], weights=[[1.0], [0.4, 0.6]], means=[[mu.tolist()], [[-1.0, 1.0], [2.0, 2.0]]],
                                  stds=[[s.tolist()], [0.7, 0.3]])
    den = mix.denoiser(VESDE())
    g = torch.Generator().manual_seed(7)
    n = 100
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.01), math.log(50.0), generator=g))
    x_hat = mu + s * torch.randn(n, 2, generator=g, dtype=torch.float64) + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    cond = {"class_labels": torch.zeros(n, dtype=torch.long)}
    expected = mu + s**2 / (s**2 + sigma[:, None] ** 2) * (x_hat - mu)
    torch.testing.assert_close(den(x_hat, sigma, cond), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(den.residual(x_hat, sigma, cond), expected - x_hat, rtol=0, atol=1e-12)


def test_denoiser_reads_the_class_labels():
    """Property: the denoiser with labels c is class c's own GaussianMixture posterior mean; with no cond, no
    labels or -1 labels it is the marginal's (the joint GaussianMixture's), all to 1e-12; out-of-range labels are
    an error."""
    den = MIX.denoiser(VPSDE())
    x_hat, _ = _perturbed_samples(200, None, None, seed=8)
    sigma = torch.full((200,), 0.7, dtype=torch.float64)
    x_hat = x_hat + 0.7 * torch.randn(200, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    marginal = MIX.joint.posterior_mean(x_hat, sigma)
    for cond in [None, {}, {"class_labels": None}, {"class_labels": torch.full((200,), NULL_CLASS)}]:
        torch.testing.assert_close(den(x_hat, sigma, cond), marginal, rtol=0, atol=1e-12)
    labels = _mixed_labels(200, seed=10)
    out = den(x_hat, sigma, {"class_labels": labels})
    for c in range(3):
        rows = labels == c
        torch.testing.assert_close(out[rows], MIX.classes[c].posterior_mean(x_hat[rows], sigma[rows]), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[labels < 0], marginal[labels < 0], rtol=0, atol=1e-12)
    for bad in [torch.full((200,), 3), torch.full((200,), -2), torch.zeros(199, dtype=torch.long), torch.zeros(200)]:
        with pytest.raises(ValueError):
            den(x_hat, sigma, {"class_labels": bad})


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_posterior_mean_matches_importance_sampling(sigma):
    """Property: E[x_0 | x_hat, y] equals its self-normalised importance-sampling estimate from 100 000 samples of
    p_0(x_0 | y) (of p_0 for y = -1) weighted by N(x_hat; x_0, sigma^2 I), within 5 of the estimator's delta-method
    standard errors per coordinate, at 4 points per class."""
    g = torch.Generator().manual_seed(11)
    N, P = 100_000, 4
    for c in [0, 1, 2, NULL_CLASS]:
        prior = MIX.sample_class(c, N, g, dtype=torch.float64)
        x_hat = MIX.sample_class(c, P, g, dtype=torch.float64) + sigma * torch.randn(P, 2, generator=g, dtype=torch.float64)
        logw = -((x_hat[:, None, :] - prior[None]) ** 2).sum(-1) / (2 * sigma**2)  # (P, N)
        w = torch.softmax(logw, 1)
        est = w @ prior
        se = torch.sqrt((w[..., None] ** 2 * (prior[None] - est[:, None, :]) ** 2).sum(1))
        assert float((1 / (w**2).sum(1)).min()) > 500  # enough effective samples for the delta method
        exact = MIX.posterior_mean(x_hat, sigma, y=c)
        assert bool(((exact - est).abs() <= 5 * se).all()), (c, exact, est, se)


def test_guidance_identity_is_exact_bayes():
    """Property (exact Bayes + Tweedie): sigma^2 grad_{x_hat} log softmax(classifier.logits(x_hat, sigma))[y] +
    D(x_hat; sigma) = D(x_hat; sigma, y), with autograd through the logits, to 1e-10 in float64 at per-sample
    sigmas from 0.02 to 40; the closed-form grad_log_prob is that gradient; the logits are normalised; under the
    VP SDE they are the t view's p_t(y | s x_hat) (rescaling keeps the class posterior)."""
    sde = VPSDE()
    den, clf = MIX.denoiser(sde), MIX.classifier(sde)
    g = torch.Generator().manual_seed(12)
    n = 300
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.02), math.log(40.0), generator=g))
    x0, _ = MIX.sample(n, g, dtype=torch.float64)
    x_hat = (x0 + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 3, (n,), generator=g)
    logits = clf.logits(x_hat, sigma)
    assert logits.shape == (n, 3)
    torch.testing.assert_close(logits.detach().logsumexp(1), torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-12)
    chosen = torch.log_softmax(logits, 1).gather(1, y[:, None]).sum()
    grad, = torch.autograd.grad(chosen, x_hat)
    x_hat = x_hat.detach()
    guided = sigma[:, None] ** 2 * grad + den(x_hat, sigma)
    torch.testing.assert_close(guided, den(x_hat, sigma, {"class_labels": y}), rtol=0, atol=1e-10)
    torch.testing.assert_close(clf.grad_log_prob(x_hat, sigma, y), grad, rtol=1e-8, atol=1e-9)
    t = sde.t_from_sigma(sigma)
    x_t = sde.scale(t)[:, None] * x_hat
    torch.testing.assert_close(clf.log_prob(x_t, t), logits.detach(), rtol=0, atol=1e-9)


def test_sampling_follows_the_priors_and_the_classes():
    """Property: sample's labels have frequencies pi_y within 5 binomial standard errors, and each class's
    samples (from sample, from sample_class(c, n) and from per-label sample_class) have the class mean
    sum_k w_ck mu_ck within 5 standard errors per coordinate."""
    n = 40_000
    g = torch.Generator().manual_seed(13)
    x, y = MIX.sample(n, g)
    assert x.shape == (n, 2) and x.dtype == torch.float32 and y.dtype == torch.long
    for c in range(3):
        freq, pi = float((y == c).double().mean()), float(PI[c])
        assert abs(freq - pi) <= 5 * math.sqrt(pi * (1 - pi) / n)
    labels = _mixed_labels(n, seed=14)
    per_label = MIX.sample_class(labels, generator=g, dtype=torch.float64)
    for c in [0, 1, 2, NULL_CLASS]:
        gm = MIX.joint if c < 0 else MIX.classes[c]
        mean = gm.weights @ gm.means
        for xs in [MIX.sample_class(c, n, g, dtype=torch.float64), per_label[labels == c]] + ([x[y == c].double()] if c >= 0 else []):
            se = xs.std(0) / math.sqrt(len(xs))
            assert bool(((xs.mean(0) - mean).abs() <= 5 * se).all()), (c, xs.mean(0), mean)


def test_construction_errors():
    """Property: non-positive priors, a missing class's parameters and classes in different dimensions are errors;
    from_mixtures builds the same oracle as the parameters."""
    with pytest.raises(ValueError):
        ClassConditionalMixture([0.5, 0.0], [[1.0], [1.0]], [[[0.0, 0.0]], [[1.0, 1.0]]], [[1.0], [1.0]])
    with pytest.raises(ValueError):
        ClassConditionalMixture([0.5, 0.5], [[1.0]], [[[0.0, 0.0]]], [[1.0]])
    with pytest.raises(ValueError):
        ClassConditionalMixture([0.5, 0.5], [[1.0], [1.0]], [[[0.0, 0.0]], [[1.0]]], [[1.0], [1.0]])
    same = ClassConditionalMixture.from_mixtures([5, 3, 2], MIX.classes)
    x, _ = _perturbed_samples(50, None, None, seed=15)
    torch.testing.assert_close(same.log_prob(x), MIX.log_prob(x), rtol=0, atol=0)
    assert isinstance(MIX.marginal, GaussianMixture)
