"""ConsistencySampler (Song et al. 2023, Algorithm 1; as ECT samples): with the exact consistency function of Gaussian
data its 1-, 2- and 3-step samples have the Gaussian law derived below; it calls D exactly at sigma_max and the
chosen levels, steps times, starting from the seed's starting noise and re-noising from the seed's noise stream."""
from __future__ import annotations

import math

import pytest
import torch

from lit_score.diffusion.denoiser import Counted, Denoiser
from lit_score.diffusion.sdes import VESDE, VPSDE
from lit_score.progress import planned_nfe
from lit_score.rng import seeded_normal, starting_noise
from lit_score.sampling import ConsistencySampler

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 1.0])  # data N(mu, s^2) per coordinate
SIGMA_MIN = 0.002
SHAPE = (2,)


def a(sigma: torch.Tensor | float) -> torch.Tensor:
    """The flow map's slope sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2): (x - mu) / sqrt(s^2 + sigma^2) is constant
    along the sigma-view probability-flow ODE of N(mu, s^2) data, whose marginals are N(mu, s^2 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.sqrt((S.double() ** 2 + SIGMA_MIN**2) / (S.double() ** 2 + sigma[..., None] ** 2))


class GaussianConsistency(Denoiser):
    """The exact consistency function of N(mu, s^2) data, f(x, sigma) = mu + (x - mu) a(sigma), recording its calls
    (input, sigma, output)."""

    def __init__(self, sde) -> None:
        self.sde, self.calls = sde, []

    def __call__(self, x_hat, sigma, cond=None):
        out = (MU + (x_hat.double() - MU) * a(sigma)).to(x_hat.dtype)
        self.calls.append((x_hat.clone(), sigma.clone(), out.clone()))
        return out


def exact_law(levels: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the samples, per coordinate: x_hat = sigma_max z ~ N(0, sigma_max^2); f maps N(m, v) at
    sigma to N(mu + (m - mu) a(sigma), a(sigma)^2 v); re-noising to s_k adds s_k^2 to the variance. E.g. one step:
    N(mu (1 - a_max), a_max^2 sigma_max^2); two steps: N(mu (1 - a_max a_1), a_1^2 (a_max^2 sigma_max^2 + s_1^2))."""
    m, v = torch.zeros(2, dtype=torch.float64), torch.full((2,), levels[0] ** 2, dtype=torch.float64)
    for k, sigma in enumerate(levels):
        if k > 0:
            v = v + sigma**2
        m, v = MU + (m - MU) * a(sigma), a(sigma) ** 2 * v
    return m, v


LAWS = {  # (sampler, sde)
    "1 step, ECT": (lambda: ConsistencySampler(), VESDE(SIGMA_MIN, 80.0)),
    "1 step, sigma_max 2": (lambda: ConsistencySampler(sigma_max=2.0), VESDE(SIGMA_MIN, 80.0)),
    "2 steps, ECT": (lambda: ConsistencySampler(steps=2), VESDE(SIGMA_MIN, 80.0)),
    "2 steps, VP": (lambda: ConsistencySampler(steps=2, sigma_max=3.0, sigmas=[0.3]), VPSDE()),
    "3 steps": (lambda: ConsistencySampler(steps=3, sigma_max=4.0, sigmas=[1.0, 0.2]), VESDE(SIGMA_MIN, 80.0)),
}


@pytest.mark.parametrize("name", LAWS)
def test_samples_of_gaussian_data_have_the_derived_law(name):
    """Property: with the exact consistency function, the samples of n seeds have the mean and variance of
    ``exact_law`` (within 5 standard errors: sqrt(v / n) for the mean, v sqrt(2 / (n - 1)) for the variance)."""
    make, sde = LAWS[name]
    sampler, n = make(), 20_000
    x = sampler.sample(GaussianConsistency(sde), sde, SHAPE, range(n)).samples.double()
    m, v = exact_law(sampler.noise_levels(sde))
    assert ((x.mean(0) - m).abs() <= 5 * (v / n).sqrt()).all(), (x.mean(0), m)
    assert ((x.var(0) - v).abs() <= 5 * v * math.sqrt(2 / (n - 1))).all(), (x.var(0), v)


CALLS = {  # (sampler, the levels D must be called at)
    "1 step": (ConsistencySampler(), [80.0]),
    "2 steps, default": (ConsistencySampler(steps=2), [80.0, 0.821]),
    "2 steps": (ConsistencySampler(steps=2, sigmas=[0.05], sigma_max=40.0), [40.0, 0.05]),
    "3 steps": (ConsistencySampler(steps=3, sigmas=[1.0, 0.01]), [80.0, 1.0, 0.01]),
    "3 steps, default": (ConsistencySampler(steps=3), [80.0, 9.723201355260132, 0.46997905799774714]),
    "sigma_max of the SDE": (ConsistencySampler(steps=2, sigma_max=None), [50.0, 0.821]),
}
SEEDS = [3, 0, 2**40 + 7]


