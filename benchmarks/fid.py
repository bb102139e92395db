"""``python -m benchmarks.fid``: memory and throughput of the FID / KID / IS statistics at CPU-size extraction.

The statistics stream: n, sum x and sum x x^T in float64 (constant in N), IS from per-split sums, KID from at most
``kid_features`` kept vectors; the table sets these against storing every feature vector, and measures the resident
memory while streaming N synthetic 2048-d vectors, and the throughput of each feature network and of the update.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from lit_score.metrics.inception_score import InceptionScore
from lit_score.metrics import FeatureStatistics, InceptionV3, RandomConvFeatures, random_inception_weights


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images_per_second(network, batch: int, size: int, rounds: int) -> float:
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    network(x)  # warm-up (and weights loading)
    start = time.perf_counter()
    for _ in range(rounds):
        network(x)
    return batch * rounds / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fid", description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=20000,
                   help="synthetic 2048-d vectors streamed (N; a multiple of 4 * batch)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--inception-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, n, kid_features = 2048, args.num_samples, 10000

    before = rss_mb()
    stats, score = FeatureStatistics(d, sync_on_compute=False), InceptionScore(n, 10)
    g = torch.Generator().manual_seed(0)
    start, growth = time.perf_counter(), {}
    for i in range(0, n, args.batch):
        m = min(args.batch, n - i)
        stats.update(torch.randn(m, d, generator=g))
        score.update(torch.randn(m, 1008, generator=g))
        if i + m in (n // 4, n):
            growth[i + m] = rss_mb() - before
    stats.compute()
    update_rate = n / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        inception = InceptionV3(str(random_inception_weights(Path(tmp) / "inception.pth")))
        rates = {"RandomConvFeatures(64), 32x32": images_per_second(RandomConvFeatures(64), 64, 32, 5),
                 "InceptionV3 (random weights), 32x32 -> 299x299":
                     images_per_second(inception, args.inception_batch, 32, 2)}

    mib = 1 / 2 ** 20
    print("| memory (per rank) | MiB |\n|---|---:|")
    print(f"| float64 sums n, sum x, sum x x^T (D={d}), any N | {(1 + d + d * d) * 8 * mib:.1f} |")
    print(f"| IS accumulators, 10 splits x 1008 classes, any N | {10 * 1009 * 8 * mib:.2f} |")
    print(f"| KID: kept features, {kid_features} x {d} float32 (samples; as many reference) | "
          f"{kid_features * d * 4 * mib:.1f} |")
    print(f"| for comparison: every feature stored, N=50000, float64 | {50000 * d * 8 * mib:.1f} |")
    for count, mb in growth.items():
        print(f"| measured peak-RSS growth after streaming {count} vectors (batches of {args.batch}) | {mb:.1f} |")
    print(f"\n| throughput ({args.threads} thread(s), CPU) | per second |\n|---|---:|")
    print(f"| FeatureStatistics + IS update, 2048-d vectors | {update_rate:.0f} |")
    for name, rate in rates.items():
        print(f"| {name} images | {rate:.1f} |")


if __name__ == "__main__":
    main()
