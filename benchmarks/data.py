"""Does the data pipeline keep up with training? ``python -m benchmarks.data [--num_images 4096 ...]``

Writes a synthetic CIFAR-10-sized dataset (32x32 RGB PNGs) as an image folder and as a ``save_to_disk`` Arrow
dataset, measures the images/s ``ImageDataModule``'s training DataLoader delivers from each (decoding, flips and
scaling in worker processes), and the images/s the default NCSN++ (the CIFAR-10 NCSN++ cont. network) consumes
in a training step (forward + backward of the VE SDE denoising score-matching loss) on this machine's CPU, or the
images/s a step of ``--step_ms`` milliseconds consumes (e.g. a GPU's). ``CachedImageDataModule`` (uint8 tensor, indices
from the DataLoader, flips and scaling on the device) is measured beside the worker pipeline.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_png_folder(folder: Path, num_images: int, size: int = 32, seed: int = 0) -> Path:
    """``num_images`` smooth random RGB images (like natural images, PNG compresses them) in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        coarse = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:06d}.png")
    return folder


def write_arrow(folder: Path, target: Path) -> Path:
    """The image folder as an Arrow dataset (image bytes embedded), written with ``save_to_disk``."""
    import datasets

    datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").save_to_disk(str(target))
    return target


def delivered_images_per_second(path: Path, batch_size: int, num_workers: int, epochs: int = 2,
                                cached: bool = False, device: str = "cpu") -> float:
    """Images/s of the training DataLoader over ``epochs`` epochs after a warm-up epoch (worker start-up); with
    ``cached``, of CachedImageDataModule, its batches augmented on ``device`` as a Trainer would."""
    from lit_score.data import CachedImageDataModule, ImageDataModule

    kind = CachedImageDataModule if cached else ImageDataModule
    datamodule = kind(path=str(path), batch_size=batch_size, num_workers=num_workers, val_size=0,
                      random_flip=True, centered=True, **({"cache": False} if cached else {}))
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()

    def epoch(index: int) -> int:
        count = 0
        for batch in loader:
            if cached:
                batch = datamodule.serve(batch.to(device, non_blocking=True), index)
            count += len(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return count

    epoch(0)
    count, start = 0, time.perf_counter()
    for e in range(epochs):
        count += epoch(e + 1)
    return count / (time.perf_counter() - start)


def consumed_images_per_second(batch_size: int, steps: int) -> float:
    """Images/s of NCSN++ (default, CIFAR-10) training steps (loss, backward, Adam) on CPU, after one warm-up step."""
    from lit_score.runtime.module import ScoreModel
    from lit_score.networks import NCSNpp
    from lit_score.diffusion.sdes import VESDE

    model = ScoreModel(NCSNpp(), VESDE(sigma_max=50.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.rand(batch_size, 3, 32, 32)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.compute_loss(x).backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=128, help="DataLoader batch size")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--train_batch_size", type=int, default=8, help="batch of the timed NCSN++ step")
    parser.add_argument("--train_steps", type=int, default=2)
    parser.add_argument("--step_ms", type=float, default=None,
                        help="consumption = batch_size images per step of this many ms (e.g. a GPU step; default: "
                             "measure the NCSN++ step here)")
    parser.add_argument("--device", default="cpu", help="where CachedImageDataModule augments")
    args = parser.parse_args(argv)
    print(format_rows(data_rows(args.num_images, args.batch_size, args.num_workers, args.train_batch_size,
                                args.train_steps, args.step_ms, args.device)))


def data_rows(num_images: int = 4096, batch_size: int = 128, num_workers: int = 2, train_batch_size: int = 8,
              train_steps: int = 2, step_ms: float | None = None, device: str = "cpu",
              consumed_per_s: float | None = None, consumer: str = "") -> list[dict]:
    """Delivered images/s of each source, the images/s a step consumes (measured here, ``batch_size`` per
    ``step_ms``, or ``consumed_per_s`` from ``consumer``), and their ratio."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_png_folder(Path(tmp) / "png", num_images)
        arrow = write_arrow(folder, Path(tmp) / "arrow")
        delivered = {
            "PNG folder, workers": delivered_images_per_second(folder, batch_size, num_workers),
            "Arrow (save_to_disk), workers": delivered_images_per_second(arrow, batch_size, num_workers),
            f"cached uint8, augmented on {device}": delivered_images_per_second(arrow, batch_size, num_workers,
                                                                              cached=True, device=device),
        }
    if consumed_per_s is not None:
        consumed, step = consumed_per_s, consumer
    elif step_ms is None:
        consumed, step = consumed_images_per_second(train_batch_size, train_steps), "NCSN++ step on this CPU"
    else:
        consumed, step = batch_size / (step_ms / 1e3), f"{batch_size} images per {step_ms:g} ms step"
    return [{"source": name, "delivered": rate, "consumed": consumed, "ratio": rate / consumed, "step": step,
             "num_images": num_images, "batch_size": batch_size, "num_workers": num_workers,
             "threads": torch.get_num_threads()} for name, rate in delivered.items()]


def format_rows(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"{r0['num_images']} images 32x32 RGB, DataLoader batch {r0['batch_size']}, {r0['num_workers']} workers, "
             f"{r0['threads']} threads; consumption: {r0['step']}",
             "| source | delivered img/s | consumed img/s | served / consumed |", "|---|---:|---:|---:|"]
    lines += [f"| {r['source']} | {r['delivered']:.0f} | {r['consumed']:.1f} | {r['ratio']:.1f}x |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
