"""One evaluation of the quickstart network while another process keeps one core busy: torch's defaults (all
cores, OpenMP's default waiting) against lit-score's (``lit_score.cli.threads``: the CPUs the process may use, passive
waiting), and one thread.

Each setting runs in a fresh process, since OpenMP reads its wait policy when torch loads.

    python -m benchmarks.threads [--batch 32 --reps 7]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _busy(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    while True:
        pass


def quickstart_net():
    """The quickstart experiment's network (experiments/quickstart.yaml), random weights."""
    import yaml

    from lit_score.networks import DDPMpp

    cfg = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    data = cfg["data"]["init_args"]
    return DDPMpp(num_channels=1, image_size=data["image_size"], centered=data["centered"],
                  **cfg["model"]["net"]["init_args"]).eval()


def _child(batch: int, reps: int, threads: str) -> dict:
    if "torch" in sys.modules:
        raise RuntimeError("the child must measure a fresh process: torch is already imported")
    if threads == "lit-score":
        import lit_score  # noqa: F401  sets the passive wait policy before torch loads
        from lit_score.cli.threads import configure_threads

        configure_threads()
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "(default)")  # what OpenMP read as torch loaded
    if threads not in ("lit-score", "torch"):
        torch.set_num_threads(int(threads))
    net = quickstart_net()
    x, t = torch.randn(batch, 1, 16, 16), torch.rand(batch)
    seconds = []
    with torch.no_grad():
        net(x, t)
        for _ in range(reps):
            t0 = time.perf_counter()
            net(x, t)
            seconds.append(time.perf_counter() - t0)
    return {"threads": torch.get_num_threads(), "wait_policy": policy,
            "ms_median": 1e3 * statistics.median(seconds), "ms_min": 1e3 * min(seconds)}


SETTINGS = {"torch default (all CPUs, default OpenMP wait)": "torch", "lit-score default": "lit-score",
            "1 thread, default OpenMP wait": "1"}


def measure(batch: int = 32, reps: int = 7, busy: bool = True) -> list[dict]:
    """Each setting in a fresh process, while (if ``busy``) a busy loop holds the last CPU of the affinity mask."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
    hog = mp.get_context("spawn").Process(target=_busy, args=(cpus[-1],), daemon=True) if busy else None
    if hog is not None:
        hog.start()
    rows = []
    try:
        for name, threads in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                                    "MKL_NUM_THREADS")}
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            out = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--child", threads, "--batch",
                                  str(batch), "--reps", str(reps)], env=env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=600, check=True)
            rows.append({"setting": name, "busy_core": busy, **json.loads(out.stdout.strip().splitlines()[-1])})
    finally:
        if hog is not None:
            hog.terminate()
            hog.join()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setting | threads | OMP_WAIT_POLICY | ms per evaluation, median (min) |", "|---|---:|---|---:|"]
    lines += [f"| {r['setting']} | {r['threads']} | {r['wait_policy']} | {r['ms_median']:.1f} ({r['ms_min']:.1f}) |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--idle", action="store_true", help="no busy process")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.batch, a.reps, a.child)))
        return
    rows = measure(a.batch, a.reps, busy=not a.idle)
    print(f"quickstart network, batch {a.batch}, {'one core busy' if not a.idle else 'idle machine'}")
    print(table(rows))


if __name__ == "__main__":
    main()
