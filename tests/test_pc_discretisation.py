"""The official discretisation: each discrete level 0..N-1 used once, the official last time per SDE type, and the
discrete-loss (DDPM) score with sqrt(1 - alpha_bar_i); observed from what the sampler and the network receive."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ScoreDenoiser
from torch import nn

import lit_score.sampling.pc as pc
from lit_score.diffusion.losses import DDPMLoss, DSMLoss, SMLDLoss
from lit_score.runtime.module import ScoreModel
from lit_score.sampling import PCSampler, default_sampler
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE

pytestmark = pytest.mark.usefixtures("one_thread")
N = 1000


def _smld_sigmas(smin: float, smax: float, n: int) -> np.ndarray:
    return smin * (smax / smin) ** (np.arange(n) / (n - 1))  # Song & Ermon's geometric levels, ascending


def _ddpm_betas(bmin: float, bmax: float, n: int) -> np.ndarray:
    return bmin / n + np.arange(n) * (bmax - bmin) / (n * (n - 1))  # Ho et al.'s linear schedule, scaled by N


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_reverse_diffusion_uses_each_level_once_down_to_zero(monkeypatch, sde_name):
    """Property: with zero score and unit noise (float64), step k of reverse diffusion adds exactly G_i
    (VE: sqrt(sigma_i^2 - sigma_{i-1}^2), VP: sqrt(beta_i)); matching each added G to the table of levels gives
    N-1, N-2, ..., 0."""
    sde = VESDE(0.01, 50.0, N=N) if sde_name == "ve" else VPSDE(0.1, 20.0, N=N)
    if sde_name == "ve":
        s = _smld_sigmas(0.01, 50.0, N)
        table = np.sqrt(s**2 - np.concatenate([[0.0], s[:-1]]) ** 2)
    else:
        table = np.sqrt(_ddpm_betas(0.1, 20.0, N))
    ones = lambda seeds, shape, device="cpu": lambda: torch.ones(len(seeds), *shape, dtype=torch.float64)  # noqa: E731
    monkeypatch.setattr(pc, "SeededNoise", ones)
    added = []
    project = lambda x, x_mean, t: (added.append(float((x - x_mean)[0, 0])), (x, x_mean))[1]  # noqa: E731
    PCSampler("reverse_diffusion", "none").sample(ScoreDenoiser(lambda x, t: torch.zeros_like(x), sde), sde, (1,), [0],
                                                  x_init=torch.zeros(1, 1, dtype=torch.float64), project=project)
    levels = np.abs(np.log(np.array(added))[:, None] - np.log(table)[None, :]).argmin(1)
    assert levels.tolist() == list(range(N - 1, -1, -1))
    np.testing.assert_allclose(added, table[::-1], rtol=1e-4)


@pytest.mark.parametrize("sde,last", [(VESDE(), 1e-5), (VPSDE(), 1e-3), (subVPSDE(), 1e-3)])
def test_default_samplers_stop_at_the_official_last_time(sde, last):
    """Property: the default sampler's final score evaluation is at t = 1e-5 for VE, 1e-3 for VP and sub-VP."""
    seen = []
    score = lambda x, t: (seen.append(float(t[0])), -x)[1]  # noqa: E731
    PCSampler(steps=30 if isinstance(sde, VESDE) else 40).sample(ScoreDenoiser(score, sde), sde, (2,), [0])
    default_sampler(sde)  # builds without error for each SDE type
    assert math.isclose(seen[-1], last, rel_tol=1e-3) and math.isclose(seen[0], 1.0)


