"""The tracking table of ``python -m benchmarks``: the costs issue 18 named, each beside its baseline and target.

- training step: lit-score's Trainer + EMA against the bare loop (the runner's interleaved rounds; target <= 1.05);
- per-image noise: one seeded Philox draw against one quickstart-network evaluation, batch 256 (target <= 5%);
- the probability-flow ODE: NFE of the shared and per-image steps against scipy's RK45 (official) on an exact
  Gaussian-mixture score at equal tolerance (target for the shared step <= 1.1x);
- data: images/s CachedImageDataModule and ImageDataModule serve against what the NCSN++ step measured above consumes
  (target >= 5x);
- threads: a quickstart-network evaluation while another process busies one core, torch's defaults against
  lit-score's (``lit_score.cli.threads``).
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.report import Stat, median_seconds


def step_rows(training: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for config in dict.fromkeys(r["config"] for r in training):
        by_key = {r["key"]: r for r in training if r["config"] == config}
        if "framework" in by_key and "fp32" in by_key:
            ratio = by_key["framework"]["vs_bare"]
            ratio = ratio.median if isinstance(ratio, Stat) else ratio["median"]
            med = lambda r: r["step_s"].median if isinstance(r["step_s"], Stat) else r["step_s"]["median"]  # noqa: E731
            rows.append({"what": f"{config} training step: lit-score (Trainer + EMA) vs bare loop",
                         "ours": f"{med(by_key['framework']):.3g} s", "baseline": f"{med(by_key['fp32']):.3g} s",
                         "ratio": ratio, "target": "<= 1.05", "met": ratio <= 1.05})
    return rows


def noise_rows(batch: int = 256, reps: int = 20) -> list[dict[str, Any]]:
    """A seeded noise draw and the seeded prior against one quickstart-network evaluation at ``batch``."""
    from benchmarks.threads import quickstart_net
    from lit_score.rng import SeededNoise, seeded_prior
    from lit_score.diffusion.sdes import VPSDE

    net, shape = quickstart_net(), (1, 16, 16)
    x, t = torch.randn(batch, *shape), torch.rand(batch)
    with torch.no_grad():
        evaluation = median_seconds(lambda: net(x, t), max(3, reps // 4))
    noise = SeededNoise(range(batch), shape)
    draw = median_seconds(noise, reps)
    prior = median_seconds(lambda: seeded_prior(VPSDE(), range(batch), shape), reps)
    randn = median_seconds(lambda: torch.randn(batch, *shape), reps)
    ev = f"{1e3 * evaluation:.3g} ms network evaluation"
    return [{"what": f"seeded noise draw, batch {batch} x {shape} (one randn: {1e3 * randn:.3g} ms)",
             "ours": f"{1e3 * draw:.3g} ms", "baseline": ev, "ratio": draw / evaluation, "target": "<= 0.05",
             "met": draw / evaluation <= 0.05},
            {"what": f"seeded prior (setup + draw), batch {batch}", "ours": f"{1e3 * prior:.3g} ms", "baseline": ev,
             "ratio": prior / evaluation, "target": "", "met": None}]


def ode_rows(dim: int = 64, batch: int = 64, tol: float = 1e-5) -> list[dict[str, Any]]:
    from benchmarks.ode_nfe import ode_rows as nfe_rows

    rows = []
    for r in nfe_rows(dim, batch, tol):
        where = f"{r['sde']} ODE, exact mixture {dim}-D, batch {batch}, rtol = atol = {tol:g}"
        rows.append({"what": f"{where}: shared-step NFE vs scipy RK45", "ours": str(r["shared"]),
                     "baseline": str(r["official"]), "ratio": r["shared_vs_official"], "target": "<= 1.1",
                     "met": r["shared_vs_official"] <= 1.1})
        rows.append({"what": f"{where}: per-image NFE, max (mean {r['image_mean']:.1f}) vs scipy RK45",
                     "ours": str(r["image_max"]), "baseline": str(r["official"]), "ratio": r["image_max_vs_official"],
                     "target": "", "met": None})
    return rows


def data_rows(consumed_per_s: float, what_consumes: str, quick: bool) -> list[dict[str, Any]]:
    from benchmarks.data import data_rows as served

    rows = served(num_images=64 if quick else 1024, batch_size=16 if quick else 128, num_workers=0 if quick else 2,
                  consumed_per_s=consumed_per_s, consumer=what_consumes)
    return [{"what": f"data: {r['source']} vs {what_consumes}", "ours": f"{r['delivered']:.0f} img/s",
             "baseline": f"{r['consumed']:.3g} img/s", "ratio": r["ratio"], "target": ">= 5",
             "met": r["ratio"] >= 5} for r in rows]


def thread_rows(batch: int = 32, reps: int = 5) -> list[dict[str, Any]]:
    from benchmarks.threads import measure

    rows = measure(batch, reps, busy=True)
    base = rows[0]
    return [{"what": f"quickstart evaluation, batch {batch}, one core busy: {r['setting']}",
             "ours": f"{r['ms_median']:.3g} ms ({r['threads']} threads, OMP_WAIT_POLICY {r['wait_policy']})",
             "baseline": f"{base['ms_median']:.3g} ms", "ratio": r["ms_median"] / base["ms_median"], "target": "",
             "met": None} for r in rows]


def tracking_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| measurement | ours | baseline | ours / baseline | target | met |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['what']} | {r['ours']} | {r['baseline']} | {r['ratio']:.3g} | {r['target']} | {met} |")
    return "\n".join(lines)
