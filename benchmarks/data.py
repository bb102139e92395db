"""Does the data pipeline keep up with training? ``python -m benchmarks.data [--num_images 4096 ...]``

Writes a synthetic CIFAR-10-sized dataset (32x32 RGB PNGs) as an image folder and as a ``save_to_disk`` Arrow
dataset, measures the images/s ``ImageDataModule``'s training DataLoader delivers from each (decoding, flips and
scaling in worker processes), and the images/s the default NCSN++ (the CIFAR-10 NCSN++ cont. network) consumes
in a training step (forward + backward of the VE SDE denoising score-matching loss) on this machine's CPU.
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


def delivered_images_per_second(path: Path, batch_size: int, num_workers: int, epochs: int = 2) -> float:
    """Images/s of the training DataLoader over ``epochs`` epochs after a warm-up epoch (worker start-up)."""
    from lit_score.data import ImageDataModule

    datamodule = ImageDataModule(path=str(path), batch_size=batch_size, num_workers=num_workers, val_size=0,
                                 random_flip=True, centered=True)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += len(batch)
    return count / (time.perf_counter() - start)


def consumed_images_per_second(batch_size: int, steps: int) -> float:
    """Images/s of NCSN++ (default, CIFAR-10) training steps (loss, backward, Adam) on CPU, after one warm-up step."""
    from lit_score.module import ScoreModel
    from lit_score.networks import NCSNpp
    from lit_score.sdes import VESDE

    model = ScoreModel(NCSNpp(), VESDE(sigma_max=50.0), loss="dsm")
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
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_png_folder(Path(tmp) / "png", args.num_images)
        arrow = write_arrow(folder, Path(tmp) / "arrow")
        delivered = {
            "PNG folder": delivered_images_per_second(folder, args.batch_size, args.num_workers),
            "Arrow (save_to_disk)": delivered_images_per_second(arrow, args.batch_size, args.num_workers),
        }
    consumed = consumed_images_per_second(args.train_batch_size, args.train_steps)
    print(f"\n{args.num_images} images 32x32 RGB, DataLoader batch {args.batch_size}, {args.num_workers} workers; "
          f"NCSN++ step batch {args.train_batch_size}, {torch.get_num_threads()} threads, CPU")
    print(f"{'source':<22}{'delivered img/s':>17}{'consumed img/s':>16}{'ratio':>9}")
    for name, rate in delivered.items():
        print(f"{name:<22}{rate:>17.0f}{consumed:>16.1f}{rate / consumed:>8.0f}x")


if __name__ == "__main__":
    main()
