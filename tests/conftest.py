"""Fixtures shared by test modules."""
import importlib
import os

import pytest
import torch

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.sdes import bcast
from lit_score.metrics import InceptionV3, RandomConvFeatures, random_inception_weights


IN_CI = os.environ.get("CI") == "true"


def null_tolerance(mix, n: int) -> float:
    """Three times the largest |energy distance| between 10 pairs of independent exact sample sets of size n of the
    mixture ``mix``: the level below which a sampler's energy distance to exact samples is indistinguishable."""
    from benchmarks.distances import energy_distance

    null = [energy_distance(mix.sample(n, torch.Generator().manual_seed(1000 + 2 * k)),
                            mix.sample(n, torch.Generator().manual_seed(1001 + 2 * k))) for k in range(10)]
    return 3 * max(abs(v) for v in null)


class ScoreDenoiser(Denoiser):
    """A model given by an analytic score function of (x, t) under ``sde``: the score-view samplers and the likelihood
    call it as it is; D follows from it through the sigma view, D(x_hat; sigma) = x_hat + s sigma^2 score(s x_hat, t)
    with t = t(sigma), s = s(t) (Tweedie's formula solved for D)."""

    def __init__(self, score_fn, sde) -> None:
        self.score_fn, self.sde = score_fn, sde

    def __call__(self, x_hat, sigma, cond=None):
        t = self.sde.t_from_sigma(sigma)
        s = bcast(self.sde.scale(t), x_hat)
        return x_hat + bcast(sigma, x_hat) ** 2 * s * self.score_fn(s * x_hat, t)

    def score(self, x, t, cond=None):
        return self.score_fn(x, t)


class Spy(Denoiser):
    """``inner`` recording every evaluation, of D and of the score alike: (input dtype, noise level or time dtype)."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner, self.sde, self.calls = inner, inner.sde, []

    def __call__(self, x_hat, sigma, cond=None):
        self.calls.append((x_hat.dtype, sigma.dtype))
        return self.inner(x_hat, sigma, cond)

    def score(self, x, t, cond=None):
        self.calls.append((x.dtype, t.dtype))
        return self.inner.score(x, t, cond)


def require(module: str):
    """An optional test dependency (pyproject's dev extras): skipped where it is missing, a failure under CI=true."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (see pyproject's dev extras)")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is many times faster than several on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 architecture with random weights (seed 0), saved where InceptionV3 reads it:
    the published weights cannot be downloaded here, and the real network, resize and 2048-d pool3 run on these."""
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth", seed=0)


@pytest.fixture(params=["random_conv", "inception"])
def feature_network(request):
    """A factory of the feature network under test: the small stand-in, or InceptionV3 on the random weights file.
    Inception on CPU is slow (299x299): tests parametrized with this keep to a few images."""
    if request.param == "random_conv":
        return lambda: RandomConvFeatures(num_features=8, width=4, seed=0)
    path = request.getfixturevalue("inception_weights")
    return lambda: InceptionV3(str(path))
