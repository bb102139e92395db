"""Does EDM's augmentation leak into the samples? On the quickstart digits, half of all training images are x-flipped
(``xflip: 1e8``); a model that uses its augmentation labels draws upright digits when sampled with zero labels, one that
ignores them draws half of them flipped. A flip detector (logistic regression on upright and flipped real digits,
never on samples) estimates the flipped fraction of each checkpoint's samples, corrected for its own errors:
leak = (called flipped - false-positive rate) / (true-positive rate - false-positive rate), 0 for no leak, 0.5 for a
model that ignores its labels.

    python -m benchmarks.augment_leak runs/quickstart_edm/version_0/checkpoints/last.ckpt ... [--num-samples 500]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def flip_detector():
    """The detector, fitted on 1200 real digits and their x-flips, with its rates of calling the 597 held-out
    upright and flipped digits flipped."""
    from sklearn.linear_model import LogisticRegression

    from lit_score.data.digits import load_digits_images

    x = load_digits_images(16).numpy()[:, 0]
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = x[order[:1200]], x[order[1200:]]
    features = np.concatenate([train, train[:, :, ::-1]]).reshape(2 * len(train), -1)
    labels = np.r_[np.zeros(len(train)), np.ones(len(train))]
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(features, labels)
    upright = float(clf.predict(held_out.reshape(len(held_out), -1)).mean())
    flipped = float(clf.predict(held_out[:, :, ::-1].reshape(len(held_out), -1)).mean())
    return clf, upright, flipped


def leak(ckpt: str | Path, num_samples: int = 500, detector=None) -> dict[str, float]:
    """The flipped fraction of ``num_samples`` samples (seeds 0, 1, ...; the checkpoint's sampler and EMA weights)."""
    from lit_score.runtime.module import ScoreModel

    clf, upright, flipped = detector or flip_detector()
    model = ScoreModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    images = ((model.sample(list(range(num_samples))).samples[:, 0] + 1) / 2).clamp(0, 1).numpy()
    called = float(clf.predict(images.reshape(num_samples, -1)).mean())
    return {"called_flipped": called, "leak": (called - upright) / (flipped - upright),
            "detector_upright": upright, "detector_flipped": flipped}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.augment_leak", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--num-samples", type=int, default=500)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    detector = flip_detector()
    print(f"detector: held-out upright called flipped {detector[1]:.3f}, flipped {detector[2]:.3f}")
    print("| checkpoint | called flipped | leak |\n|---|---|---|")
    for ckpt in a.checkpoints:
        r = leak(ckpt, a.num_samples, detector)
        print(f"| {ckpt} | {r['called_flipped']:.3f} | {r['leak']:.3f} |")


if __name__ == "__main__":
    main()
