"""Training-step speed and memory: lit-score's Trainer + ScoreModel + EMA against a bare PyTorch loop.

Both sides do the same work on the same network, batch and precision: the continuous denoising score-matching loss,
backward, gradient clipping to norm 1, Adam with the warm-up schedule and an EMA of the weights. The framework is a
real ``lightning.Trainer`` fitting a ``ScoreModel``; a callback timestamps its steps and, between rounds of framework
steps, runs rounds of the bare loop (one per variant: fp32, bf16 autocast, channels_last, gradient checkpointing,
torch.compile), so slow drift of the machine's load hits both sides alike. Peak memory is measured in a fresh
subprocess per network and variant (``python -m benchmarks.training --memory SPEC``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.report import Stat
from lit_score.diffusion.losses import DSMLoss, dsm_loss
from lit_score.networks import DDPMpp, NCSNpp
from lit_score.networks.layers import AttnBlockpp
from lit_score.networks.resblocks import ResnetBlockBigGANpp, ResnetBlockDDPMpp
from lit_score.diffusion.denoiser import NetworkDenoiser
from lit_score.diffusion.sdes import SDE, VESDE, VPSDE

LR, WARMUP, CLIP, EMA_RATE, EPS = 2e-4, 5000, 1.0, 0.9999, 1e-5
PHASES = ("data + loop", "forward + loss", "backward", "clip + Adam", "EMA")
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)

# Dense bf16 tensor-core peaks in TFLOP/s, matched in order against torch.cuda.get_device_name().
GPU_BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                        ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
                        ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0))


@dataclass(frozen=True)
class NetConfig:
    """A CIFAR-10 network with its SDE and loss reduction, as in experiments/cifar10_*.yaml."""

    name: str
    tiny: bool = False

    @property
    def image_size(self) -> int:
        return int(TINY["image_size"]) if self.tiny else 32

    def build(self) -> tuple[nn.Module, SDE, bool]:
        """(network, SDE, reduce_mean); the network's preconditioning is DSMLoss's (``denoiser``)."""
        extra = TINY if self.tiny else {}
        if self.name == "ncsnpp":
            return NCSNpp(centered=False, **extra), VESDE(0.01, 50.0, 1000), False
        if self.name == "ddpmpp":
            return DDPMpp(**extra), VPSDE(0.1, 20.0, 1000), True
        raise ValueError(f"unknown network config {self.name!r}; known: ncsnpp, ddpmpp")

    @staticmethod
    def denoiser(net: nn.Module, sde: SDE) -> NetworkDenoiser:
        """The model's denoiser: ``net`` under score_sde's preconditioning (ScoreModel's default with DSMLoss)."""
        return NetworkDenoiser(net, DSMLoss().default_precond(sde), sde)


@dataclass(frozen=True)
class Variant:
    """How the training step runs: precision and memory-layout / memory-saving / compiler switches."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    checkpointing: bool = False
    compile: bool = False


VARIANTS = {v.name: v for v in (Variant("fp32"), Variant("bf16", bf16=True),
                                Variant("channels_last", channels_last=True),
                                Variant("checkpointing", checkpointing=True), Variant("compile", compile=True))}


def enable_gradient_checkpointing(net: nn.Module) -> int:
    """Recompute the activations of every residual and attention block in the backward pass; returns the count."""
    count = 0
    for module in net.modules():
        if isinstance(module, (ResnetBlockBigGANpp, ResnetBlockDDPMpp, AttnBlockpp)):
            forward = module.forward

            def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Tensor:
                if torch.is_grad_enabled():
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)

            module.forward = checkpointed
            count += 1
    return count


def sync(device: torch.device) -> None:
    """Wait for the device, so host timestamps mean finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_loader(batch: int, num_batches: int, seed: int = 0, size: int = 32) -> DataLoader:
    """An in-memory DataLoader of CIFAR-sized uniform random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.rand(batch * num_batches, 3, size, size, generator=g)), batch_size=batch,
                      shuffle=False, drop_last=True, num_workers=0)


def warmup_lambda(step: int) -> float:
    """ScoreModel's learning-rate warm-up."""
    return min((step + 1) / WARMUP, 1.0)


class BareLoop:
    """The training step written by hand: forward, loss, backward, clip, Adam, schedule, EMA (foreach lerp)."""

    def __init__(self, config: NetConfig, variant: Variant, device: torch.device, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        net, self.sde, self.reduce_mean = config.build()
        self.net = net.to(device).train()
        if variant.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if variant.checkpointing:
            enable_gradient_checkpointing(self.net)
        if variant.compile:
            self.net.compile()
        self.variant, self.device = variant, device
        self.params = list(self.net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=LR)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda)
        self.D = NetConfig.denoiser(self.net, self.sde)
        self.loader = random_loader(batch, 64, seed=seed + 1, size=config.image_size)
        self.batches = iter(self.loader)
        self.ema_src = [v for v in self.net.state_dict().values() if v.is_floating_point()]
        self.ema = [v.detach().clone() for v in self.ema_src]
        self.updates = 0

    def _next(self) -> Tensor:
        try:
            (x,) = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            (x,) = next(self.batches)
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.variant.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.variant.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, x: Tensor) -> Tensor:
        return dsm_loss(self.D.score, self.sde, x, EPS, self.reduce_mean, False)

    def step(self) -> dict[str, float]:
        """One training step; returns the seconds of each phase in ``PHASES``."""
        marks = [time.perf_counter()]

        def mark() -> None:
            sync(self.device)
            marks.append(time.perf_counter())

        x = self._next()
        mark()
        with self.autocast():
            loss = self.loss(x)
        mark()
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        mark()
        with torch.no_grad():
            self.updates += 1
            decay = min(EMA_RATE, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_(self.ema, self.ema_src, 1.0 - decay)
        mark()
        return {p: b - a for p, a, b in zip(PHASES, marks, marks[1:])}


def train_step_flops(config: NetConfig, device: torch.device) -> float:
    """Model FLOPs of one training image: forward + backward of the loss at batch 1 (no recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    bare = BareLoop(config, VARIANTS["fp32"], device, batch=1)
    x = bare._next()
    counter = FlopCounterMode(display=False)
    with counter:
        bare.loss(x).backward()
    return float(counter.get_total_flops())


def gpu_bf16_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK_TFLOPS if key in name), None)


# -------------------------------------------------------------------------------------------------- the framework
def lightning_parts():
    """Lightning, the ScoreModel and the EMA callback, imported late (the memory subprocesses of the bare loop
    do without them)."""
    warnings.filterwarnings("ignore", message=".*treespec.*")
    import lightning as L

    from lit_score.callbacks.ema import EMA
    from lit_score.runtime.module import ScoreModel

    return L, EMA, ScoreModel


def quiet_lightning() -> None:
    """No advice about DataLoader workers, logging intervals or model summaries in the benchmark's output."""
    import logging

    warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|LitLogger|litlogger).*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_framework(config: NetConfig, device: torch.device, batch: int, steps: int, callbacks: list,
                   bf16: bool = False, seed: int = 0) -> tuple[Any, Any, DataLoader]:
    """(trainer, ScoreModel, dataloader): the run of ``lit-score fit`` minus logger, checkpoints and progress bar;
    ``callbacks[0]`` goes before the EMA callback, the rest after it."""
    L, EMA, ScoreModel = lightning_parts()
    quiet_lightning()
    torch.manual_seed(seed)
    net, sde, reduce_mean = config.build()
    model = ScoreModel(net, sde, loss=DSMLoss(EPS, reduce_mean), lr=LR, warmup=WARMUP)
    first, last = callbacks[:1], callbacks[1:]
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=CLIP, log_every_n_steps=50, precision="bf16-mixed" if bf16 else "32-true",
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*first, EMA(rate=EMA_RATE), *last])
    loader = random_loader(batch, steps + 2, seed=seed + 1, size=config.image_size)
    return trainer, model, loader


