"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), from classifier logits."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_score.metrics.features import InceptionV3


def inception_score(logits: Tensor, splits: int = 1) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` contiguous, equal parts of exp(mean KL(p(y|x) || p(y))), in
    float64. One split (all samples at once) is TF-GAN's ``classifier_score_from_logits``, which score_sde used;
    ten splits is the original convention."""
    if logits.dim() != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"need logits (N, K) with N >= splits >= 1, got {tuple(logits.shape)} and {splits} splits")
    log_p = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, 0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return mean, std


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
