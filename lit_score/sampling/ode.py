"""The probability-flow ODE (Song et al. 2021, eq. 13) solved by an adaptive Dormand-Prince RK5(4) in torch.

Every sample has its own time and step size, so a sample's trajectory, and its NFE, do not depend on the
other samples of its batch (which is what makes images reproducible from their seeds on any number of processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.sampling.base import SampleResult, Sampler, seeded_prior, time_vector
from lit_score.sdes import SDE, ScoreFn, _bcast

# Dormand & Prince (1980) tableau: nodes C, stages A, 5th-order weights B5, 4th-order weights B4 (FSAL).
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)

VectorField = Callable[[Tensor, Tensor], Tensor]  # f(t (B,), y (B, n)) -> (B, n)


@dataclass
class ODESolution:
    y: Tensor  # (B, n) at t1
    nfe: Tensor  # (B,) evaluations of f per sample


def _rms(v: Tensor) -> Tensor:
    return v.pow(2).mean(1).sqrt()


def _initial_step(f: VectorField, t0: Tensor, y0: Tensor, f0: Tensor, direction: float, span: float,
                  rtol: float, atol: float) -> Tensor:
    """Per-sample starting step (Hairer, Norsett & Wanner, Solving ODEs I, II.4)."""
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30)).clamp(max=span)
    f1 = f(t0 + direction * h0, y0 + direction * h0[:, None] * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / dmax.clamp_min(1e-30)) ** (1 / 5))
    return torch.minimum(100 * h0, h1)


def dopri5(f: VectorField, y0: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
           max_steps: int = 10_000, cond: Tensor | None = None) -> ODESolution:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction), a step size per row of y (B, n).

    The local error of each row, measured as RMS(err / (atol + rtol max(|y|, |y_new|))), is kept <= 1.
    With ``cond`` (B, ...), f is called as f(t, y, cond[rows]) with the rows of the states it is given.
    """
    if y0.dim() != 2:
        raise ValueError(f"dopri5 integrates a batch of flat states (B, n), got shape {tuple(y0.shape)}")
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    B = y0.shape[0]
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    y = y0.clone()
    s = torch.zeros(B, dtype=y.dtype, device=y.device)  # elapsed |t - t0| per row
    nfe = torch.zeros(B, dtype=torch.long, device=y.device)
    if span == 0:
        return ODESolution(y, nfe)

    def t_of(s_: Tensor) -> Tensor:
        return t0 + direction * s_

    if cond is not None:
        g, rows = f, torch.arange(B, device=y.device)
        f = lambda t, y_: g(t, y_, cond[rows])  # noqa: E731
    k1 = f(t_of(s), y)
    h = _initial_step(f, t_of(s), y, k1, direction, span, rtol, atol).clamp(max=span)
    nfe += 2
    active = torch.ones(B, dtype=torch.bool, device=y.device)
    for _ in range(max_steps):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            return ODESolution(y, nfe)
        if cond is not None:
            rows = idx
        ya, sa, k1a = y[idx], s[idx], k1[idx]
        ha = torch.minimum(h[idx], span - sa)
        hs = direction * ha[:, None]
        ks = [k1a]
        for i in range(1, 7):
            yi = ya + hs * sum(a * k for a, k in zip(A[i], ks) if a != 0.0)
            ks.append(f(t_of(sa + C[i] * ha), yi))
        y_new = yi  # stage 7 is evaluated at the 5th-order solution (FSAL)
        err = hs * sum((b5 - b4) * k for b5, b4, k in zip(B5, B4, ks) if b5 != b4)
        scale = atol + rtol * torch.maximum(ya.abs(), y_new.abs())
        err_norm = _rms(err / scale)
        accept = err_norm <= 1.0
        nfe[idx] += 6
        acc = idx[accept]
        y[acc], k1[acc] = y_new[accept], ks[6][accept]
        s[acc] = torch.where(ha[accept] >= span - sa[accept], torch.full_like(ha[accept], span), sa[accept] + ha[accept])
        active[acc] = s[acc] < span
        factor = (0.9 * err_norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 10.0)
        h[idx] = ha * torch.where(accept, factor, factor.clamp(max=1.0))
    raise RuntimeError(f"dopri5 did not reach t1 = {t1} in {max_steps} steps; loosen rtol/atol")


def probability_flow(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...]) -> VectorField:
    """dx/dt = f(x, t) - g(t)^2 / 2 score(x, t) (eq. 13) on flattened states."""
    rsde = sde.reverse(score_fn, probability_flow=True)

    def field(t: Tensor, y: Tensor) -> Tensor:
        return rsde.sde(y.reshape(-1, *shape), t)[0].flatten(1)

    return field


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """E[x_0 | x_t] = (x_t + std(t)^2 score(x_t, t)) / scale(t) (Tweedie's formula)."""
    scale, std = sde.marginal_prob(torch.ones_like(t), t)
    return (x + _bcast(std**2, x) * score_fn(x, t)) / _bcast(scale, x)


class ODESampler(Sampler):
    """Solves the probability-flow ODE from T to eps with adaptive Dormand-Prince (RK45) on the device.

    Args:
        rtol, atol: local error tolerances.
        eps: final time.
        denoise: finish with Tweedie's denoiser at eps (one more evaluation).
    NFE reported: the largest per-image count.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3, denoise: bool = False) -> None:
        if rtol <= 0 or atol <= 0 or eps < 0:
            raise ValueError(f"need rtol > 0, atol > 0, eps >= 0; got {rtol}, {atol}, {eps}")
        self.rtol, self.atol, self.eps, self.denoise = rtol, atol, eps, denoise

    def sample(self, score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu") -> SampleResult:
        x = seeded_prior(sde, seeds, shape, device)
        sol = dopri5(probability_flow(score_fn, sde, shape), x.flatten(1), sde.T, self.eps, self.rtol, self.atol)
        x = sol.y.reshape(x.shape)
        nfe = int(sol.nfe.max())
        if self.denoise:
            x = tweedie_denoise(score_fn, sde, x, time_vector(self.eps, x))
            nfe += 1
        return SampleResult(x, nfe)
