"""Few-step generation on the quickstart data: the EDM quickstart model (experiments/quickstart_edm.yaml, the teacher)
sampled with EDM's Heun sampler at 35 NFE and with 10-NFE solvers, against the same model tuned into a consistency
model by ECT (experiments/quickstart_ect.yaml) sampled in 1 and 2 steps; FID@N with the quickstart's small random
feature network (comparable only within this table), training times, and a picture of the same seeds.

    python -m benchmarks.ect [--teacher CKPT] [--out-dir bench_ect] [--plot docs/ect_vs_teacher.png]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.edm_vs_vp import fid

ROOT = Path(__file__).resolve().parents[1]
TEACHER = {
    "EDM Heun 18 (35 NFE)": {"class_path": "lit_score.sampling.EDMSampler", "init_args": {"steps": 18}},
    "DPM-Solver++ 2M (10 NFE)": {"class_path": "lit_score.sampling.DPMSolverPP", "init_args": {"steps": 10}},
    "UniPC (10 NFE)": {"class_path": "lit_score.sampling.UniPC", "init_args": {"steps": 10}},
    "iPNDM (10 NFE)": {"class_path": "lit_score.sampling.IPNDM", "init_args": {"steps": 10}},
    # one evaluation at sigma 80: the teacher's E[x0 | x], what the tuning starts from
    "one evaluation (1 NFE)": {"class_path": "lit_score.sampling.ConsistencySampler", "init_args": {"steps": 1}},
}
STUDENT = {
    "consistency, 1 step": {"class_path": "lit_score.sampling.ConsistencySampler", "init_args": {"steps": 1}},
    "consistency, 2 steps": {"class_path": "lit_score.sampling.ConsistencySampler", "init_args": {"steps": 2}},
}


def fit(experiment: str, out_dir: Path, *args: str) -> tuple[Path, float]:
    """``lit-score fit`` of an experiment without its sampling callbacks (so the wall time is training's), in
    ``out_dir/runs/<experiment>/run``; reused when its last.ckpt exists."""
    run_dir = out_dir / "runs" / experiment / "run"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return run_dir, json.loads((run_dir / "wall.json").read_text())["seconds"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_score", "fit", "--config", str(ROOT / "experiments" / f"{experiment}.yaml"),
                    "--trainer.logger.init_args.save_dir", str(out_dir / "runs"),
                    "--trainer.logger.init_args.version", "run", "--trainer.enable_progress_bar", "false",
                    "--sample_every", "1000000", "--fid_every", "1000000", *args], check=True, cwd=out_dir,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    (run_dir / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return run_dir, seconds


def grid(rows: dict[str, tuple[Path, dict]], path: Path, n: int = 10) -> None:
    """One row of the first ``n`` seeds per (checkpoint, sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from jsonargparse import ArgumentParser

    from lit_score.runtime.module import ScoreModel
    from lit_score.sampling.base import Sampler

    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.6, len(rows) * 0.85))
    for ax, (name, (ckpt, sampler)) in zip(axes, rows.items()):
        model = ScoreModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
        sampler = parser.instantiate_classes(parser.parse_object({"sampler": sampler})).sampler
        x = ((model.sample(list(range(n)), sampler).samples[:, 0] + 1) / 2).clamp(0, 1)
        ax.imshow(torch.cat(list(x), dim=1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=None, help="a quickstart_edm checkpoint (default: train one)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--out-dir", type=Path, default=Path("bench_ect"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "ect_vs_teacher.png")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher_seconds = None
    if args.teacher is None:
        run_dir, teacher_seconds = fit("quickstart_edm", out)
        args.teacher = run_dir / "checkpoints" / "last.ckpt"
    student_dir, student_seconds = fit("quickstart_ect", out, "--init_weights", str(args.teacher.resolve()))
    student = student_dir / "checkpoints" / "last.ckpt"
    results = {"teacher": {"ckpt": str(args.teacher), "train_seconds": teacher_seconds, "fid": {}},
               "student": {"ckpt": str(student), "train_seconds": student_seconds, "fid": {}}}
    for name, sampler in TEACHER.items():
        results["teacher"]["fid"][name] = fid("quickstart_edm", args.teacher, out, sampler, args.num_samples)
    for name, sampler in STUDENT.items():
        results["student"]["fid"][name] = fid("quickstart_ect", student, out, sampler, args.num_samples)
    ten = {k: v for k, v in results["teacher"]["fid"].items() if "10 NFE" in k}
    best = min(ten, key=ten.get)
    print(f"\nFID@{args.num_samples} (random conv features, 64-d), EMA weights\n")
    print("| model | sampler | NFE | FID | training |\n|---|---|---|---|---|")
    t_time = f"{teacher_seconds:.0f} s" if teacher_seconds else "given"
    print(f"| teacher (quickstart_edm) | EDM Heun 18 | 35 | {results['teacher']['fid']['EDM Heun 18 (35 NFE)']:.4f} "
          f"| {t_time} |")
    for name, value in ten.items():
        print(f"| teacher | {name.split(' (')[0]}{' (best 10-NFE)' if name == best else ''} | 10 | {value:.4f} | |")
    print(f"| teacher | one evaluation at sigma 80 | 1 | {results['teacher']['fid']['one evaluation (1 NFE)']:.4f} | |")
    for steps, name in enumerate(STUDENT, 1):
        print(f"| ECT (quickstart_ect) | {name} | {steps} | {results['student']['fid'][name]:.4f} "
              f"| + {student_seconds:.0f} s |")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = {"teacher, EDM Heun 18 (35 NFE)": (args.teacher, TEACHER["EDM Heun 18 (35 NFE)"]),
            f"teacher, {best}": (args.teacher, TEACHER[best]),
            "ECT, 1 step": (student, STUDENT["consistency, 1 step"]),
            "ECT, 2 steps": (student, STUDENT["consistency, 2 steps"])}
    grid(rows, args.plot)
    print(f"\nplot: {args.plot}; numbers: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