def step_clock_callbacks(batch: int, device: torch.device, between: Callable[[int], None]) -> list:
    """Two callbacks that time the framework's steps: one first in the list, one last; ``between(step)`` runs
    after each step's end timestamp and is excluded from the framework's time."""
    L, _, _ = lightning_parts()

    class StartMark(L.Callback):
        def __init__(self, clock: "_StepClock") -> None:
            self.clock = clock

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.clock.mark("start")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self.clock.mark("before_backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self.clock.mark("after_backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.clock.mark("optimizer_done")

    class Clock(_StepClock, L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.mark("end")
            self.finish_step(batch_idx)

    clock = Clock(batch, device, between)
    return [StartMark(clock), clock]


class _StepClock:
    """Per-step phase timestamps of the framework; the phases match ``BareLoop.step``."""

    def __init__(self, batch: int, device: torch.device, between: Callable[[int], None]) -> None:
        self.batch, self.device, self.between = batch, device, between
        self.t: dict[str, float] = {}
        self.resume: float | None = None
        self.steps: list[dict[str, float]] = []

    def mark(self, name: str) -> None:
        sync(self.device)
        self.t[name] = time.perf_counter()

    def finish_step(self, index: int) -> None:
        t = self.t
        if self.resume is not None:
            marks = [self.resume, t["start"], t["before_backward"], t["after_backward"], t["optimizer_done"], t["end"]]
            self.steps.append({p: b - a for p, a, b in zip(PHASES, marks, marks[1:])})
        else:
            self.steps.append({})
        self.between(index)
        sync(self.device)
        self.resume = time.perf_counter()


# -------------------------------------------------------------------------------------------------- measuring
@dataclass
class TrainingResult:
    """Per-variant step times (seconds, timed steps only) and per-round medians, framework included."""

    config: str
    batch: int
    rounds: list[dict[str, float]]
    steps: dict[str, list[dict[str, float]]]
    compile_s: float | None = None


def measure_training(config: NetConfig, variants: list[Variant], batch: int, rounds: int, steps: int,
                     device: torch.device, log: Callable[[str], None] = print) -> TrainingResult:
    """Interleaved rounds: ``steps`` framework steps, then ``steps`` bare-loop steps of each variant; a warm-up
    step of every side first. The order of the bare variants flips every round."""
    bares = {v.name: BareLoop(config, v, device, batch) for v in variants}
    per_step: dict[str, list[dict[str, float]]] = {"framework": [], **{v.name: [] for v in variants}}
    round_medians: list[dict[str, float]] = []
    compile_s: list[float] = []

    def between(index: int) -> None:
        if index == 0:
            for name, bare in bares.items():
                t0 = time.perf_counter()
                bare.step()
                if bare.variant.compile:
                    compile_s.append(time.perf_counter() - t0)
                if bare.variant.compile:
                    bare.step()
            log(f"  {config.name}: warm-up done")
            return
        if index % steps:
            return
        r = index // steps
        fw = [sum(s.values()) for s in clock.steps[-steps:]]
        per_step["framework"] += clock.steps[-steps:]
        medians = {"framework": Stat.of(fw).median}
        order = list(bares) if r % 2 else list(reversed(bares))
        for name in order:
            timed = [bares[name].step() for _ in range(steps)]
            per_step[name] += timed
            medians[name] = Stat.of([sum(s.values()) for s in timed]).median
        round_medians.append(medians)
        log(f"  {config.name} round {r}/{rounds}: " + ", ".join(f"{k} {v:.3g}s" for k, v in medians.items()))

    clock_callbacks = step_clock_callbacks(batch, device, between)
    clock = clock_callbacks[1]
    trainer, model, loader = make_framework(config, device, batch, 1 + rounds * steps, clock_callbacks)
    trainer.fit(model, train_dataloaders=loader)
    return TrainingResult(config.name, batch, round_medians, per_step, compile_s[0] if compile_s else None)


def summarise(result: TrainingResult, flops_per_image: float | None, peak_tflops: float | None
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (one per side/variant) and the phase breakdown of framework vs bare fp32."""
    rows = []
    for name, steps in result.steps.items():
        if not steps:
            continue
        step = Stat.of([sum(s.values()) for s in steps])
        ratio = Stat.of([r[name] / r["fp32"] for r in result.rounds]) if "fp32" in result.rounds[0] else None
        ips = result.batch / step.median
        row: dict[str, Any] = {"config": result.config, "variant": "framework fp32 (Trainer + EMA)"
                               if name == "framework" else f"bare {name}", "key": name, "batch": result.batch,
                               "step_s": step, "images_per_s": ips, "vs_bare": ratio}
        if flops_per_image:
            row["tflops"] = flops_per_image * ips / 1e12
            row["mfu"] = row["tflops"] / peak_tflops if peak_tflops else None
        if name == "compile" and result.compile_s is not None:
            row["compile_s"] = result.compile_s
            row["variant"] = f"bare compile (first step {result.compile_s:.0f} s)"
        rows.append(row)
    breakdown = {}
    if "fp32" in result.steps:
        def medians(steps: list[dict[str, float]]) -> dict[str, float]:
            return {p: 1000 * Stat.of([s[p] for s in steps]).median for p in PHASES}

        breakdown = {"config": result.config, "framework_ms": medians(result.steps["framework"]),
                     "bare_ms": medians(result.steps["fp32"])}
    return rows, breakdown


def fixed_cost(result: TrainingResult) -> dict[str, Any]:
    """The framework's per-step cost over the bare fp32 loop, in milliseconds, and the phase differences."""
    diffs = [1000 * (r["framework"] - r["fp32"]) for r in result.rounds]
    _, breakdown = summarise(result, None, None)
    return {"config": result.config, "rounds": len(result.rounds),
            "framework_ms": Stat.of([1000 * r["framework"] for r in result.rounds]),
            "bare_ms": Stat.of([1000 * r["fp32"] for r in result.rounds]), "difference_ms": Stat.of(diffs),
            "phase_difference_ms": {p: breakdown["framework_ms"][p] - breakdown["bare_ms"][p] for p in PHASES}}


# -------------------------------------------------------------------------------------------------- memory
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def maxrss_mib() -> float:
    """Peak resident set size of this address space (VmHWM; getrusage's maxrss survives exec, so a child
    forked from a large parent would report the parent's peak)."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_here(config: NetConfig, side: str, batch: int, device: torch.device, steps: int = 2
                     ) -> dict[str, float]:
    """Peak memory of ``steps`` training steps of ``side`` ('framework' or a variant name), run in this process.

    CPU: peak resident set size (VmHWM), and its rise above the resident size once the model and its EMA copy
    are built (what the step adds: activations, gradients, Adam state). CUDA: the same from
    torch.cuda.max_memory_allocated and torch.cuda.memory_allocated.
    """
    if side == "framework":
        L, _, _ = lightning_parts()
        marks: dict[str, float] = {}

        class Base(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                marks["base"] = _base(device)

        clocks = step_clock_callbacks(batch, device, lambda i: None)
        trainer, model, loader = make_framework(config, device, batch, steps, [*clocks[:1], Base(), *clocks[1:]])
        trainer.fit(model, train_dataloaders=loader)
        base = marks["base"]
    else:
        bare = BareLoop(config, VARIANTS[side], device, batch)
        base = _base(device)
        for _ in range(steps):
            bare.step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else maxrss_mib()
    return {"peak_mib": peak, "base_mib": base, "rise_mib": peak - base}


def _base(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return _rss_mib()


def peak_memory(config: NetConfig, side: str, batch: int, device: torch.device, timeout: float = 900
                ) -> dict[str, float]:
    """``peak_memory_here`` in a fresh subprocess (so earlier allocations do not hide the peak)."""
    spec = json.dumps({"config": config.name, "tiny": config.tiny, "side": side, "batch": batch,
                       "device": str(device), "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--memory", spec], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement {side} of {config.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Internal: one peak-memory measurement, printed as JSON.")
    parser.add_argument("--memory", required=True, help="JSON: config, tiny, side, batch, device, threads")
    spec = json.loads(parser.parse_args(argv).memory)
    torch.set_num_threads(int(spec["threads"]))
    result = peak_memory_here(NetConfig(spec["config"], spec["tiny"]), spec["side"], int(spec["batch"]),
                              torch.device(spec["device"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
