"""Sample quality against NFE for every sampler, on exact-score Gaussian mixtures (VE and VP SDEs), and on a
quickstart checkpoint if one is given. Quality: energy distance to samples of the true mixture (for the checkpoint,
to the digits data), averaged over the mixtures; lower is better.

    python -m benchmarks.samplers [--ckpt runs/quickstart/version_0/checkpoints/last.ckpt] [--out samplers.png]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from lit_score.mixtures import GaussianMixture, energy_distance
from lit_score.sampling import DPMSolverPP, EDMSampler, ODESampler, PCSampler, Sampler
from lit_score.sdes import SDE, VESDE, VPSDE

SAMPLER_GRID: dict[str, tuple[Callable[[float], Sampler], list[float]]] = {
    "PC euler_maruyama": (lambda n: PCSampler("euler_maruyama", "none", steps=int(n)), [10, 30, 100, 300]),
    "PC reverse_diffusion": (lambda n: PCSampler("reverse_diffusion", "none", steps=int(n)), [30, 100, 300]),
    "PC ancestral": (lambda n: PCSampler("ancestral_sampling", "none", steps=int(n)), [30, 100, 300]),
    "PC rd + langevin": (lambda n: PCSampler("reverse_diffusion", "langevin", steps=int(n // 2)), [20, 60, 200]),
    "ALD (NCSN)": (lambda n: PCSampler("none", "ald", steps=10, n_steps_each=int(n // 10), step_lr=2e-5, eps=0.0),
                   [100, 300, 1000]),
    "ODE RK45": (lambda tol: ODESampler(rtol=tol, atol=tol), [1e-1, 1e-2, 1e-3, 1e-5]),
    "EDM Heun (karras)": (lambda n: EDMSampler(steps=int(n)), [3, 5, 9, 18]),
    "EDM stochastic": (lambda n: EDMSampler(steps=int(n), S_churn=0.5 * n, S_min=0.05, S_max=50.0,
                                            S_noise=1.003), [5, 9, 18, 40]),
    "DPM-Solver++(2M)": (lambda n: DPMSolverPP(steps=int(n)), [5, 10, 20, 40]),
}

MIXTURES = {
    "2-D two Gaussians": GaussianMixture([0.3, 0.7], [[-2.0, -1.0], [2.0, 1.5]], [0.5, 0.8]),
    "16-D two Gaussians": GaussianMixture([0.3, 0.7], torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),
                                          [0.5, 0.8]),
}


def sdes() -> dict[str, SDE]:
    """VE needs N = 10 discrete levels for ALD on the NCSN noise scales; the other samplers ignore N."""
    return {"VE": VESDE(0.01, 50.0, N=10), "VP": VPSDE(N=1000)}


def run_mixtures(n: int = 1000) -> list[dict]:
    rows = []
    for sde_name, sde in sdes().items():
        for mix_name, mix in MIXTURES.items():
            ref = mix.sample(n, torch.Generator().manual_seed(1))
            shape = (mix.dim,)
            for sampler_name, (make, settings) in SAMPLER_GRID.items():
                if sampler_name == "ALD (NCSN)" and sde_name != "VE":
                    continue
                if sampler_name == "PC rd + langevin" and mix.dim < 16:
                    continue  # the snr step rule needs |score| to concentrate (high dimension)
                for setting in settings:
                    start = time.perf_counter()
                    result = make(setting).sample(mix.score_fn(sde), sde, shape, range(n))
                    rows.append({"sde": sde_name, "data": mix_name, "sampler": sampler_name, "setting": setting,
                                 "nfe": result.nfe, "energy_distance": energy_distance(result.samples, ref),
                                 "seconds": time.perf_counter() - start})
    return rows


def run_checkpoint(path: str, n: int = 64) -> list[dict]:
    """The quickstart model: energy distance between n samples and n digits of its data space."""
    from data_modules.digits import load_digits_images
    from lit_score.module import ScoreModel

    model = ScoreModel.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    model.eval()
    size = model.data_shape[-1]
    data = load_digits_images(size)[:n]
    if getattr(model.net, "centered", True):
        data = data * 2 - 1
    rows = []
    for sampler_name, (make, settings) in SAMPLER_GRID.items():
        if sampler_name == "ALD (NCSN)":
            continue
        for setting in settings[:2]:
            start = time.perf_counter()
            result = model.sample(list(range(n)), make(setting))
            rows.append({"sde": type(model.sde).__name__, "data": "quickstart digits", "sampler": sampler_name,
                         "setting": setting, "nfe": result.nfe,
                         "energy_distance": energy_distance(result.samples, data),
                         "seconds": time.perf_counter() - start})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'sde':5} {'data':20} {'sampler':22} {'setting':>8} {'NFE':>6} {'energy dist':>12} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['sde']:5} {r['data']:20} {r['sampler']:22} {r['setting']:>8g} {r['nfe']:>6d} "
                     f"{r['energy_distance']:>12.4f} {r['seconds']:>6.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["sde"], r["data"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (sde_name, data) in zip(axes[0], panels):
        for sampler_name in SAMPLER_GRID:
            pts = sorted((r["nfe"], r["energy_distance"]) for r in rows
                         if r["sde"] == sde_name and r["data"] == data and r["sampler"] == sampler_name)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=sampler_name)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("NFE")
        ax.set_ylabel("energy distance (lower is better)")
        ax.set_title(f"{sde_name}, {data}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a quickstart checkpoint to benchmark too")
    parser.add_argument("--out", default="samplers.png", help="where to save the plot")
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and kind to a shared machine
    rows = run_mixtures(args.num_samples)
    if args.ckpt:
        rows += run_checkpoint(args.ckpt)
    print(table(rows))
    plot(rows, args.out)
    print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
