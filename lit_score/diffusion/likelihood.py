"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, appendix D.2), in bits/dim.

log p_0(x(0)) = log p_T(x(T)) + int_0^T div f~(x(t), t) dt, with f~ the probability-flow drift (eq. 13) and the
divergence estimated by Hutchinson-Skilling, div f~ = E_v[v^T (df~/dx) v] (one fixed probe v per image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from lit_score.data_space import DataSpace
from lit_score.progress import Progress
from lit_score.rng import seeded_normal
from lit_score.sampling.ode import dopri5
from lit_score.diffusion.denoiser import score_rows
from lit_score.diffusion.sdes import SDE, ScoreFn

Probe = Literal["rademacher", "gaussian", "exact"]
PROBES = ("rademacher", "gaussian", "exact")


@dataclass
class LikelihoodResult:
    logp: Tensor  # (B,) log-density of x in nats, in the data space the model was trained on
    z: Tensor  # (B, ...) the ODE's end point x(T)
    nfe: int  # largest number of drift evaluations of any image (each is one score evaluation and one VJP)


def hutchinson_probes(seeds: Sequence[int] | Tensor, shape: tuple[int, ...], probe: Probe = "rademacher",
                      device: torch.device | str = "cpu") -> Tensor:
    """One probe per image, E[v v^T] = I: Rademacher signs or standard normal, from the image's seed."""
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"Hutchinson probes are 'rademacher' or 'gaussian', got {probe!r}")
    v = seeded_normal(seeds, shape, step=2**20, device=device)
    return torch.sign(v) if probe == "rademacher" else v


def log_likelihood(score_fn: ScoreFn, sde: SDE, x: Tensor, seeds: Sequence[int] | Tensor,
                   probe: Probe = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   eps: float = 1e-5) -> LikelihoodResult:
    """log p_eps(x) per image by integrating [x, int div f~] from eps to T with dopri5.

    ``probe="exact"`` computes the divergence exactly with D vector-Jacobian products (small D only).
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}; got {probe!r}")
    if len(seeds) != x.shape[0]:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {x.shape[0]} images")
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must be in [0, T), got {eps}")
    shape = tuple(x.shape[1:])
    D = math.prod(shape)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float()
        if probe == "exact":
            v = torch.eye(D, device=x.device).reshape(D, 1, *shape).expand(D, x.shape[0], *shape).transpose(0, 1)
        else:
            v = hutchinson_probes(seeds, shape, probe, x.device)[:, None]
        def field(t: Tensor, y: Tensor, rows_cond: tuple[Tensor, Tensor]) -> Tensor:
            v_rows, rows = rows_cond  # the probes and indices of the images dopri5 steps
            xt = y[:, :D].reshape(-1, *shape).detach().requires_grad_(True)
            drift = sde.reverse(score_rows(score_fn, rows), probability_flow=True).sde(xt, t)[0]
            div = torch.zeros(xt.shape[0], device=xt.device, dtype=xt.dtype)
            for j in range(v_rows.shape[1]):
                (vjp,) = torch.autograd.grad((drift * v_rows[:, j]).sum(), xt, retain_graph=j + 1 < v_rows.shape[1])
                div = div + (vjp * v_rows[:, j]).flatten(1).sum(1)
            return torch.cat([drift.detach().flatten(1), div.detach()[:, None]], 1)

        y0 = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], 1)
        sol = dopri5(field, y0, eps, sde.T, rtol, atol, cond=(v, torch.arange(x.shape[0], device=x.device)))
    z = sol.y[:, :D].reshape(x.shape)
    logp = sde.prior_logp(z) + sol.y[:, D]
    return LikelihoodResult(logp.detach(), z.detach(), int(sol.nfe.max()))


def bits_per_dim(logp: Tensor, num_dims: int, centered: bool, num_levels: int | None = 256) -> Tensor:
    """bpd = -log p(x) / (D ln 2) + log2(L) - [centered], an upper bound on the discrete model's bits/dim.

    With y = (k + u) / L in [0, 1]^D the dequantised data, the discrete model P(k) >= exp(E_u log p_y(y)) / L^D
    (Jensen), so -log2 P(k) / D <= -E log p_y(y) / (D ln 2) + log2 L. Centered data x = 2y - 1 has
    p_x(x) = p_y(y) / 2^D, hence log p_y = log p_x + D ln 2 and the offset drops by log2 2 = 1:
    8 bits for [0, 1] data and 7 for [-1, 1] data from 256 levels (as the official score_sde code).
    With ``num_levels=None`` the data are continuous and bpd = -log p(x) / (D ln 2), no offset.
    """
    bpd = -logp / (num_dims * math.log(2))
    if num_levels is None:
        return bpd
    return bpd + math.log2(num_levels) - (1.0 if centered else 0.0)


class Likelihood:
    """How test-set bits/dim are measured (``lit-score test`` and ``lit-score-eval``); the data's range and
    quantisation come from the model's data space.

    Args:
        probe: Hutchinson probe distribution, ``rademacher`` or ``gaussian``, or ``exact`` (D VJPs per step).
        rtol, atol: dopri5 tolerances.
        eps: the time at which the data density is evaluated (log p_eps ~ log p_0).
    """

    def __init__(self, probe: Probe = "rademacher", rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5) -> None:
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {', '.join(PROBES)}; got {probe!r}")
        self.probe, self.rtol, self.atol, self.eps = probe, rtol, atol, eps

    def bits_per_dim(self, score_fn: ScoreFn, sde: SDE, x: Tensor, seeds: Sequence[int] | Tensor,
                     space: DataSpace, progress: Progress | None = None) -> tuple[Tensor, int]:
        """Per-image bits/dim of the data x in ``space`` (dequantised first when quantised), probed and dequantised
        with each image's seed, and the NFE; each image's value depends only on it and its seed, so it is the same
        in any batch. With ``progress``, every score evaluation is counted into it and the batch is done after.

        ``lit-score test`` (``ScoreModel.test_step``, seed = test-set index) and ``lit-score-eval`` (seed =
        ``bpd_first_seed`` + index) both measure test-set bits/dim with this."""
        if tuple(x.shape[1:]) != space.shape:
            raise ValueError(f"bits/dim of data of shape {tuple(x.shape[1:])} in a data space of shape {space.shape}")
        if progress is not None:
            score_fn = progress.wrap(score_fn, x.shape[0])
        x = space.dequantize(x, seeds)
        result = log_likelihood(score_fn, sde, x, seeds, self.probe, self.rtol, self.atol, self.eps)
        if progress is not None:
            progress.batch_done(x.shape[0], result.nfe)
        return bits_per_dim(result.logp, space.num_dims, space.centered, space.num_levels), result.nfe
