"""Sample quality against NFE for every solver on exact-score Gaussian mixtures (VE and VP), and the samplers' own
cost per step beside one evaluation of the quickstart network.

Quality, for 2-D and 8-D mixtures of anisotropic, unequally weighted components (exact scores from
lit_score.diffusion.densities): the energy distance to exact samples of the mixture, and the mode-weight error
max_k |mean_i r_k(x_i) - w_k| (r_k: component responsibilities under p_0, so exact samples give w_k on average);
"null" rows give both statistics for a second exact sample set, the level a perfect sampler reaches.

    python -m benchmarks.samplers [--quick] [--ckpt runs/quickstart/version_0/checkpoints/last.ckpt] [--out samplers.png]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from benchmarks.distances import energy_distance
from benchmarks.report import median_seconds
from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.densities import GaussianMixture
from lit_score.sampling import (IPNDM, AdaptiveSDESampler, DPMSolverPP, DPMSolverPP3M, DPMSolverPPSDE, EDMSampler,
                                EulerSampler, ODESampler, PCSampler, Sampler, SeededNoise, UniPC, seeded_prior)
from lit_score.diffusion.sdes import SDE, VESDE, VPSDE, bcast


@dataclass(frozen=True)
class Solver:
    """A benchmarked sampler: ``make(setting)`` for each setting (steps, or a tolerance for adaptive solvers); the
    NFE is what the sampler reports. ``sdes``: the SDE families it is run on."""

    name: str
    make: Callable[[float], Sampler]
    settings: tuple[float, ...]
    sdes: tuple[str, ...] = ("VE", "VP")


# Every solver of the benchmark: append new ones here.
SOLVERS: list[Solver] = [
    Solver("PC euler_maruyama", lambda n: PCSampler("euler_maruyama", "none", steps=int(n)), (30, 100, 300, 1000)),
    Solver("PC reverse_diffusion", lambda n: PCSampler("reverse_diffusion", "none", steps=int(n)),
           (30, 100, 300, 1000)),
    Solver("PC ancestral", lambda n: PCSampler("ancestral_sampling", "none", steps=int(n)), (30, 100, 300, 1000)),
    Solver("PC rd + langevin", lambda n: PCSampler("reverse_diffusion", "langevin", steps=int(n // 2)),
           (50, 100, 300, 1000)),
    Solver("PC rd + langevin (official)", lambda n: PCSampler("reverse_diffusion", "langevin", steps=int(n // 2),
                                                              step_rule="official"), (50, 100, 300, 1000)),
    Solver("ALD (NCSN)", lambda n: PCSampler("none", "ald", steps=10, n_steps_each=int(n // 10), step_lr=2e-5,
                                             eps=0.0), (100, 300, 1000), sdes=("VE",)),
    Solver("ODE RK45 (rtol = atol)", lambda tol: ODESampler(rtol=tol, atol=tol), (1e-2, 1e-3, 1e-4, 1e-5)),
    Solver("EDM Heun", lambda n: EDMSampler(steps=int(n)), (5, 9, 18, 40)),
    Solver("EDM stochastic", lambda n: EDMSampler(steps=int(n), S_churn=0.5 * n, S_min=0.05, S_max=50.0,
                                                  S_noise=1.003), (9, 18, 40, 80)),
    Solver("DPM-Solver++(2M)", lambda n: DPMSolverPP(steps=int(n)), (5, 10, 20, 40)),
    Solver("DPM-Solver++(3M)", lambda n: DPMSolverPP3M(steps=int(n)), (5, 10, 20, 40)),
    Solver("DPM-Solver++(2M) SDE", lambda n: DPMSolverPPSDE(steps=int(n), order=2), (10, 20, 40, 80)),
    Solver("DPM-Solver++(3M) SDE", lambda n: DPMSolverPPSDE(steps=int(n), order=3), (10, 20, 40, 80)),
    Solver("UniPC bh2 (p = 2)", lambda n: UniPC(steps=int(n)), (5, 10, 20, 40)),
    Solver("UniPC bh1 (p = 3)", lambda n: UniPC(steps=int(n), order=3, variant="bh1"), (5, 10, 20, 40)),
    Solver("iPNDM", lambda n: IPNDM(steps=int(n)), (5, 10, 20, 40)),
    Solver("iPNDM-v", lambda n: IPNDM(steps=int(n), variable=True), (5, 10, 20, 40)),
    Solver("Euler (sigma view)", lambda n: EulerSampler(steps=int(n)), (10, 20, 40, 80)),
    Solver("Adaptive SDE (GGF, per image)", lambda tol: AdaptiveSDESampler(reltol=tol), (0.2, 0.05, 0.01)),
    Solver("Adaptive SDE (GGF, batch)", lambda tol: AdaptiveSDESampler(reltol=tol, step_control="batch"),
           (0.2, 0.05, 0.01)),
]


def mixtures() -> dict[str, GaussianMixture]:
    """2-D: five components with unequal weights and axis ratios up to 4; 8-D: four components, stds per axis
    between 0.15 and 1.2."""
    g = torch.Generator().manual_seed(0)
    two = GaussianMixture([0.10, 0.15, 0.18, 0.22, 0.35],
                          [[-3.0, -2.0], [-2.0, 2.5], [0.5, 0.0], [3.0, 2.0], [2.5, -2.5]],
                          [[0.2, 0.8], [0.6, 0.15], [0.3, 0.3], [1.0, 0.25], [0.4, 0.7]])
    eight = GaussianMixture([0.1, 0.2, 0.3, 0.4], 2.0 * torch.randn(4, 8, generator=g),
                            0.15 + 1.05 * torch.rand(4, 8, generator=g))
    return {"2-D 5 modes": two, "8-D 4 modes": eight}


def sdes() -> dict[str, SDE]:
    return {"VE": VESDE(0.01, 50.0), "VP": VPSDE(0.1, 20.0)}


def mode_weight_error(mix: GaussianMixture, x: Tensor) -> float:
    """max_k |mean_i r_k(x_i) - w_k|, r_k the responsibilities of the components at x under p_0."""
    r = torch.softmax(mix._component_logp(x, None, None)[0], dim=1)
    return float((r.mean(0) - mix.weights).abs().max())


def run_mixtures(n: int, quick: bool = False) -> list[dict]:
    rows = []
    for sde_name, sde in sdes().items():
        for mix_name, mix in mixtures().items():
            ref = mix.sample(n, torch.Generator().manual_seed(1))
            null = mix.sample(n, torch.Generator().manual_seed(2))
            rows.append({"sde": sde_name, "data": mix_name, "sampler": "null (exact samples)", "setting": 0,
                         "nfe": 0, "energy_distance": energy_distance(null, ref),
                         "mode_error": mode_weight_error(mix, null), "seconds": 0.0})
            for solver in SOLVERS:
                if sde_name not in solver.sdes:
                    continue
                for setting in solver.settings[:1] if quick else solver.settings:
                    start = time.perf_counter()
                    result = solver.make(setting).sample(mix.denoiser(sde), sde, (mix.dim,), range(n))
                    rows.append({"sde": sde_name, "data": mix_name, "sampler": solver.name, "setting": setting,
                                 "nfe": result.nfe, "energy_distance": energy_distance(result.samples, ref),
                                 "mode_error": mode_weight_error(mix, result.samples),
                                 "seconds": time.perf_counter() - start})
    return rows


def quickstart_net() -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The quickstart DDPM++ (experiments/quickstart.yaml's model.net), random weights; and its data shape."""
    import yaml

    from lit_score.networks import DDPMpp

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml").read_text())
    size = cfg["data"]["init_args"]["image_size"]
    return DDPMpp(num_channels=1, image_size=size, **cfg["model"]["net"]["init_args"]).eval(), (1, size, size)


