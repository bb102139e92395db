"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), from classifier logits."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_score.metrics.features import InceptionV3


class InceptionScore:
    """IS of ``num_samples`` logits fed in order, over ``splits`` contiguous parts (part i holds rows
    i N / splits .. (i + 1) N / splits - 1, as the original code and torch-fidelity with ``samples_shuffle=False``),
    in float64 and constant memory: per part only n, sum_x p(y|x) and sum_x sum_y p log p are kept, since
    E_x KL(p(y|x) || p(y)) = E_x sum_y p log p - sum_y p(y) log p(y) with p(y) = E_x p(y|x)."""

    def __init__(self, num_samples: int, splits: int = 1) -> None:
        if splits < 1 or num_samples < splits:
            raise ValueError(f"need num_samples >= splits >= 1, got {num_samples} samples and {splits} splits")
        self.num_samples, self.splits = num_samples, splits
        self.bounds = [i * num_samples // splits for i in range(splits + 1)]
        self.seen = 0
        self.marginal: list[Tensor | None] = [None] * splits
        self.neg_entropy = [0.0] * splits

    def update(self, logits: Tensor) -> None:
        if logits.dim() != 2 or self.seen + logits.shape[0] > self.num_samples:
            raise ValueError(f"expected logits (B, K) and {self.num_samples} rows in all, got {tuple(logits.shape)} "
                             f"after {self.seen}")
        log_p = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        start = self.seen
        for i in range(self.splits):
            lo, hi = max(self.bounds[i], start), min(self.bounds[i + 1], start + log_p.shape[0])
            if lo >= hi:
                continue
            part = log_p[lo - start:hi - start]
            p = part.exp()
            total = p.sum(0)
            self.marginal[i] = total if self.marginal[i] is None else self.marginal[i] + total
            self.neg_entropy[i] += float((p * part).sum())
        self.seen += log_p.shape[0]

    def compute(self) -> tuple[float, float]:
        """Mean and (population) standard deviation over the splits."""
        if self.seen != self.num_samples:
            raise ValueError(f"Inception Score of {self.num_samples} samples got {self.seen}")
        scores = []
        for i in range(self.splits):
            n = self.bounds[i + 1] - self.bounds[i]
            q = self.marginal[i] / n
            scores.append(math.exp(self.neg_entropy[i] / n - float((q * q.log()).sum())))
        mean = sum(scores) / len(scores)
        std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
        return mean, std


def inception_score(logits: Tensor, splits: int = 1) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` contiguous parts of exp(mean KL(p(y|x) || p(y))), in float64.
    One split (all samples at once) is TF-GAN's ``classifier_score_from_logits``, which score_sde used; ten splits
    is the original convention and torch-fidelity's default."""
    if logits.dim() != 2:
        raise ValueError(f"need logits (N, K), got {tuple(logits.shape)}")
    score = InceptionScore(logits.shape[0], splits)
    score.update(logits)
    return score.compute()


class InceptionV3Logits(InceptionV3):
    """The 1008 class logits of the TensorFlow FID Inception (torch-fidelity's port), from a local weights file.

    Args:
        weights_path: the torch-fidelity Inception weights (see ``lit_score.metrics.InceptionV3``).
        unbiased: logits without the final layer's bias, as the original Inception Score code and torch-fidelity's
            ISC compute them; False for the biased logits.
    """

    num_features = 1008

    def __init__(self, weights_path: str | None = None, unbiased: bool = True) -> None:
        super().__init__(weights_path)
        self.unbiased = unbiased

    def prepare(self) -> None:
        if self.net is not None:
            return
        if not self.weights_path.is_file():
            super().prepare()  # raises, saying where the weights go
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        output = "logits_unbiased" if self.unbiased else "logits"
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", [output],
                                               feature_extractor_weights_path=str(self.weights_path))
        self.eval()
