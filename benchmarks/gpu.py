"""``python -m benchmarks.gpu``: the GPU suite, one command, at most ``--budget`` seconds (default 480).

On one GPU it measures, in this order (the most likely to overrun last; a section the budget no longer allows is
skipped and says so):

1. the training step of NCSN++ (VE) and DDPM++ (VP) at CIFAR-10 size, batch 128: fp32, bf16 autocast, bf16 +
   channels_last; images/s, peak memory, TFLOP/s and MFU against the GPU's dense bf16 peak;
2. sampling throughput: EDM Heun with 18 levels (35 NFE) at batch 256, fp32 and bf16 autocast, and one PC step
   (reverse diffusion + Langevin, 2 NFE) at batch 512 beside two bare network evaluations at that batch;
3. the probability-flow ODE (exact Gaussian-mixture score, CIFAR-10 size) with per-image and shared steps;
4. FID feature extraction: torch-fidelity's InceptionV3 (random weights: throughput only), uint8 32x32 at batch 500;
5. a 2-minute CIFAR-10-shaped training run (synthetic images, DDPM++, lightning.Trainer, bf16-mixed on GPU) whose
   loss must fall;
6. EDM's config F training step (DDPM++ 128 x [2, 2, 2], dropout 0.13, EDM loss, bf16 autocast) with its non-leaky
   augmentation (p 0.12, 9 labels) and without, the augmentation's own time apart;
7. the training step with torch.compile (bf16; inductor), compilation time apart.

It prints one table and writes one JSON (``--json``). ``--device cpu --quick`` runs the same code on tiny networks and
batches in a minute or two (``make bench-gpu-quick``, in CI).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.training import (TINY, VARIANTS, BareLoop, NetConfig, Variant, lightning_parts, maxrss_mib,
                                 gpu_bf16_peak_tflops, quiet_lightning, sync, train_step_flops)
from lit_score.diffusion.denoiser import Denoiser
from lit_score.networks import DDPMpp

TRAIN_VARIANTS = {"fp32": VARIANTS["fp32"], "bf16": VARIANTS["bf16"],
                  "bf16 + channels_last": Variant("bf16 + channels_last", bf16=True, channels_last=True),
                  "bf16 + torch.compile": Variant("bf16 + torch.compile", bf16=True, compile=True)}


@dataclass
class Sizes:
    """Networks, batches and repetitions of the full suite or of ``--quick``."""

    tiny: bool
    train_batch: int
    train_steps: int
    sample_batch: int
    pc_batch: int
    edm_steps: int
    fid_batch: int
    ode_dim: tuple[int, int, int]
    ode_batch: int
    run_seconds: float
    run_batch: int
    compile_nets: tuple[str, ...]

    @classmethod
    def of(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(True, 4, 2, 4, 8, 18, 2, (3, 8, 8), 8, 15.0, 16, ("ddpmpp",))
        return cls(False, 128, 10, 256, 512, 18, 500, (3, 32, 32), 256, 120.0, 128, ("ncsnpp", "ddpmpp"))


@dataclass
class Suite:
    device: torch.device
    sizes: Sizes
    budget: float
    peak_tflops: float | None
    compile_backend: str = "inductor"
    start: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def run(self, name: str, needs_s: float, fn: Callable[[], list[dict[str, Any]]]) -> None:
        """Run a section if the budget leaves ``needs_s`` seconds, recording its rows, its time or its error."""
        if self.left() < needs_s:
            self.rows.append({"section": name, "skipped": f"budget: {self.left():.0f} s left, needs ~{needs_s:.0f} s"})
            self.log(f"{name}: skipped (budget)")
            return
        self.log(name)
        t0 = time.perf_counter()
        try:
            rows = fn()
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others' figures
            rows = [{"error": f"{type(err).__name__}: {err}"[:500]}]
        for row in rows:
            row.setdefault("section", name)
            row.setdefault("section_s", time.perf_counter() - t0)
        self.rows += rows


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated on a GPU; on CPU the process's resident high-water mark (all sections so far)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else maxrss_mib()


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------- training
def train_step(suite: Suite, name: str, variant_key: str) -> list[dict[str, Any]]:
    """Median seconds of ``train_steps`` bare training steps after warm-up (forward, DSM loss, backward, clip,
    Adam, EMA), images/s, peak memory and MFU."""
    s, device = suite.sizes, suite.device
    config, variant = NetConfig(name, tiny=s.tiny), TRAIN_VARIANTS[variant_key]
    reset_peak(device)
    bare = BareLoop(config, Variant(variant.name, variant.bf16, variant.channels_last), device, s.train_batch)
    if variant.compile:
        bare.net.compile(backend=suite.compile_backend)
    t0 = time.perf_counter()
    for _ in range(3 if variant.compile else 2):
        bare.step()
    warmup_s = time.perf_counter() - t0
    seconds = [sum(bare.step().values()) for _ in range(s.train_steps)]
    step = statistics.median(seconds)
    flops = train_step_flops(config, device)
    ips = s.train_batch / step
    tflops = flops * ips / 1e12
    row = {"network": name, "setting": variant_key, "batch": s.train_batch, "images_per_s": ips, "ms": 1e3 * step,
           "peak_mib": peak_mib(device), "tflops": tflops, "gflop_per_image": flops / 1e9,
           "mfu": tflops / suite.peak_tflops if suite.peak_tflops else None}
    if variant.compile:
        row["compile_s"], row["setting"] = warmup_s, f"{variant_key} ({suite.compile_backend})"
    del bare
    return [row]


def edm_step(suite: Suite, augment: bool) -> list[dict[str, Any]]:
    """Median seconds of ``train_steps`` EDM config F steps (augment, forward, EDM loss, backward, Adam) in bf16
    autocast, and of the augmentation alone."""
    from lit_score.diffusion.augment import AugmentPipe
    from lit_score.diffusion.denoiser import EDMPrecond, NetworkDenoiser
    from lit_score.diffusion.losses import EDMLoss
    from lit_score.diffusion.sdes import VESDE

    s, device = suite.sizes, suite.device
    torch.manual_seed(0)
    kwargs = {**TINY, "ch_mult": (2, 2)} if s.tiny else dict(ch_mult=(2, 2, 2))
    net = DDPMpp(dropout=0.13, augment_dim=9, **kwargs).to(device).train()
    D, loss_fn = NetworkDenoiser(net, EDMPrecond(0.5), VESDE(0.002, 80.0)), EDMLoss(reduce_mean=False)
    pipe, opt = AugmentPipe(p=0.12), torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(s.train_batch, 3, net.image_size, net.image_size, device=device) * 2 - 1
    reset_peak(device)
    step_s, augment_s = [], []
    for i in range(2 + s.train_steps):
        sync(device)
        t0 = time.perf_counter()
        if augment:
            x_in, labels = pipe(x, torch.arange(len(x), device=device), epoch=i)
            cond = {"augment": labels}
        else:
            x_in, cond = x, None
        sync(device)
        t1 = time.perf_counter()
        with autocast(device, True):
            loss = loss_fn(D, x_in, cond=cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            step_s.append(time.perf_counter() - t0)
            augment_s.append(t1 - t0)
    step = statistics.median(step_s)
    detail = f"augmentation {1e3 * statistics.median(augment_s):.2f} ms of the step" if augment else None
    return [{"network": "ddpmpp (EDM config F)", "setting": f"bf16, {'augment p 0.12' if augment else 'no augment'}",
             "batch": s.train_batch, "images_per_s": s.train_batch / step, "ms": 1e3 * step,
             "peak_mib": peak_mib(device), "detail": detail}]


# ------------------------------------------------------------------------------------------------------- sampling
class AutocastDenoiser(Denoiser):
    """``inner`` evaluated under bf16 autocast when ``bf16``, its output in float32."""

    def __init__(self, inner: Denoiser, device: torch.device, bf16: bool) -> None:
        self.inner, self.sde, self.device, self.bf16 = inner, inner.sde, device, bf16

    def __call__(self, x_hat, sigma, cond=None):
        with autocast(self.device, self.bf16):
            return self.inner(x_hat, sigma, cond).float()


def _denoiser(name: str, suite: Suite, bf16: bool):
    """The network's denoiser (ScoreModel's with DSMLoss), its SDE and the network."""
    net, sde, _ = NetConfig(name, tiny=suite.sizes.tiny).build()
    net = net.to(suite.device).eval()
    return AutocastDenoiser(NetConfig.denoiser(net, sde), suite.device, bf16), sde, net


def sampling(suite: Suite) -> list[dict[str, Any]]:
    from lit_score.sampling import EDMSampler, PCSampler

    s, device, rows = suite.sizes, suite.device, []
    for bf16 in (False, True):
        D, sde, net = _denoiser("ncsnpp", suite, bf16)
        shape = (3, NetConfig("ncsnpp", tiny=s.tiny).image_size, NetConfig("ncsnpp", tiny=s.tiny).image_size)
        with torch.no_grad():
            EDMSampler(steps=2).sample(D, sde, shape, range(s.sample_batch), device)  # warm-up
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            result = EDMSampler(steps=s.edm_steps).sample(D, sde, shape, range(s.sample_batch), device)
            sync(device)
            sec = time.perf_counter() - t0
        rows.append({"network": "ncsnpp", "setting": f"EDM Heun {s.edm_steps} levels, {'bf16' if bf16 else 'fp32'}",
                     "batch": s.sample_batch, "nfe": result.nfe, "images_per_s": s.sample_batch / sec,
                     "ms": 1e3 * sec, "peak_mib": peak_mib(device)})
    D, sde, net = _denoiser("ncsnpp", suite, False)
    size = NetConfig("ncsnpp", tiny=s.tiny).image_size
    shape, steps = (3, size, size), 3
    x, t = torch.randn(s.pc_batch, *shape, device=device), torch.full((s.pc_batch,), 0.5, device=device)
    with torch.no_grad():
        D.score(x, t)
        evals = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            D.score(x, t)
            sync(device)
            evals.append(time.perf_counter() - t0)
        sampler = PCSampler("reverse_diffusion", "langevin", snr=0.16, steps=steps, denoise=False)
        sampler.sample(D, sde, shape, range(s.pc_batch), device)
        sync(device)
        t0 = time.perf_counter()
        result = sampler.sample(D, sde, shape, range(s.pc_batch), device)
        sync(device)
        per_step = (time.perf_counter() - t0) / steps
    ev = statistics.median(evals)
    rows.append({"network": "ncsnpp", "setting": "PC step (reverse diffusion + Langevin), fp32", "batch": s.pc_batch,
                 "nfe": result.nfe // steps, "images_per_s": s.pc_batch / per_step, "ms": 1e3 * per_step,
                 "detail": f"network evaluation {1e3 * ev:.1f} ms; step / (2 evaluations) = {per_step / (2 * ev):.3f}"})
    return rows


def ode(suite: Suite) -> list[dict[str, Any]]:
    """Shared vs per-image adaptive steps on the exact score of a Gaussian mixture (VP SDE), on the device."""
    from benchmarks.ode_nfe import mixture
    from lit_score.rng import seeded_prior
    from lit_score.sampling.ode import dopri5, probability_flow
    from lit_score.diffusion.sdes import VPSDE

    s, device, sde = suite.sizes, suite.device, VPSDE()
    dim = math.prod(s.ode_dim)
    mix = mixture(dim)
    mix.means, mix.stds, mix.weights = mix.means.to(device), mix.stds.to(device), mix.weights.to(device)
    field_ = probability_flow(mix.score_fn(sde), sde, (dim,))
    y0 = seeded_prior(sde, range(s.ode_batch), (dim,), device)
    rows = []
    for control in ("batch", "image"):
        sync(device)
        t0 = time.perf_counter()
        sol = dopri5(field_, y0, sde.T, 1e-3, 1e-5, 1e-5, step_control=control)
        sync(device)
        sec = time.perf_counter() - t0
        rows.append({"network": "exact mixture", "setting": f"ODE RK45 1e-5, {control} step", "batch": s.ode_batch,
                     "nfe": int(sol.nfe.max()), "images_per_s": s.ode_batch / sec, "ms": 1e3 * sec,
                     "detail": f"mean NFE {float(sol.nfe.double().mean()):.1f}"})
    return rows


def fid_features(suite: Suite) -> list[dict[str, Any]]:
    from lit_score.metrics import InceptionV3
    from lit_score.metrics.features import random_inception_weights

    s, device = suite.sizes, suite.device
    with tempfile.TemporaryDirectory() as tmp:
        net = InceptionV3(str(random_inception_weights(Path(tmp) / "inception.pth")))
        net.prepare()
    net = net.to(device)
    x = torch.randint(0, 256, (s.fid_batch, 3, 32, 32), dtype=torch.uint8, device=device)
    reps = 1 if s.tiny else 3
    with torch.no_grad():
        net(x)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            feats = net(x)
        sync(device)
    sec = (time.perf_counter() - t0) / reps
    return [{"network": "InceptionV3 (random weights)", "setting": "pool3 features, fp32", "batch": s.fid_batch,
             "images_per_s": s.fid_batch / sec, "ms": 1e3 * sec, "peak_mib": peak_mib(device),
             "detail": f"{feats.shape[1]} features"}]


# ------------------------------------------------------------------------------------------------- training run
def synthetic_cifar(n: int, seed: int = 0) -> torch.Tensor:
    """n smooth random RGB 32x32 images in [-1, 1] (coarse 8x8 noise, bicubic upsampled): CIFAR-10's shape."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    return torch.tanh(torch.nn.functional.interpolate(coarse, size=32, mode="bicubic", align_corners=False))


