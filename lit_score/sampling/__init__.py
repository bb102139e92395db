"""Samplers: predictor-corrector, probability-flow ODE and the sigma-view fast samplers."""
from lit_score.sampling.base import SAMPLERS, SampleResult, Sampler, seeded_normal

__all__ = ["SAMPLERS", "SampleResult", "Sampler", "seeded_normal", "default_sampler"]


def default_sampler(sde):  # placeholder until the PC sampler lands
    raise NotImplementedError("no sampler is implemented yet")