class FreeDenoiser(Denoiser):
    """The model of data N(0, I), at next to no cost: D(x_hat; sigma) = x_hat / (1 + sigma^2), and the score -x (its
    score under VP at every t)."""

    def __init__(self, sde: SDE) -> None:
        self.sde = sde

    def __call__(self, x_hat, sigma, cond=None):
        return x_hat / bcast(1 + sigma**2, x_hat)

    def score(self, x, t, cond=None):
        return -x


@torch.no_grad()
def step_costs(batch: int, reps: int, quick: bool = False) -> dict:
    """Seconds of one quickstart network evaluation, one seeded noise draw, a torch.randn of the same size and the
    prior, at ``batch`` images; and each solver's own seconds per NFE (its arithmetic and noise, with a model
    that costs nothing)."""
    from lit_score.diffusion.denoiser import NetworkDenoiser
    from lit_score.diffusion.losses import DSMLoss

    torch.manual_seed(0)
    net, shape = quickstart_net()
    sde = VPSDE(0.1, 20.0)
    D = NetworkDenoiser(net, DSMLoss().default_precond(sde), sde)  # the quickstart model's (DSMLoss) denoiser
    x, t = torch.randn(batch, *shape), torch.full((batch,), 0.5)
    noise = SeededNoise(range(batch), shape)
    costs = {"batch": batch, "network": median_seconds(lambda: D.score(x, t), reps),
             "noise": median_seconds(noise, 10 * reps), "randn": median_seconds(lambda: torch.randn(x.shape), 10 * reps),
             "prior": median_seconds(lambda: seeded_prior(sde, range(batch), shape), 10 * reps), "solvers": []}
    for solver in SOLVERS:
        setting = solver.settings[0 if quick else min(1, len(solver.settings) - 1)]
        sde_s = VESDE(0.01, 50.0) if "VP" not in solver.sdes else sde
        nfe = []

        def run() -> None:
            nfe.append(solver.make(setting).sample(FreeDenoiser(sde_s), sde_s, shape, range(batch)).nfe)

        seconds = median_seconds(run, 1 if quick else 3)
        costs["solvers"].append({"sampler": solver.name, "setting": setting, "nfe": nfe[-1],
                                 "s_per_nfe": seconds / nfe[-1]})
    return costs


