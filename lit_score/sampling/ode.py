"""The probability-flow ODE (Song et al. 2021, eq. 13) solved by an adaptive Dormand-Prince RK5(4) in torch.

Step control ``image`` (default): every sample has its own time and step size, so a sample's trajectory, and its
NFE, do not depend on the other samples of its batch (which is what makes images reproducible from their seeds on
any number of processes). ``batch``: one step for the flattened batch, as the official code's scipy RK45, so the
batch advances together (no image waits for the slowest), but an image then depends on its batch-mates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Denoiser
from lit_score.sampling.base import (SampleResult, Sampler, check_bool, check_choice, check_int, check_real, denoise,
                                     initial_noise, time_vector)
from lit_score.diffusion.sdes import SDE, ScoreFn

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


STEP_CONTROLS = ("image", "batch")


def _step_factor(err_norm: Tensor, rejected: Tensor) -> Tensor:
    """scipy RK45's step update: accepted (err < 1): min(10, 0.9 err^-1/5), at most 1 right after a rejection;
    rejected: max(0.2, 0.9 err^-1/5)."""
    factor = 0.9 * err_norm.clamp_min(1e-30) ** -0.2
    grow = torch.where(err_norm == 0, torch.full_like(factor, 10.0), factor.clamp(max=10.0))
    grow = torch.where(rejected, grow.clamp(max=1.0), grow)
    return torch.where(err_norm < 1.0, grow, factor.clamp(min=0.2))


def _take(cond: Tensor | tuple[Tensor, ...], rows: Tensor) -> Tensor | tuple[Tensor, ...]:
    return tuple(c[rows] for c in cond) if isinstance(cond, tuple) else cond[rows]


def dopri5(f: VectorField, y0: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
           max_steps: int = 10_000, cond: Tensor | tuple[Tensor, ...] | None = None,
           step_control: str = "image") -> ODESolution:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction), a step size per row of y (B, n), or one for
    the whole batch with ``step_control="batch"``.

    The local error of each row (of the whole batch), measured as RMS(err / (atol + rtol max(|y|, |y_new|))), is
    kept < 1, and the step updated, as scipy's RK45, so a row follows scipy's trajectory for that row alone. With
    ``cond`` (B, ...) or a tuple of such, f is called as f(t, y, cond[rows]) (each one's rows) with the rows of the
    states it is given.
    """
    if y0.dim() != 2:
        raise ValueError(f"dopri5 integrates a batch of flat states (B, n), got shape {tuple(y0.shape)}")
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    if step_control not in STEP_CONTROLS:
        raise ValueError(f"step_control must be one of {STEP_CONTROLS}, got {step_control!r}")
    if step_control == "batch":
        g = f if cond is None else (lambda t, y_: f(t, y_, cond))  # noqa: E731
        return _dopri5_batch(g, y0, t0, t1, rtol, atol, max_steps)
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
        f = lambda t, y_: g(t, y_, _take(cond, rows))  # noqa: E731
    k1 = f(t_of(s), y)
    h = _initial_step(f, t_of(s), y, k1, direction, span, rtol, atol).clamp(max=span)
    nfe += 2
    active = torch.ones(B, dtype=torch.bool, device=y.device)
    rejected = torch.zeros(B, dtype=torch.bool, device=y.device)
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
        accept = err_norm < 1.0
        nfe[idx] += 6
        acc = idx[accept]
        y[acc], k1[acc] = y_new[accept], ks[6][accept]
        s[acc] = torch.where(ha[accept] >= span - sa[accept], torch.full_like(ha[accept], span), sa[accept] + ha[accept])
        active[acc] = s[acc] < span
        h[idx] = ha * _step_factor(err_norm, rejected[idx])
        rejected[idx] = ~accept
    raise RuntimeError(f"dopri5 did not reach t1 = {t1} in {max_steps} steps; loosen rtol/atol")


