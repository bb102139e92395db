"""Side by side on the quickstart data: the continuous VP SDE objective (experiments/quickstart.yaml) against EDM's
(experiments/quickstart_edm.yaml), same network, data, steps and EMA, each trained once with the post-hoc EMA
profiles; FID@N with the quickstart's small random feature network (comparable only within this table) for a few
samplers per model, the spread between two seed ranges, and the post-hoc EMA sweep of each with its best sampler.

    python -m benchmarks.edm_vs_vp [--steps 1500] [--num-samples 500] [--out-dir bench_edm_vs_vp] [--plot docs/edm_vs_vp.png]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"VP DSM": "quickstart", "EDM": "quickstart_edm"}
SAMPLERS = {
    "EDM Heun 18 (35 NFE)": {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 18}},
    "EDM stochastic 18, churn 40 (35 NFE)": {
        "class_path": "lit_score.sampling.EDMSampler",
        "init_args": {"steps": 18, "S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}},
}
SIGMA_RELS = (0.03, 0.05, 0.07, 0.10, 0.15)


def train(experiment: str, out_dir: Path, steps: int, every: int) -> tuple[Path, float]:
    """``lit-score fit`` of the experiment with only checkpointing, its EMA and PostHocEMA (no sampling callbacks,
    so the wall time is training's); returns the run directory and the seconds it took."""
    config = {
        "defaults": [str(ROOT / "experiments" / f"{experiment}.yaml")],
        "trainer": {
            "max_steps": steps, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"init_args": {"save_dir": str(out_dir / "runs"), "name": experiment, "version": "run"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "lit_score.callbacks.EMA", "init_args": {"rate": 0.999}},
                {"class_path": "lit_score.callbacks.PostHocEMA", "init_args": {"sigma_rels": [0.05, 0.10], "every_n_steps": every}},
            ],
        },
    }
    path = out_dir / f"{experiment}_bench.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = out_dir / "runs" / experiment / "run"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return run_dir, json.loads((run_dir / "wall.json").read_text())["seconds"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_score.cli.lightning_cli", "fit", "--config", str(path)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    (run_dir / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return run_dir, seconds


def _key(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def eval_args(out_dir: Path, sampler: dict, num_samples: int, first_seed: int = 0) -> list[str]:
    evaluation = {"evaluation": {
        "num_samples": num_samples, "first_seed": first_seed, "batch_size": 250, "shard_size": 250,
        "sampler": sampler, "inception_score": False, "kid": False, "bpd": False, "tensorboard": False,
        "features": {"class_path": "lit_score.metrics.RandomConvFeatures", "init_args": {"num_features": 64}}}}
    path = out_dir / f"eval_{_key(sampler, num_samples, first_seed)}.yaml"
    path.write_text(yaml.safe_dump(evaluation))
    return ["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def fid(experiment: str, ckpt: Path, out_dir: Path, sampler: dict, num_samples: int, first_seed: int = 0) -> float:
    from lit_score.evaluate.cli import run

    args = ["--config", str(ROOT / "experiments" / f"{experiment}.yaml")] + eval_args(
        out_dir, sampler, num_samples, first_seed) + ["--ckpt_path", str(ckpt), "--evaluation.out_dir",
                                                      str(out_dir / f"eval_{_key(str(ckpt), sampler, num_samples, first_seed)}")]
    return float(run(args)["fid"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(SAMPLERS)
    width = 0.38
    for j, (model, r) in enumerate(results.items()):
        a.bar([i + (j - 0.5) * width for i in range(len(names))], [r["samplers"][n] for n in names], width,
              label=model)
    a.set_xticks(range(len(names)), [n.split(" (")[0].replace(", ", "\n") for n in names], fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("FID@N (random conv features)")
    a.set_title("EMA 0.999, 1500 steps")
    a.legend()
    for model, r in results.items():
        xs = sorted(float(s) for s in r["sweep"])
        b.plot(xs, [r["sweep"][f"{s:.3f}"] for s in xs], "o-", label=f"{model} ({r['best'].split(' (')[0]})")
    b.set_xscale("log")
    b.set_xlabel("post-hoc EMA sigma_rel")
    b.set_ylabel("FID@N")
    b.set_title("post-hoc EMA sweep, best sampler")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--snapshot-every", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--out-dir", type=Path, default=Path("bench_edm_vs_vp"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "edm_vs_vp.png")
    args = parser.parse_args(argv)
    from lit_score.cli.tools import write_checkpoint
    from lit_score.diffusion.ema import find_snapshots, reconstruct

    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for model, experiment in MODELS.items():
        run_dir, seconds = train(experiment, args.out_dir, args.steps, args.snapshot_every)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        scores = {name: fid(experiment, ckpt, args.out_dir, s, args.num_samples) for name, s in SAMPLERS.items()}
        best = min(scores, key=scores.get)
        other_seeds = fid(experiment, ckpt, args.out_dir, SAMPLERS[best], args.num_samples, first_seed=10**6)
        snapshots = find_snapshots(run_dir)
        sweep = {}
        for sigma_rel in SIGMA_RELS:
            state, info = reconstruct(snapshots, sigma_rel)
            out = write_checkpoint(run_dir, state, info, args.out_dir / f"{experiment}_ema_{sigma_rel:.3f}.ckpt")
            sweep[f"{sigma_rel:.3f}"] = fid(experiment, out, args.out_dir, SAMPLERS[best], args.num_samples)
        results[model] = {"experiment": experiment, "train_seconds": seconds, "samplers": scores, "best": best,
                          "best_other_seeds": other_seeds, "sweep": sweep}
    print(f"\nFID@{args.num_samples} (random conv features, 64-d), {args.steps} steps, EMA 0.999 weights\n")
    print("| model | train s | " + " | ".join(SAMPLERS) + " | best, seeds 10^6.. |")
    print("|---|---|" + "---|" * (len(SAMPLERS) + 1))
    for model, r in results.items():
        print(f"| {model} | {r['train_seconds']:.0f} | " + " | ".join(f"{r['samplers'][n]:.4f}" for n in SAMPLERS)
              + f" | {r['best_other_seeds']:.4f} |")
    print(f"\nPost-hoc EMA sweep (each model's best sampler), FID@{args.num_samples}\n")
    print("| model | " + " | ".join(f"sigma_rel {s}" for s in SIGMA_RELS) + " |")
    print("|---|" + "---|" * len(SIGMA_RELS))
    for model, r in results.items():
        print(f"| {model} ({r['best'].split(' (')[0]}) | " + " | ".join(f"{r['sweep'][f'{s:.3f}']:.4f}" for s in SIGMA_RELS) + " |")
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    print(f"\nplot: {args.plot}; numbers: {args.out_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
