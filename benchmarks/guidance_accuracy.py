"""Do guided samples show the class they were asked for? An independent digit classifier (logistic regression fitted
on real digits only, never on samples) labels ``per_class`` samples of every class of a class-conditional quickstart
model (``experiments/quickstart_cond.yaml``) at each guidance scale; the table gives its accuracy against the labels
asked for (chance: 0.1), beside the classifier's own accuracy on held-out real digits (the ceiling).

    python -m benchmarks.guidance_accuracy runs/quickstart_cond/version_0/checkpoints/last.ckpt --scales 1 2 3 5
    python -m benchmarks.guidance_accuracy CKPT --method ClassifierGuidance --guide CLASSIFIER.ckpt --scales 0 1 3
    python -m benchmarks.guidance_accuracy CKPT --method AutoGuidance --guide EARLIER.ckpt --scales 1 2 3
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def digit_classifier():
    """The classifier, fitted on 1400 real 16x16 digits, and its accuracy on the 397 held out."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from lit_score.data.digits import load_digits_images

    x = load_digits_images(16).numpy().reshape(-1, 256)
    y = load_digits().target
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = order[:1400], order[1400:]
    clf = LogisticRegression(max_iter=5000, C=0.05).fit(x[train], y[train])
    return clf, float((clf.predict(x[held_out]) == y[held_out]).mean())


def accuracy(model, clf, scale: float, method: str, guide: str | None, per_class: int = 100,
             steps: int = 18) -> dict[str, float]:
    """The classifier's accuracy on ``per_class`` samples of each class (seed s asks for class s mod 10) drawn with
    EDM's Heun sampler at ``steps`` levels and guidance ``method`` at ``scale``."""
    from lit_score.diffusion import guidance as g
    from lit_score.sampling import EDMSampler

    kinds = {"ClassifierFreeGuidance": lambda: g.ClassifierFreeGuidance(scale),
             "AutoGuidance": lambda: g.AutoGuidance(guide, scale),
             "ClassifierGuidance": lambda: g.ClassifierGuidance(guide, scale)}
    model.guidance = kinds[method]()
    k = 10  # the digits
    seeds = list(range(per_class * k))
    labels = torch.tensor([s % k for s in seeds])
    start = time.perf_counter()
    images, evaluations = [], 0
    for i in range(0, len(seeds), 250):
        result = model.sample(seeds[i:i + 250], EDMSampler(steps=steps), labels=labels[i:i + 250])
        images.append(((result.samples[:, 0] + 1) / 2).clamp(0, 1))
        evaluations = result.network_evaluations
    x = torch.cat(images).numpy().reshape(len(seeds), -1)
    return {"scale": scale, "accuracy": float((clf.predict(x) == labels.numpy()).mean()),
            "network_evaluations": evaluations, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guidance_accuracy", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    p.add_argument("--method", default="ClassifierFreeGuidance",
                   choices=["ClassifierFreeGuidance", "AutoGuidance", "ClassifierGuidance"])
    p.add_argument("--guide", help="AutoGuidance's guide or ClassifierGuidance's classifier (.ckpt or export)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=18, help="EDM Heun levels (2 steps - 1 NFE)")
    a = p.parse_args(argv)
    if a.method != "ClassifierFreeGuidance" and not a.guide:
        p.error(f"{a.method} needs --guide")
    torch.set_num_threads(1)
    from lit_score.runtime.module import ScoreModel

    model = ScoreModel.load_from_checkpoint(Path(a.checkpoint), map_location="cpu").eval()
    clf, ceiling = digit_classifier()
    print(f"digit classifier: {ceiling:.3f} on held-out real digits; chance 0.1")
    print(f"| {a.method} scale | accuracy | network evaluations per image | time |\n|---|---|---|---|")
    rows = []
    for scale in a.scales:
        r = accuracy(model, clf, scale, a.method, a.guide, a.per_class, a.steps)
        rows.append(r)
        print(f"| {scale:g} | {r['accuracy']:.3f} | {r['network_evaluations']} | {r['seconds']:.0f} s |", flush=True)
    return rows


if __name__ == "__main__":
    main()
