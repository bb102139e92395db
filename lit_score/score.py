"""The score s_theta(x, t) from a noise-conditional network and its SDE."""
from __future__ import annotations

from torch import Tensor, nn

from lit_score.sdes import SDE, ScoreFn


def get_score_fn(sde: SDE, net: nn.Module, discrete: bool = False) -> ScoreFn:
    """s(x, t) = sde.score_from_output(net(x, sde.noise_label(t)), t); ``discrete`` for networks trained with a
    discrete objective (SMLD, DDPM), conditioned on discrete levels (official get_score_fn, continuous=False)."""

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        if discrete:
            return sde.score_from_output(net(x, sde.noise_label(t, True)), t, True)
        return sde.score_from_output(net(x, sde.noise_label(t)), t)

    return score_fn