def _dopri5_batch(f: VectorField, y0: Tensor, t0: float, t1: float, rtol: float, atol: float,
                  max_steps: int) -> ODESolution:
    """One adaptive step for the flattened batch, controlled as scipy's RK45 (``_step_factor``) with the error
    norm the RMS over every element. The state stays on the device; the loop reads one flag per step."""
    B = y0.shape[0]
    direction, span = (1.0 if t1 >= t0 else -1.0), abs(t1 - t0)
    y, nfe = y0.clone(), 0
    if span == 0:
        return ODESolution(y, torch.zeros(B, dtype=torch.long, device=y.device))
    s = torch.zeros((), dtype=y.dtype, device=y.device)  # elapsed |t - t0|
    t_of = lambda s_: (t0 + direction * s_).expand(B)  # noqa: E731
    flat = lambda v: v.reshape(1, -1)  # noqa: E731
    k1 = f(t_of(s), y)
    whole = lambda t, v: flat(f(t.expand(B), v.reshape(y.shape)))  # noqa: E731  the batch as one state
    h = _initial_step(whole, t_of(s)[:1], flat(y), flat(k1), direction, span, rtol, atol)[0].clamp(max=span)
    nfe += 2
    rejected = torch.zeros((), dtype=torch.bool, device=y.device)
    for _ in range(max_steps):
        ha = torch.minimum(h, span - s)
        hs = direction * ha
        ks = [k1]
        for i in range(1, 7):
            yi = y + hs * sum(a * k for a, k in zip(A[i], ks) if a != 0.0)
            ks.append(f(t_of(s + C[i] * ha), yi))
        nfe += 6
        err = hs * sum((b5 - b4) * k for b5, b4, k in zip(B5, B4, ks) if b5 != b4)
        err_norm = (err / (atol + rtol * torch.maximum(y.abs(), yi.abs()))).pow(2).mean().sqrt()
        accept = err_norm < 1.0
        h = ha * _step_factor(err_norm, rejected)
        rejected = ~accept
        y, k1 = torch.where(accept, yi, y), torch.where(accept, ks[6], k1)
        s = torch.where(accept, torch.where(ha >= span - s, torch.full_like(s, span), s + ha), s)
        if not bool(s < span):  # the one host read per step: has the batch reached t1?
            return ODESolution(y, torch.full((B,), nfe, dtype=torch.long, device=y.device))
    raise RuntimeError(f"dopri5 did not reach t1 = {t1} in {max_steps} steps; loosen rtol/atol")


def probability_flow(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...]) -> VectorField:
    """dx/dt = f(x, t) - g(t)^2 / 2 score(x, t) (eq. 13) on flattened states."""
    rsde = sde.reverse(score_fn, probability_flow=True)

    def field(t: Tensor, y: Tensor) -> Tensor:
        return rsde.sde(y.reshape(-1, *shape), t)[0].flatten(1)

    return field


class ODESampler(Sampler):
    """Solves the probability-flow ODE from T to eps with adaptive Dormand-Prince (RK45) on the device.

    Args:
        rtol, atol: local error tolerances.
        eps: final time.
        denoise: finish with the denoiser, E[x_0 | x_eps] = D(x_eps / s; sigma(eps)) (one more evaluation).
        step_control: ``image`` (default: a step size per image, so an image depends only on its seed) or
            ``batch`` (one step for the flattened batch, as the official scipy RK45; fewer evaluations for the
            slowest image, but an image depends on its batch-mates).
        max_steps: give up after this many steps.
    NFE reported: the largest per-image count (``nfe``) and the mean (``nfe_mean``); equal under ``batch``.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3, denoise: bool = False,
                 step_control: str = "image", max_steps: int = 10_000) -> None:
        check_real("rtol", rtol, 0, low_open=True)
        check_real("atol", atol, 0, low_open=True)
        check_real("eps", eps, 0)
        check_bool("denoise", denoise)
        check_choice("step_control", step_control, STEP_CONTROLS)
        check_int("max_steps", max_steps, 1)
        self.rtol, self.atol, self.eps, self.denoise = rtol, atol, eps, denoise
        self.step_control, self.max_steps = step_control, max_steps

    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", start_noise: Tensor | None = None) -> SampleResult:
        """From x_T = prior std * z, z the seeds' starting noise (or ``start_noise``), to eps."""
        x = sde.prior_from_noise(initial_noise(seeds, shape, device, start_noise))

        def field(t: Tensor, y: Tensor, rows: Tensor) -> Tensor:  # the images dopri5 steps
            return probability_flow(D.rows(rows).score, sde, shape)(t, y)

        sol = dopri5(field, x.flatten(1), sde.T, self.eps, self.rtol, self.atol, self.max_steps,
                     cond=torch.arange(x.shape[0], device=x.device), step_control=self.step_control)
        x = sol.y.reshape(x.shape)
        nfe, nfe_mean = int(sol.nfe.max()), float(sol.nfe.double().mean())
        if self.denoise:
            x = denoise(D, sde, x, time_vector(self.eps, x))
            nfe, nfe_mean = nfe + 1, nfe_mean + 1
        return SampleResult(x, nfe, nfe_mean)
