"""Score-matching losses: with the exact score of Gaussian data, each loss equals its closed-form minimum.

For x_0 ~ N(0, s0^2 I) and x_t = m x_0 + std z, the perturbed density is N(0, v I) with v = m^2 s0^2 + std^2,
its score is -x / v, and E|std * score + z|^2 = 1 - std^2 / v per dimension.
"""
import torch

from lit_score.diffusion.losses import ddpm_loss, dsm_loss, smld_loss
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE

S0 = 0.7


def exact_gaussian_score(sde):
    def score(x, t):
        mean_coeff, std = sde.marginal_prob(torch.ones_like(t), t)
        v = mean_coeff**2 * S0**2 + std**2
        return -x / v.reshape(-1, *([1] * (x.dim() - 1)))

    return score


def data(n=200_000, d=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * S0


def quadrature(f, lo, hi, n=20001):
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    return torch.trapezoid(f(t), t) / (hi - lo)


def test_dsm_loss_of_exact_score_is_its_closed_form_minimum():
    """Continuous DSM (eq. 7, lambda = std^2, reduce_mean): E_t[1 - std^2 / v] for VE, VP and sub-VP."""
    for sde in (VESDE(0.01, 3.0), VPSDE(), subVPSDE()):
        eps = 1e-5
        loss = dsm_loss(exact_gaussian_score(sde), sde, data(), eps=eps, reduce_mean=True,
                        generator=torch.Generator().manual_seed(1))

        def minimum(t):
            m, std = sde.marginal_prob(torch.ones_like(t), t)
            return 1 - std**2 / (m**2 * S0**2 + std**2)

        expected = quadrature(minimum, eps, 1.0)
        assert abs(loss.item() - expected.item()) < 0.01, (type(sde).__name__, loss.item(), expected.item())


def test_dsm_loss_with_likelihood_weighting():
    """lambda = g^2 (likelihood weighting) and half-sum reduction: d/2 E_t[g^2 (1/std^2 - 1/v)] for VP."""
    sde = VPSDE()
    eps = 1e-3
    loss = dsm_loss(exact_gaussian_score(sde), sde, data(400_000), eps=eps, reduce_mean=False,
                    likelihood_weighting=True, generator=torch.Generator().manual_seed(2))

    def minimum(t):
        m, std = sde.marginal_prob(torch.ones_like(t), t)
        return sde.diffusion(t) ** 2 * (1 / std**2 - 1 / (m**2 * S0**2 + std**2))

    expected = 2 / 2 * quadrature(minimum, eps, 1.0)
    assert abs(loss.item() / expected.item() - 1) < 0.03, (loss.item(), expected.item())


def test_smld_loss_of_exact_score_is_its_closed_form_minimum():
    """Discrete NCSN loss (sigma^2 weighting, half-sum): d/2 * mean_i (1 - sigma_i^2 / (s0^2 + sigma_i^2))."""
    sde = VESDE(0.01, 1.0, N=10)

    def model(x, sigma):
        return -x / (S0**2 + sigma**2)[:, None]

    loss = smld_loss(model, sde, data(), reduce_mean=False, generator=torch.Generator().manual_seed(3))
    s2 = sde.discrete_sigmas.double() ** 2
    expected = (1 - s2 / (S0**2 + s2)).mean()  # d/2 = 1
    assert abs(loss.item() - expected.item()) < 0.01, (loss.item(), expected.item())


def test_ddpm_loss_of_exact_noise_prediction_is_its_closed_form_minimum():
    """DDPM loss with the posterior mean of the noise: mean_i (1 - (1 - abar_i) / (abar_i s0^2 + 1 - abar_i))."""
    sde = VPSDE(N=1000)
    abar = sde.alphas_cumprod.double()

    def model(x, idx):
        a = abar[idx.long()]
        return (torch.sqrt(1 - a) / (a * S0**2 + 1 - a))[:, None] * x

    loss = ddpm_loss(model, sde, data(), reduce_mean=True, generator=torch.Generator().manual_seed(4))
    expected = (1 - (1 - abar) / (abar * S0**2 + 1 - abar)).mean()
    assert abs(loss.item() - expected.item()) < 0.01, (loss.item(), expected.item())


def test_discrete_losses_refuse_the_wrong_sde():
    """SMLD needs a VE SDE and DDPM a VP SDE; the error names the SDE given."""
    import pytest

    with pytest.raises(TypeError, match="VPSDE"):
        smld_loss(lambda x, s: x, VPSDE(), data(8))
    with pytest.raises(TypeError, match="VESDE"):
        ddpm_loss(lambda x, s: x, VESDE(), data(8))


def test_discrete_loss_objects_name_the_sde_and_preconditioning_they_need():
    """Property: a model with a discrete loss under the wrong SDE or preconditioning stops, naming both."""
    import pytest
    from torch import nn

    from lit_score.diffusion.denoiser import NoisePrediction
    from lit_score.diffusion.losses import DDPMLoss, SMLDLoss
    from lit_score.runtime.module import ScoreModel

    with pytest.raises(TypeError, match="SMLDLoss needs a VESDE and the SMLDLevels preconditioning, got VPSDE"):
        ScoreModel(nn.Identity(), VPSDE(), SMLDLoss())
    with pytest.raises(TypeError, match="DDPMLoss needs a VPSDE and the DDPMSteps preconditioning, got VPSDE and "
                                        "NoisePrediction"):
        ScoreModel(nn.Identity(), VPSDE(), DDPMLoss(), precond=NoisePrediction())
    assert type(ScoreModel(nn.Identity(), VESDE(), SMLDLoss()).precond).__name__ == "SMLDLevels"