def test_ve_final_step_removes_the_noise_as_the_official_sampler():
    """Property: for point-mass data (p_t = N(0, sigma(t)^2), exact score -x / sigma(t)^2) the default VE sampler
    ends on level 0 at t = 1e-5, whose denoised mean keeps x (1 - sigma_0^2 / sigma(1e-5)^2), about 2e-6 of noise;
    ending on level 1 (round()) or at t = 1e-3 leaves about 1e-2 or 2e-4."""
    sde = VESDE(0.01, 50.0, N=N)
    score = lambda x, t: -x / sde.sigma(t)[:, None] ** 2  # noqa: E731
    samples = default_sampler(sde).sample(ScoreDenoiser(score, sde), sde, (2,), range(500)).samples
    assert float(samples.std()) < 1e-5


class LabelNet(nn.Module):
    """The exact minimiser of the DDPM loss for data N(0, s^2 I), at the step index nearest its label; it records
    the labels it is given."""

    def __init__(self, sde: VPSDE, data_std: float) -> None:
        super().__init__()
        self.ab = np.cumprod(1 - _ddpm_betas(sde.beta_0, sde.beta_1, sde.N))
        self.data_std, self.labels = data_std, []

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.labels.append(label.clone())
        ab = torch.as_tensor(self.ab, dtype=x.dtype)[label.round().long()][:, None]
        return torch.sqrt(1 - ab) * x / (ab * self.data_std**2 + 1 - ab)


def test_ddpm_trained_score_uses_the_discrete_std():
    """Property: the score of a DDPM-loss model (exact noise predictor) is the exact score -x / (ab_i s^2 + 1 - ab_i)
    of the DDPM marginal at step i, which needs std sqrt(1 - ab_i), not the continuous std (20% off at i = 1)."""
    sde = VPSDE(0.1, 20.0, N=N)
    net = LabelNet(sde, 0.5)
    model = ScoreModel(net, sde, loss=DDPMLoss())
    i = torch.tensor([1, 10, 500, 998])
    t = (i.double() + 0.25) / (N - 1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab = torch.as_tensor(net.ab)[i][:, None]
    torch.testing.assert_close(model.score_fn(x, t), -x / (ab * 0.25 + 1 - ab), rtol=2e-4, atol=0)  # float32 tables
    torch.testing.assert_close(net.labels[-1], t * (N - 1))


def test_continuous_vp_label_is_999_t():
    """Property: continuously trained VP-type networks are conditioned on 999 t whatever N (official convention)."""
    for sde in (VPSDE(N=100), subVPSDE(N=100)):
        net = LabelNet(VPSDE(N=1000), 0.5)
        t = torch.tensor([0.25, 1.0], dtype=torch.float64)
        ScoreModel(net, sde, loss=DSMLoss()).score_fn(torch.zeros(2, 3, dtype=torch.float64), t)
        torch.testing.assert_close(net.labels[-1], 999 * t)


class SigmaNet(nn.Module):
    """Records the noise labels it is given; outputs zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = []

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.labels.append(label.clone())
        return torch.zeros_like(x)


@pytest.mark.parametrize("loss", [SMLDLoss(), DSMLoss()], ids=["smld", "dsm"])
def test_smld_trained_network_sees_the_discrete_sigmas(loss):
    """Property: an SMLD-loss model (trained on the N discrete sigmas) is conditioned on the discrete sigma of level
    round((1 - t)(N - 1)) counted from sigma_max down, as the official discrete VE score (continuous=False); a
    continuously trained one on sigma(t). (The label the network gets is log sigma, as its Fourier embedding takes.)"""
    net = SigmaNet()
    t = torch.tensor([1.0, 0.5004, 0.3, 1e-5], dtype=torch.float64)
    ScoreModel(net, VESDE(0.01, 50.0, N=N), loss=loss).score_fn(torch.zeros(4, 2, dtype=torch.float64), t)
    if isinstance(loss, SMLDLoss):
        expected = _smld_sigmas(0.01, 50.0, N)[::-1][np.round((1 - t.numpy()) * (N - 1)).astype(int)]
    else:
        expected = 0.01 * 5000.0 ** t.numpy()
    np.testing.assert_allclose(np.exp(net.labels[-1].numpy()), expected, rtol=1e-5)