def training_run(suite: Suite) -> list[dict[str, Any]]:
    """lit-score's own training (lightning.Trainer fitting ScoreModel with EMA) for ``run_seconds``; the loss of the
    first and the last tenth of the steps."""
    from lit_score.data.cached import IndexDataset, keep_batch
    from lit_score.diffusion.losses import DSMLoss

    L, EMA, ScoreModel = lightning_parts()
    quiet_lightning()
    s, device = suite.sizes, suite.device
    torch.manual_seed(0)
    net, sde, reduce_mean = NetConfig("ddpmpp", tiny=s.tiny).build()
    size = NetConfig("ddpmpp", tiny=s.tiny).image_size
    images = synthetic_cifar(4096 if s.tiny else 50_000)
    if size != 32:
        images = torch.nn.functional.interpolate(images, size=size, mode="area")

    class Synthetic(L.LightningDataModule):
        """Indices from the DataLoader, images gathered on the device (as CachedImageDataModule)."""

        def train_dataloader(self):
            return torch.utils.data.DataLoader(IndexDataset(len(images)), batch_size=s.run_batch, shuffle=True,
                                               drop_last=True, collate_fn=keep_batch)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            return images.to(batch.device)[batch] if batch.dtype == torch.long else batch

    images = images.to(device)
    losses: list[torch.Tensor] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    model = ScoreModel(net, sde, loss=DSMLoss(reduce_mean=reduce_mean), lr=2e-4, warmup=100)
    gpu = device.type == "cuda"
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, max_steps=-1, max_epochs=-1,
                        max_time={"seconds": s.run_seconds}, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        precision="bf16-mixed" if gpu else "32-true", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[EMA(rate=0.999), Losses()])
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=Synthetic())
    sec = time.perf_counter() - t0
    values = torch.stack(losses).float().cpu() if losses else torch.zeros(0)
    k = max(1, len(values) // 10)
    first, last = float(values[:k].mean()), float(values[-k:].mean())
    return [{"network": "ddpmpp", "setting": f"lit-score fit, {'bf16-mixed' if gpu else 'fp32'}, "
             f"{s.run_seconds:g} s", "batch": s.run_batch, "images_per_s": len(values) * s.run_batch / sec,
             "ms": 1e3 * sec / max(1, len(values)), "peak_mib": peak_mib(device), "steps": len(values),
             "loss_first": first, "loss_last": last, "loss_fell": last < first,
             "detail": f"{len(values)} steps; loss {first:.3f} (first tenth) -> {last:.3f} (last tenth)"}]


# ---------------------------------------------------------------------------------------------------------- report
COLUMNS = (("section", "section"), ("network", "network"), ("setting", "setting"), ("batch", "batch"),
           ("images/s", "images_per_s"), ("ms", "ms"), ("NFE", "nfe"), ("peak MiB", "peak_mib"),
           ("TFLOP/s", "tflops"), ("MFU", "mfu"), ("detail", "detail"))


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "detail":
        extra = [row.get("detail"), f"compile {row['compile_s']:.0f} s" if "compile_s" in row else None,
                 row.get("skipped"), row.get("error")]
        return "; ".join(e for e in extra if e)
    v = row.get(key)
    if v is None:
        return ""
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k) for _, k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny networks and batches (CI on CPU)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default 480; quick 240)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not in the table")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager with --quick on CPU, where inductor's C++ "
                        "compilation takes minutes: it still traces forward and backward)")
    p.add_argument("--json", default="gpu_benchmark.json")
    a = p.parse_args(argv)
    a.budget = a.budget or (180.0 if a.quick else 480.0)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("benchmarks.gpu: --device cuda but torch sees no GPU; run with --device cpu --quick")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    sizes = Sizes.of(a.quick)
    backend = a.compile_backend or ("aot_eager" if a.quick and device.type == "cpu" else "inductor")
    suite = Suite(device, sizes, a.budget, a.peak_tflops or gpu_bf16_peak_tflops(device), backend)
    big = device.type == "cuda" or not a.quick
    for name in ("ncsnpp", "ddpmpp"):
        for key in ("fp32", "bf16", "bf16 + channels_last"):
            suite.run("train step", 20 if big else 5, lambda n=name, k=key: train_step(suite, n, k))
    suite.run("sampling", 40 if big else 10, lambda: sampling(suite))
    suite.run("ode", 30 if big else 5, lambda: ode(suite))
    suite.run("fid features", 20 if big else 10, lambda: fid_features(suite))
    suite.run("training run", sizes.run_seconds + 20, lambda: training_run(suite))
    for augment in (True, False):
        suite.run("EDM step", 20 if big else 5, lambda a=augment: edm_step(suite, a))
    if not a.no_compile:
        for name in sizes.compile_nets:
            suite.run("train step", 120 if big else 60, lambda n=name: train_step(suite, n, "bf16 + torch.compile"))
    result = {"machine": machine(device), "peak_bf16_tflops": suite.peak_tflops, "quick": a.quick,
              "budget_s": a.budget, "seconds": time.perf_counter() - suite.start, "rows": suite.rows}
    print(table(suite.rows))
    print(f"\n{result['machine']}; dense bf16 peak {suite.peak_tflops or 'unknown (no MFU)'} TFLOP/s; "
          f"{result['seconds']:.0f} s of a {a.budget:.0f} s budget")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
        suite.log(f"wrote {a.json}")
    problems = failures(suite.rows)
    if problems:
        sys.exit("benchmarks.gpu: " + "; ".join(problems))
    return result


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """Sections that raised, and a training run whose loss did not fall (the exit status says so, for CI)."""
    out = [f"{r['section']} failed: {r['error']}" for r in rows if "error" in r]
    out += [f"the training run's loss did not fall ({r['loss_first']:.3f} -> {r['loss_last']:.3f})"
            for r in rows if r.get("loss_fell") is False]
    return out


if __name__ == "__main__":
    main()
