"""Summary statistics of repeated measurements, the printed tables and the JSON file of a benchmark run."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """The median wall time of ``reps`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)



@dataclass
class Stat:
    """Median and spread (min, max) of ``n`` repeated measurements."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        values = [float(v) for v in values]
        if not values:
            raise ValueError("no measurements to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def spread_pct(self) -> float:
        """Half the range, in percent of the median."""
        return 50.0 * (self.max - self.min) / self.median if self.median else 0.0


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Report:
    """Everything one run of ``python -m benchmarks`` measured."""

    settings: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=machine_info)
    training: list[dict[str, Any]] = field(default_factory=list)
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    overhead: list[dict[str, Any]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)
    tracking: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Stat):
                return asdict(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        return plain({"settings": self.settings, "machine": self.machine, "training": self.training,
                      "breakdown": self.breakdown, "overhead": self.overhead, "sampling": self.sampling, "tracking": self.tracking,
                      "notes": self.notes})

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def markdown(self) -> str:
        """The tables, as GitHub markdown."""
        parts = [self._header()]
        if self.training:
            parts.append(training_table(self.training))
        if self.breakdown:
            parts.append(breakdown_table(self.breakdown))
        if self.overhead:
            parts.append(overhead_table(self.overhead))
        if self.sampling:
            parts.append(sampling_table(self.sampling))
        if self.tracking:
            from benchmarks.tracking import tracking_table

            parts.append(tracking_table(self.tracking))
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts) + "\n"

    def _header(self) -> str:
        m, s = self.machine, self.settings
        device = m.get("gpu") or f"{m['cpu']} ({m['cpu_threads']} threads)"
        load = m.get("load_average")
        load_txt = f", load average at start {load[0]:.1f}" if load else ""
        return (f"Device: {device}; torch {m['torch']}, lightning {m.get('lightning', '-')}{load_txt}. "
                f"Batch {s['batch']}, {s['rounds']} interleaved rounds x {s['steps']} steps per variant "
                f"after warm-up{' (quick mode: tiny networks)' if s.get('quick') else ''}.")


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _stat_txt(s: Stat | dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if s is None:
        return "-"
    s = Stat(**s) if isinstance(s, dict) else s
    return f"{_fmt(s.median * scale, digits)} ({_fmt(s.min * scale, digits)}-{_fmt(s.max * scale, digits)})"


def _ratio_txt(s: Stat | dict | None) -> str:
    if s is None:
        return "-"
    s = Stat(**s) if isinstance(s, dict) else s
    return f"{s.median:.3f} ({s.min:.3f}-{s.max:.3f})"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def training_table(rows: list[dict[str, Any]]) -> str:
    """Training step time, throughput, ratio to the bare fp32 loop and peak memory per network and variant."""
    head = ["network", "variant", "step s, median (min-max)", "images/s", "time vs bare fp32, median (min-max)",
            "peak mem MiB", "step mem MiB", "step mem vs bare fp32", "TFLOP/s", "MFU (bf16 peak)"]
    out = []
    for r in rows:
        out.append([r["config"], r["variant"], _stat_txt(r.get("step_s")), _fmt(r.get("images_per_s")),
                    _ratio_txt(r.get("vs_bare")), _fmt(r.get("peak_mib"), 4), _fmt(r.get("rise_mib"), 4),
                    _fmt(r.get("mem_vs_bare")),
                    _fmt(r.get("tflops")), "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"])
    return "Training step (forward, loss, backward, clip 1.0, Adam, EMA)\n\n" + _table(head, out)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Where a step's time goes, framework next to the bare loop (fp32), in milliseconds (medians)."""
    phases = list(rows[0]["framework_ms"].keys()) if rows else []
    head = ["network", "phase", "framework ms", "bare ms", "difference ms"]
    out = []
    for r in rows:
        for p in phases:
            f, b = r["framework_ms"][p], r["bare_ms"][p]
            out.append([r["config"], p, f"{f:.1f}", f"{b:.1f}", f"{f - b:+.1f}"])
    return "Where the step time goes (fp32, medians over timed steps)\n\n" + _table(head, out)


def overhead_table(rows: list[dict[str, Any]]) -> str:
    """The framework's fixed cost per step in milliseconds, measured on a tiny network."""
    head = ["network (tiny)", "framework ms", "bare ms", "difference ms, median (min-max)", "phase differences ms"]
    out = []
    for r in rows:
        phases = ", ".join(f"{p} {d:+.1f}" for p, d in r["phase_difference_ms"].items())
        out.append([r["config"], _stat_txt(r["framework_ms"]), _stat_txt(r["bare_ms"]),
                    _stat_txt(r["difference_ms"], digits=2), phases])
    return (f"Fixed cost of the framework per step (tiny networks, {rows[0]['rounds']} interleaved steps per side)"
            "\n\n" + _table(head, out))


def sampling_table(rows: list[dict[str, Any]]) -> str:
    """Seconds and NFE per image for each sampler, and the sampler's own overhead over its network calls."""
    head = ["network", "sampler", "NFE measured", "network s per NFE per image, median (min-max)",
            "sampler overhead vs network",
            "default NFE", "est. s/image at default"]
    out = []
    for r in rows:
        out.append([r["config"], r["sampler"], str(r["nfe"]), _stat_txt(r["s_per_nfe_per_image"]),
                    f"{100 * r['overhead']:.1f}%", str(r["default_nfe"]) if r.get("default_nfe") else "adaptive",
                    _fmt(r.get("est_s_per_image"))])
    return "Sampling (random weights, batch of {} images, few steps, extrapolated per NFE)\n\n".format(
        rows[0]["batch"] if rows else "?") + _table(head, out)
