"""SDEs: closed-form marginals, reverse-time drifts, discretisations and the sigma view."""
import math

import pytest
import torch

from lit_score.diffusion.sdes import SDE, VESDE, VPSDE, subVPSDE

SDE_FACTORIES = {
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=5.0, N=1000),
    "vp": lambda: VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": lambda: subVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
}


def simulate_forward(sde: SDE, x0: torch.Tensor, t_end: float, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Euler-Maruyama simulation of the forward SDE from time 0 to t_end."""
    x, dt = x0.clone(), t_end / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, dtype=x.dtype)
        drift, diffusion = sde.sde(x, t)
        x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("t_end", [0.3, 0.8])
def test_marginal_prob_matches_monte_carlo_of_forward_sde(name, t_end):
    """The perturbation kernel's mean and std equal those of 20000 simulated forward paths (within 4 standard errors)."""
    sde = SDE_FACTORIES[name]()
    n, dims = 20000, 3
    x0 = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64).expand(n, dims)
    xt = simulate_forward(sde, x0, t_end, steps=400, generator=torch.Generator().manual_seed(0))
    t = torch.full((n,), t_end, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t)
    if name == "ve":  # the forward SDE starts at sigma(0) = sigma_min, which the kernel's std counts in
        std = torch.sqrt(std**2 - sde.sigma_min**2)
    emp_mean, emp_std = xt.mean(0), xt.std(0)
    se_mean = std[0] / math.sqrt(n)
    assert torch.all((emp_mean - mean[0]).abs() < 4 * se_mean + 2e-3 * std[0]), (emp_mean, mean[0])
    assert torch.all((emp_std - std[0]).abs() < 4 * std[0] / math.sqrt(2 * n) + 1e-2 * std[0]), (emp_std, std[0])


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_drift_is_f_minus_g2_score(name, probability_flow):
    """Reverse SDE drift is f - g^2 s (eq. 6) and the probability-flow drift f - g^2 s / 2 (eq. 13)."""
    sde = SDE_FACTORIES[name]()
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    score_fn = lambda x, t: -x * (1 + t[:, None, None, None])  # noqa: E731
    rev_drift, rev_diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
    f, g = sde.sde(x, t)
    coef = 0.5 if probability_flow else 1.0
    expected = f - coef * g[:, None, None, None] ** 2 * score_fn(x, t)
    torch.testing.assert_close(rev_drift, expected)
    torch.testing.assert_close(rev_diffusion, torch.zeros_like(g) if probability_flow else g)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_sigma_view_is_the_marginal(name):
    """std(t) = scale(t) sigma(t), mean(t) = scale(t) x0, and t_from_sigma inverts sigma."""
    sde = SDE_FACTORIES[name]()
    t = torch.linspace(1e-3, 1.0, 50, dtype=torch.float64)
    x0 = torch.ones(50, 1, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t)
    torch.testing.assert_close(std, sde.scale(t) * sde.sigma(t))
    torch.testing.assert_close(mean[:, 0], sde.scale(t))
    torch.testing.assert_close(sde.t_from_sigma(sde.sigma(t)), t)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_prior_logp_is_the_prior_density(name):
    """prior_logp agrees with torch.distributions.Normal of the prior's std."""
    sde = SDE_FACTORIES[name]()
    z = sde.prior_sampling((4, 3, 2, 2), generator=torch.Generator().manual_seed(0)).double()
    prior_std = sde.sigma_max if name == "ve" else 1.0
    expected = torch.distributions.Normal(0.0, prior_std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), expected)


def test_ve_discretisation_telescopes_to_sigma_max():
    """SMLD steps add variances sigma_i^2 - sigma_{i-1}^2 (eq. 45): their sum is sigma_max^2."""
    sde = VESDE(0.01, 50.0, N=100)
    t = torch.linspace(0, 1, 100)
    _, G = sde.discretize(torch.zeros(100, 1), t)
    assert torch.isclose((G**2).sum(), torch.tensor(50.0**2), rtol=1e-4)


def test_vp_discretisation_is_ddpm():
    """DDPM steps x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i from beta_min/N to beta_max/N."""
    sde = VPSDE(0.1, 20.0, N=1000)
    x = torch.ones(2, 3)
    t = torch.tensor([0.0, 1.0])
    f, G = sde.discretize(x, t)
    torch.testing.assert_close(G**2, torch.tensor([0.1 / 1000, 20.0 / 1000]))
    torch.testing.assert_close(f + x, torch.sqrt(1 - G**2)[:, None] * x)


def test_euler_maruyama_discretize_default():
    """The base class discretisation is one Euler-Maruyama step of size T/N."""
    sde = subVPSDE(N=50)
    x, t = torch.randn(3, 2), torch.tensor([0.2, 0.5, 0.9])
    f, G = SDE.discretize(sde, x, t)
    drift, diffusion = sde.sde(x, t)
    torch.testing.assert_close(f, drift / 50)
    torch.testing.assert_close(G, diffusion / math.sqrt(50))


def test_bad_parameters():
    """Impossible parameters are refused."""
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(beta_min=5.0, beta_max=1.0)
