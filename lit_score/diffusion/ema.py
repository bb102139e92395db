"""The numerics of weight averages. The EMA callback's decays: score_sde's warm-up and EDM's half-life.

Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models",
section 3 and appendix C): power-function EMA profiles tracked during training and snapshotted, and the EMA of any
other length reconstructed afterwards as the least-squares combination of the snapshots.

The power-function EMA of exponent gamma at time t averages the weights theta(tau) with the density
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its relative standard deviation is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 123). Tracked per optimizer step n with
beta_n = (1 - 1/n)^(gamma + 1) (eq. 127), the average after n steps weighs step k by exactly
(k^(gamma+1) - (k-1)^(gamma+1)) / n^(gamma+1): the continuous profile of the piecewise-constant trajectory, so the
reconstruction's only error is the least-squares fit of one profile by others.

    lit-score posthoc-ema RUN_DIR --sigma-rel 0.07 --out ema_0.070.ckpt
    lit-score posthoc-ema RUN_DIR --sweep 0.03 0.05 0.07 0.1 0.15 --eval-config experiments/eval/edm_heun35.yaml
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

SNAPSHOT_DIR = "posthoc_ema"
SNAPSHOT_RE = re.compile(r"phema-(\d+)-(\d+\.\d+)\.pt$")
CHECKPOINT_KEY = "posthoc_ema_state"  # the profiles in a Lightning checkpoint
RESULT_KEY = "posthoc_ema"  # what a reconstructed checkpoint records


def warmup_decay(rate: float, num_updates: int) -> float:
    """Official score_sde decay of update n (1-based): min(rate, (1 + n) / (10 + n))."""
    return min(rate, (1 + num_updates) / (10 + num_updates))


def halflife_decay(batch_images: int, halflife_kimg: float, seen_images: int, rampup_ratio: float | None) -> float:
    """EDM decay: 0.5 ** (batch / half-life), the half-life in images capped at rampup_ratio * images seen so far."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, seen_images * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2 = 0 (Karras et al. 2024, eq. 126, Algorithm 2)."""
    if not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must lie in (0, 0.2887) (gamma > 0), got {sigma_rel}")
    s2 = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 123)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_ema_beta(gamma: float, n: int) -> float:
    """The decay of update n >= 1: (1 - 1/n)^(gamma + 1) (eq. 127 with unit steps)."""
    return (1.0 - 1.0 / n) ** (gamma + 1.0)


def profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """int p_a p_b dtau for power-function profiles (times t, exponents g), every pair of a and b:
    (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))."""
    ta, ga = np.asarray(t_a, np.float64)[:, None], np.asarray(g_a, np.float64)[:, None]
    tb, gb = np.asarray(t_b, np.float64)[None, :], np.asarray(g_b, np.float64)[None, :]
    lo = np.minimum(ta, tb)
    log = (ga + gb + 1) * np.log(lo) - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(log)


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], t_target: float,
                       gamma_target: float) -> np.ndarray:
    """x minimising || sum_i x_i p_i - p_target ||_2 over the snapshots' profiles p_i (normal equations,
    Karras et al. 2024, Algorithm 3), rescaled to sum to 1 so a constant trajectory is kept."""
    A = profile_inner_products(times, gammas, times, gammas)
    b = profile_inner_products(times, gammas, [t_target], [gamma_target])[:, 0]
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


class PowerEMA:
    """Power-function EMAs of a state dict, one per sigma_rel, updated once per optimizer step.

    Floating-point entries are averaged; the others (step counters, integer buffers) are copied.
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10)) -> None:
        if not sigma_rels:
            raise ValueError("post-hoc EMA needs at least one sigma_rel")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.num_updates = 0
        self.shadows: list[dict[str, Tensor]] | None = None

    @torch.no_grad()
    def update(self, state: dict[str, Tensor]) -> None:
        n = self.num_updates + 1
        if self.shadows is None:
            self.shadows = [{k: v.detach().clone() for k, v in state.items()} for _ in self.sigma_rels]
        for gamma, shadow in zip(self.gammas, self.shadows):
            floats = [(shadow[k], v) for k, v in state.items() if shadow[k].is_floating_point()]
            if floats:
                torch._foreach_lerp_([s for s, _ in floats], [v.to(s.dtype) for s, v in floats],
                                     1.0 - power_ema_beta(gamma, n))
            for k, v in state.items():
                if not shadow[k].is_floating_point():
                    shadow[k].copy_(v)
        self.num_updates = n


@dataclass
class Snapshot:
    path: Path
    step: int
    sigma_rel: float


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"phema-{step:09d}-{sigma_rel:.6f}.pt"


def save_snapshot(directory: Path, step: int, sigma_rel: float, state: dict[str, Tensor]) -> Path:
    """Write one profile's average after ``step`` updates to ``directory`` (atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / snapshot_name(step, sigma_rel)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": int(step), "sigma_rel": float(sigma_rel), "gamma": sigma_rel_to_gamma(sigma_rel),
                "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}, tmp)
    tmp.replace(path)
    return path


def find_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots in a run directory (or its ``posthoc_ema/``), ordered by step and sigma_rel."""
    directory = Path(directory)
    if (directory / SNAPSHOT_DIR).is_dir():
        directory = directory / SNAPSHOT_DIR
    found = []
    for path in directory.glob("phema-*.pt"):
        match = SNAPSHOT_RE.search(path.name)
        if match:
            found.append(Snapshot(path, int(match.group(1)), float(match.group(2))))
    if not found:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (phema-*.pt) in {directory}; train with the "
                                "lit_score.callbacks.PostHocEMA callback")
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot's) from the snapshots up to it, and
    what was combined (snapshot files, coefficients, the fit's relative residual)."""
    step = max(s.step for s in snapshots) if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used:
        raise ValueError(f"no snapshot at or before step {step}; the first is at step {snapshots[0].step}")
    times, gammas = [s.step for s in used], [sigma_rel_to_gamma(s.sigma_rel) for s in used]
    gamma = sigma_rel_to_gamma(sigma_rel)
    x = solve_coefficients(times, gammas, step, gamma)
    A = profile_inner_products(times, gammas, times, gammas)
    b = profile_inner_products(times, gammas, [step], [gamma])[:, 0]
    target = profile_inner_products([step], [gamma], [step], [gamma])[0, 0]
    residual = float(np.sqrt(max(x @ A @ x - 2 * x @ b + target, 0.0) / target))
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for snap, coef in zip(used, x):
        state = torch.load(snap.path, map_location="cpu", weights_only=True)["state_dict"]
        for k, v in state.items():
            if not v.is_floating_point():
                total[k], dtypes[k] = v.clone(), v.dtype
                continue
            dtypes[k] = v.dtype
            total[k] = total.get(k, torch.zeros(v.shape, dtype=torch.float64)) + float(coef) * v.double()
    state = {k: v.to(dtypes[k]) for k, v in total.items()}
    info = {"sigma_rel": float(sigma_rel), "gamma": gamma, "step": step, "relative_residual": residual,
            "snapshots": [s.path.name for s in used], "coefficients": [float(c) for c in x]}
    return state, info
