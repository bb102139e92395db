"""``python -m benchmarks``: training speed, memory and framework overhead, and sampling cost, side by side.

Prints markdown tables and writes them as JSON (``--json``). Ratios measured within one process (framework vs
bare loop, variant vs fp32) are what compares across machines; absolute seconds depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.report import Report
from benchmarks.training import (VARIANTS, NetConfig, fixed_cost, gpu_bf16_peak_tflops, measure_training,
                                 peak_memory, summarise, train_step_flops)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["ncsnpp", "ddpmpp"], choices=["ncsnpp", "ddpmpp"])
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 2 on CPU, 128 on GPU)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds: framework steps, then each variant's")
    p.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16", "channels_last", "checkpointing"],
                   choices=[v for v in VARIANTS if v != "compile"], help="bare-loop variants (fp32 is the baseline)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes on CPU)")
    p.add_argument("--overhead-rounds", type=int, default=30,
                   help="interleaved steps of the tiny networks that measure the framework's fixed cost per step "
                        "(0: skip)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling cost")
    p.add_argument("--no-tracking", action="store_true",
                   help="skip the tracking table (noise, ODE NFE, data, threads; see benchmarks/tracking.py)")
    p.add_argument("--no-threads", action="store_true", help="skip the busy-core thread comparison (subprocesses)")
    p.add_argument("--sampling-batch", type=int, default=None, help="images per sampler run (default: 1 CPU, 64 GPU)")
    p.add_argument("--sampling-steps", type=int, default=2, help="steps of each fixed-step sampler")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for the MFU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 in --quick; use 1 on a loaded machine, where several "
                        "OpenMP threads per process wait on each other)")
    p.add_argument("--quick", action="store_true",
                   help="tiny networks, one round of one step, no memory subprocesses: a smoke test")
    p.add_argument("--json", default="benchmark_results.json", help="where to write the results")
    args = p.parse_args(argv)
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    if args.compile:
        args.variants.append("compile")
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.rounds, args.steps, args.no_memory, args.overhead_rounds = 1, 1, True, 2
        args.threads = args.threads or 1
        args.no_threads = True
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    args.batch = args.batch or (2 if args.quick else 128 if gpu else 2)
    args.sampling_batch = args.sampling_batch or (1 if args.quick or not gpu else 64)
    return args


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    device = torch.device(args.device)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    report = Report(settings)
    peak = args.peak_tflops or gpu_bf16_peak_tflops(device)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    for name in args.configs:
        config = NetConfig(name, tiny=args.quick)
        log(f"{name}: training step, interleaved framework / bare rounds")
        result = measure_training(config, [VARIANTS[v] for v in args.variants], args.batch, args.rounds,
                                  args.steps, device, log)
        flops = train_step_flops(config, device)
        rows, breakdown = summarise(result, flops, peak)
        if not args.no_memory:
            for row in rows:
                if row["key"] == "compile":
                    continue
                log(f"{name}: peak memory of {row['key']} (fresh subprocess)")
                row.update(peak_memory(config, row["key"], args.batch, device))
            base = next(r for r in rows if r["key"] == "fp32")
            for row in rows:
                if "rise_mib" in row:
                    row["mem_vs_bare"] = row["rise_mib"] / base["rise_mib"]
        for row in rows:
            row["flops_per_image"] = flops
        report.training += rows
        if breakdown:
            report.breakdown.append(breakdown)
    for name in args.configs if args.overhead_rounds else []:
        log(f"{name}: the framework's fixed cost per step, on the tiny network")
        result = measure_training(NetConfig(name, tiny=True), [VARIANTS["fp32"]], args.batch, args.overhead_rounds,
                                  1, device, lambda msg: None)
        report.overhead.append(fixed_cost(result))
    if not args.no_sampling:
        config = NetConfig("ncsnpp", tiny=args.quick)
        log("sampling cost (NCSN++, VE SDE)")
        report.sampling += measure_sampling_rows(config, args, device, log)

    if not args.no_tracking:
        report.tracking += tracking(args, report, log)

    report.notes += notes(args, device, peak, report)
    report.machine["seconds"] = time.perf_counter() - start
    print(report.markdown())
    path = report.write_json(args.json)
    log(f"wrote {path}")
    return report


def tracking(args: argparse.Namespace, report: Report, log) -> list[dict]:
    """The tracking table's rows (benchmarks/tracking.py); data consumption from the NCSN++ lit-score step above."""
    from benchmarks import tracking as t

    rows = t.step_rows(report.training)
    log("tracking: seeded noise vs a quickstart-network evaluation, batch 256")
    rows += t.noise_rows(256, 5 if args.quick else 20)
    log("tracking: ODE NFE, shared and per-image steps vs scipy RK45")
    rows += t.ode_rows(16 if args.quick else 64, 8 if args.quick else 64)
    step = next((r for r in report.training if r["key"] == "framework"), None)
    if step is not None:
        log("tracking: data served vs consumed")
        seconds = step["step_s"].median
        rows += t.data_rows(step["batch"] / seconds, f"{step['config']} lit-score step ({step['batch']} images per "
                                                      f"{seconds:.3g} s)", args.quick)
    if not args.no_threads:
        log("tracking: quickstart evaluation with one core busy, torch's vs lit-score's threads (subprocesses)")
        rows += t.thread_rows()
    return rows