def run_checkpoint(path: str, n: int = 64) -> list[dict]:
    """The quickstart model (EMA weights): energy distance between n samples and n digits, and the fraction of
    noise images (mean squared pixel difference to the neighbours above 1.5 x the data's 99th percentile)."""
    from lit_score.data.digits import load_digits_images
    from lit_score.runtime.module import ScoreModel

    model = ScoreModel.load_from_checkpoint(path, map_location="cpu").eval()  # samples with its EMA network
    data = load_digits_images(model.data_shape[-1]) * 2 - 1
    threshold = 1.5 * float(roughness(data).quantile(0.99))
    rows = []
    for solver in SOLVERS:
        if "VP" not in solver.sdes:
            continue
        for setting in solver.settings[:2]:
            start = time.perf_counter()
            result = model.sample(list(range(n)), solver.make(setting))
            x = result.samples.clamp(-1, 1)
            rows.append({"sde": type(model.sde).__name__, "data": "quickstart digits", "sampler": solver.name,
                         "setting": setting, "nfe": result.nfe, "energy_distance": energy_distance(x, data[:n]),
                         "mode_error": float((roughness(x) > threshold).float().mean()),
                         "seconds": time.perf_counter() - start})
    return rows


def roughness(x: Tensor) -> Tensor:
    """Per-image mean squared difference between vertically and horizontally adjacent pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1) + (x[..., 1:] - x[..., :-1]).pow(2).flatten(1).mean(1)


def table(rows: list[dict], last: str = "mode-w err") -> str:
    head = f"| {'sde':3} | {'data':17} | {'sampler':22} | {'setting':>7} | {'NFE':>5} | {'energy dist':>11} | {last:>10} | {'sec':>6} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r['sde'][:3]:3} | {r['data']:17} | {r['sampler']:22} | {r['setting']:>7g} | {r['nfe']:>5d} | "
                     f"{r['energy_distance']:>11.4f} | {r['mode_error']:>10.4f} | {r['seconds']:>6.2f} |")
    return "\n".join(lines)


def cost_table(c: dict) -> str:
    net = c["network"]
    lines = [f"quickstart DDPM++ at batch {c['batch']}: one network evaluation {net * 1e3:.2f} ms; "
             f"one seeded noise draw {c['noise'] * 1e3:.3f} ms ({100 * c['noise'] / net:.2f}% of it); "
             f"torch.randn {c['randn'] * 1e3:.3f} ms; seeded prior {c['prior'] * 1e3:.3f} ms",
             f"| {'sampler':22} | {'setting':>7} | {'NFE':>5} | {'own ms / NFE':>12} | {'% of network':>12} |",
             f"|{'-' * 24}|{'-' * 9}|{'-' * 7}|{'-' * 14}|{'-' * 14}|"]
    for s in c["solvers"]:
        lines.append(f"| {s['sampler']:22} | {s['setting']:>7g} | {s['nfe']:>5d} | {s['s_per_nfe'] * 1e3:>12.3f} | "
                     f"{100 * s['s_per_nfe'] / net:>11.2f}% |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["sde"], r["data"]) for r in rows if r["data"] != "quickstart digits"})
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    for j, (sde_name, data) in enumerate(panels):
        here = [r for r in rows if r["sde"] == sde_name and r["data"] == data]
        null = [r for r in here if r["nfe"] == 0]
        for i, key in enumerate(("energy_distance", "mode_error")):
            ax = axes[i][j]
            for solver in SOLVERS:
                pts = sorted((r["nfe"], r[key]) for r in here if r["sampler"] == solver.name)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=solver.name)
            if null:
                ax.axhline(null[0][key], color="k", ls=":", label="null")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(f"{sde_name}, {data}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a quickstart checkpoint to benchmark too")
    parser.add_argument("--out", default="samplers.png", help="where to save the plot ('' for none)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--cost-batch", type=int, default=256, help="images per step for the cost measurement")
    parser.add_argument("--quick", action="store_true", help="few samples, one setting per solver: a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and kind to a shared machine
    n = 200 if args.quick else args.num_samples
    rows = run_mixtures(n, args.quick)
    print(f"{n} samples per run; energy distance to {n} exact samples")
    print(table(rows))
    if args.ckpt:
        ckpt_rows = run_checkpoint(args.ckpt)
        print("\nquickstart checkpoint (last column: fraction of noise images)")
        print(table(ckpt_rows, last="noise frac"))
    print()
    print(cost_table(step_costs(16 if args.quick else args.cost_batch, 2 if args.quick else 7, args.quick)))
    if args.out:
        plot(rows, args.out)
        print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