@pytest.mark.parametrize("name", CALLS)
def test_d_is_called_steps_times_at_the_levels_from_the_seeds_noise(name):
    """Property: D is called ``steps`` times, the NFE reported and planned; call 1 at x_hat = sigma_max z (z the
    seeds' starting noise, exactly), call k > 1 at x_0 + s_k z_k: the last output re-noised with s_k itself (ECT)
    and z_k = draw k - 1 of the seeds' noise stream."""
    sampler, levels = CALLS[name]
    sde = VESDE(0.01, 50.0)
    D = GaussianConsistency(sde)
    counted = Counted(D)
    result = sampler.sample(counted, sde, SHAPE, SEEDS)
    assert result.nfe == counted.nfe == planned_nfe(sampler, sde) == len(D.calls) == len(levels) == sampler.steps
    for (x_hat, sigma, _), level in zip(D.calls, levels):
        torch.testing.assert_close(sigma, torch.full((len(SEEDS),), level), rtol=0, atol=0)
    torch.testing.assert_close(D.calls[0][0], levels[0] * starting_noise(SEEDS, SHAPE), rtol=0, atol=0)
    for k in range(1, len(levels)):
        z_k = (D.calls[k][0] - D.calls[k - 1][2]) / levels[k]
        torch.testing.assert_close(z_k, seeded_normal(SEEDS, SHAPE, step=k), rtol=0, atol=1e-4)
    torch.testing.assert_close(result.samples, D.calls[-1][2], rtol=0, atol=0)


def test_start_noise_replaces_the_seeds_starting_noise():
    sde = VESDE(SIGMA_MIN, 80.0)
    D, z = GaussianConsistency(sde), torch.randn(len(SEEDS), *SHAPE, generator=torch.Generator().manual_seed(1))
    ConsistencySampler(steps=2).sample(D, sde, SHAPE, SEEDS, start_noise=z)
    torch.testing.assert_close(D.calls[0][0], 80.0 * z, rtol=0, atol=0)


def test_an_image_depends_on_its_seed_only():
    """Property: seed 7 gives the same image drawn with seed 3 or alone; seeds 3 and 7 give different ones."""
    sde, sampler = VESDE(SIGMA_MIN, 80.0), ConsistencySampler(steps=3)
    pair = sampler.sample(GaussianConsistency(sde), sde, SHAPE, [3, 7]).samples
    alone = sampler.sample(GaussianConsistency(sde), sde, SHAPE, [7]).samples
    torch.testing.assert_close(pair[1], alone[0], rtol=1e-6, atol=1e-6)
    assert (pair[0] - pair[1]).abs().min() > 1e-3


BAD = [
    ({"steps": 0}, "steps", 0, "an integer >= 1"),
    ({"steps": 2.0}, "steps", 2.0, "an integer >= 1"),
    ({"sigma_max": -80.0}, "sigma_max", -80.0, "a number > 0 (or None: the SDE's sigma_max)"),
    ({"sigma_min": 0.0}, "sigma_min", 0.0, "a number > 0"),
    ({"steps": 1, "sigmas": [1.0]}, "sigmas", [1.0], "None or [] with steps = 1"),
    ({"steps": 2, "sigmas": [1.0, 0.5]}, "sigmas", [1.0, 0.5], "steps - 1 = 1 decreasing numbers in (0.002, 80)"),
    ({"steps": 3, "sigmas": [0.5, 1.0]}, "sigmas", [0.5, 1.0], "steps - 1 = 2 decreasing numbers in (0.002, 80)"),
    ({"steps": 2, "sigmas": [80.0]}, "sigmas", [80.0], "steps - 1 = 1 decreasing numbers in (0.002, 80)"),
    ({"steps": 2, "sigmas": [0.001]}, "sigmas", [0.001], "steps - 1 = 1 decreasing numbers in (0.002, 80)"),
    ({"steps": 2, "sigmas": "0.8"}, "sigmas", "0.8", "steps - 1 = 1 decreasing numbers in (0.002, 80)"),
    ({"steps": 2, "sigma_min": 1.0}, "sigmas", None, "steps - 1 = 1 decreasing numbers in (1, 80); the default"),
]


@pytest.mark.parametrize("kwargs, argument, value, valid", BAD, ids=[str(b[0]) for b in BAD])
def test_a_bad_option_is_refused_in_one_line(kwargs, argument, value, valid):
    """Property: a ValueError of one line naming the option, what it may be and the value given."""
    with pytest.raises(ValueError) as info:
        ConsistencySampler(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{argument} must be") and valid in message and \
        message.endswith(f", got {value!r}"), message


def test_sigma_min_not_below_sigma_max_names_both():
    with pytest.raises(ValueError, match=r"^sigma_min must be below sigma_max, got sigma_min = 90.0 and "
                                         r"sigma_max = 80.0$"):
        ConsistencySampler(sigma_min=90.0)


def test_levels_above_the_sdes_sigma_max_are_refused_when_it_is_the_start():
    with pytest.raises(ValueError, match=r"^sigmas must be steps - 1 = 1 decreasing numbers in \(0.002, 50\)"):
        ConsistencySampler(steps=2, sigmas=[60.0], sigma_max=None).sample(
            GaussianConsistency(VESDE(0.01, 50.0)), VESDE(0.01, 50.0), SHAPE, SEEDS)
