"""Network evaluations of the probability-flow ODE solver, per-image vs shared step, against the official solver.

The official score_sde code solves the probability-flow ODE with scipy's ``solve_ivp(method="RK45")`` on the flattened
batch; here the same scipy call and our ``dopri5`` (``step_control`` "image" and "batch") solve the same problem, in
float64 at equal rtol / atol, with the exact score of a Gaussian mixture (no network, so the NFE is the solver's alone).

    python -m benchmarks.ode_nfe [--dim 64 --batch 64 --tol 1e-5]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.integrate
import torch

from lit_score.diffusion.densities import GaussianMixture
from lit_score.rng import seeded_prior
from lit_score.sampling.ode import dopri5, probability_flow
from lit_score.diffusion.sdes import SDE, VESDE, VPSDE


def mixture(dim: int, components: int = 4, seed: int = 0) -> GaussianMixture:
    """Well-separated components with unequal weights and widths (a multi-modal exact score)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.arange(1, components + 1.0), means, 0.05 + 0.2 * torch.rand(components, generator=g))


def scipy_rk45_nfe(field, y0: torch.Tensor, t0: float, t1: float, rtol: float, atol: float) -> tuple[int, torch.Tensor]:
    """NFE (solution.nfev) and the end state of scipy's RK45 on the flattened batch, as score_sde's ODE sampler."""
    shape = y0.shape

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        vec_t = torch.full((shape[0],), t, dtype=torch.float64)
        return field(vec_t, torch.from_numpy(y).reshape(shape)).reshape(-1).numpy()

    sol = scipy.integrate.solve_ivp(fun, (t0, t1), y0.reshape(-1).numpy(), rtol=rtol, atol=atol, method="RK45")
    return int(sol.nfev), torch.from_numpy(sol.y[:, -1]).reshape(shape)


def ode_nfe(sde: SDE, dim: int = 64, batch: int = 64, tol: float = 1e-5, eps: float = 1e-3) -> dict[str, float]:
    """NFE of scipy RK45 (official), of dopri5 with a shared step (max = mean) and per image (max and mean), and the
    largest end-state difference of each from scipy's."""
    mix = mixture(dim)
    field = probability_flow(mix.score_fn(sde), sde, (dim,))
    y0 = seeded_prior(sde, range(batch), (dim,)).double()
    official, y_ref = scipy_rk45_nfe(field, y0, sde.T, eps, tol, tol)
    shared = dopri5(field, y0, sde.T, eps, tol, tol, step_control="batch")
    image = dopri5(field, y0, sde.T, eps, tol, tol, step_control="image")
    scale = float(y_ref.abs().max())
    return {"official": official, "shared": int(shared.nfe.max()), "image_max": int(image.nfe.max()),
            "image_mean": float(image.nfe.double().mean()), "shared_vs_official": int(shared.nfe.max()) / official,
            "image_max_vs_official": int(image.nfe.max()) / official,
            "shared_dev": float((shared.y - y_ref).abs().max()) / scale,
            "image_dev": float((image.y - y_ref).abs().max()) / scale}


def ode_rows(dim: int = 64, batch: int = 64, tol: float = 1e-5) -> list[dict]:
    rows = []
    for name, sde in (("VP", VPSDE()), ("VE", VESDE(0.01, 50.0))):
        rows.append({"sde": name, "dim": dim, "batch": batch, "tol": tol, **ode_nfe(sde, dim, batch, tol,
                                                                                  1e-3 if name == "VP" else 1e-5)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args(argv)
    print("| SDE | official RK45 NFE | shared step NFE (x official) | per-image max NFE (x official) | per-image mean |")
    print("|---|---|---|---|---|")
    for r in ode_rows(a.dim, a.batch, a.tol):
        print(f"| {r['sde']} | {r['official']} | {r['shared']} ({r['shared_vs_official']:.3f}) | {r['image_max']} "
              f"({r['image_max_vs_official']:.3f}) | {r['image_mean']:.1f} |")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
