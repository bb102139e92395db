"""The benchmark runner in quick mode: it prints the tables and writes a JSON file with the expected rows."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.training import NetConfig, enable_gradient_checkpointing, peak_memory_here

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"framework", "fp32", "bf16", "channels_last", "checkpointing"}


@pytest.mark.slow  # the whole quick benchmark (CI runs it in `make test-slow`)
def test_quick_run_writes_every_row(tmp_path):
    """Both networks have a framework row and one bare row per variant, with step-time statistics and a ratio to
    the bare fp32 loop; the phase breakdown and one row per sampler are there too."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ncsnpp | framework fp32" in proc.stdout
    result = json.loads(out.read_text())
    rows = {(r["config"], r["key"]): r for r in result["training"]}
    assert set(rows) == {(c, s) for c in ("ncsnpp", "ddpmpp") for s in SIDES}
    for row in rows.values():
        assert row["step_s"]["n"] >= 1 and row["step_s"]["median"] > 0
        assert row["vs_bare"]["median"] > 0 and row["flops_per_image"] > 0
    assert rows[("ncsnpp", "fp32")]["vs_bare"]["median"] == 1.0
    assert {b["config"] for b in result["breakdown"]} == {"ncsnpp", "ddpmpp"}
    assert {o["config"] for o in result["overhead"]} == {"ncsnpp", "ddpmpp"}
    assert len(result["sampling"]) == 5
    assert all(r["nfe"] >= 1 and r["est_s_per_image"] > 0 for r in result["sampling"])
    tracking = [r["what"] for r in result["tracking"]]
    assert sum("training step: lit-score" in w for w in tracking) == 2
    assert sum(w.startswith("seeded noise draw, batch 256") for w in tracking) == 1
    assert sum("shared-step NFE vs scipy RK45" in w for w in tracking) == 2
    assert sum(w.startswith("data: cached uint8") for w in tracking) == 1
    assert "| measurement | ours | baseline |" in proc.stdout


def test_peak_memory_of_a_bare_step_is_measured():
    """Two bare fp32 steps of the tiny NCSN++ raise the resident set above the resident model."""
    memory = peak_memory_here(NetConfig("ncsnpp", tiny=True), "fp32", batch=2, device=torch.device("cpu"))
    assert memory["peak_mib"] >= memory["base_mib"] > 0
    assert memory["rise_mib"] >= 0


def test_gradient_checkpointing_keeps_the_gradients():
    """Recomputing the blocks in backward gives the same gradients (dropout off)."""
    net, _, _ = NetConfig("ddpmpp", tiny=True).build()
    net.eval()
    x, label = torch.rand(2, 3, 16, 16), torch.tensor([3.0, 500.0])
    net(x, label).square().mean().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    assert enable_gradient_checkpointing(net) > 0
    net(x, label).square().mean().backward()
    for a, b in zip(plain, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b)


def test_sampler_benchmark_quick_prints_every_solver_and_the_costs():
    """`python -m benchmarks.samplers --quick`: a row per solver and SDE it runs on for both mixtures, each with a
    measured NFE, a null row per panel, and the noise and per-step costs beside the network's."""
    from benchmarks.samplers import SOLVERS

    proc = subprocess.run([sys.executable, "-m", "benchmarks.samplers", "--quick", "--out", ""], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| V")]
    for sde in ("VE", "VP"):
        for data in ("2-D 5 modes", "8-D 4 modes"):
            panel = {row[2]: row for row in cells if row[0] == sde and row[1] == data}
            expected = {s.name for s in SOLVERS if sde in s.sdes} | {"null (exact samples)"}
            assert set(panel) == expected
            assert all(int(panel[s][4]) >= 1 for s in expected - {"null (exact samples)"})
    assert "one seeded noise draw" in proc.stdout and "% of it" in proc.stdout
    cost_rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line.rstrip().endswith("% |")]
    assert len(cost_rows) == len(SOLVERS)


def test_data_benchmark_rows_give_served_over_consumed():
    """Every source, the cached uint8 one included, with the ratio to a given step time's consumption."""
    from benchmarks.data import data_rows, format_rows

    rows = data_rows(num_images=64, batch_size=16, num_workers=0, step_ms=100.0)
    assert [r["source"] for r in rows][-1] == "cached uint8, augmented on cpu" and len(rows) == 3
    for r in rows:
        assert r["consumed"] == 160.0 and r["delivered"] > 0 and r["ratio"] == r["delivered"] / 160.0
    assert "served / consumed" in format_rows(rows)


def test_ode_nfe_benchmark_rows():
    """Shared step at scipy's NFE, per-image max and mean reported, for VP and VE."""
    from benchmarks.ode_nfe import ode_rows

    rows = ode_rows(dim=8, batch=8, tol=1e-4)
    assert [r["sde"] for r in rows] == ["VP", "VE"]
    for r in rows:
        assert r["shared"] == r["official"] and r["image_max"] >= r["image_mean"] > 0


def test_gpu_suite_sections_run_on_cpu():
    """Each section of `python -m benchmarks.gpu` (tiny sizes, CPU): the rows it reports, with what ran (NFE, steps,
    the networks and settings), and a failing section recorded as an error that fails the run."""
    from benchmarks import gpu

    sizes = gpu.Sizes(tiny=True, train_batch=2, train_steps=1, sample_batch=2, pc_batch=2, edm_steps=2, fid_batch=1,
                      ode_dim=(1, 4, 4), ode_batch=4, run_seconds=2.0, run_batch=8, compile_nets=())
    suite = gpu.Suite(torch.device("cpu"), sizes, budget=600.0, peak_tflops=100.0)
    suite.run("train step", 1, lambda: gpu.train_step(suite, "ddpmpp", "bf16 + channels_last"))
    suite.run("sampling", 1, lambda: gpu.sampling(suite))
    suite.run("ode", 1, lambda: gpu.ode(suite))
    suite.run("fid features", 1, lambda: gpu.fid_features(suite))
    suite.run("training run", 1, lambda: gpu.training_run(suite))
    suite.run("EDM step", 1, lambda: gpu.edm_step(suite, True))
    suite.run("never", 10_000, lambda: [])
    suite.run("broken", 1, lambda: 1 / 0)
    rows = suite.rows
    train = rows[0]
    assert train["setting"] == "bf16 + channels_last" and train["images_per_s"] > 0 and train["batch"] == 2
    assert train["mfu"] == train["tflops"] / 100.0 > 0
    assert [r["nfe"] for r in rows if r["section"] == "sampling"] == [3, 3, 2]  # EDM 2 levels: 2N - 1; PC: 2 per step
    ode = [r for r in rows if r["section"] == "ode"]
    assert [r["setting"].split(", ")[1] for r in ode] == ["batch step", "image step"] and all(r["nfe"] > 6 for r in ode)
    assert next(r for r in rows if r["section"] == "fid features")["detail"] == "2048 features"
    run = next(r for r in rows if r["section"] == "training run")
    assert run["steps"] >= 1 and run["network"] == "ddpmpp"
    edm = next(r for r in rows if r["section"] == "EDM step")
    assert edm["setting"] == "bf16, augment p 0.12" and edm["ms"] > 0 and "augmentation" in edm["detail"]
    assert "budget" in rows[-2]["skipped"] and "ZeroDivisionError" in rows[-1]["error"]
    assert gpu.failures(rows)[0] == f"broken failed: {rows[-1]['error']}"
    assert "| train step | ddpmpp | bf16 + channels_last | 2 |" in gpu.table(rows)