def measure_sampling_rows(config: NetConfig, args: argparse.Namespace, device: torch.device, log) -> list[dict]:
    from benchmarks.sampling_cost import measure_sampling

    return measure_sampling(config, args.sampling_batch, args.sampling_steps, device, log)


def notes(args: argparse.Namespace, device: torch.device, peak: float | None, report: Report) -> list[str]:
    """What the tables mean."""
    out = [
        "framework: lightning.Trainer fitting lit_score.ScoreModel with the EMA callback (logger, checkpoints and "
        "progress bar off, log_every_n_steps=50 as in experiments/base/trainer.yaml); bare: the same forward, loss, "
        "backward, clip_grad_norm_(1.0), Adam, warm-up schedule and EMA (torch._foreach_lerp_) written by hand.",
        "step s: seconds per step from one step's start to the next (data fetch and loop bookkeeping included), "
        "median (min-max) over the timed steps; 'time vs bare fp32': per-round ratio of medians, median (min-max).",
        "peak mem: peak resident set size (CPU, VmHWM) or torch.cuda.max_memory_allocated (GPU) of two steps in a fresh "
        "process; step mem: its rise above the resident model + EMA copy (activations, gradients, Adam state).",
        "fixed cost: the same comparison on the tiny network (nf 8, one block per level, 16x16) over many "
        "interleaved steps, where the network costs little: the framework's per-step cost in milliseconds, "
        "which is what it adds to a step of any network (divide by a step time for the percentage).",
        "checkpointing: every residual and attention block recomputed in backward "
        "(benchmarks.training.enable_gradient_checkpointing).",
        f"TFLOP/s: model FLOPs of forward + backward (torch.utils.flop_counter, "
        f"{report.training[0]['flops_per_image'] / 1e9:.1f} GFLOP per {report.training[0]['config']} image) "
        f"x images/s." if report.training else "",
    ]
    if peak is None:
        out.append("MFU not computed: no known bf16 peak for this device (give --peak-tflops).")
    else:
        out.append(f"MFU: achieved TFLOP/s over a dense bf16 peak of {peak:g} TFLOP/s.")
    if "compile" not in args.variants:
        out.append("torch.compile not measured (pass --compile; compiling the full networks takes minutes on CPU).")
    else:
        out.append("torch.compile: bare loop with net.compile(); compile time excluded (column compile_s in JSON), "
                   "memory not measured.")
    if report.sampling:
        out.append("sampling: random weights; ODE NFE is adaptive and with random weights not the trained "
                   "model's; est. s/image = default NFE x measured seconds per NFE (sampler overhead included).")
    return [n for n in out if n]


if __name__ == "__main__":
    main()
