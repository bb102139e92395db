"""Controllable generation with the PC sampler: inpainting and colorization (Song et al. 2021, appendix I.2).

After every predictor-corrector step the known part of x_t is replaced by a fresh sample of p_0t(x_t | data),
in the coordinates where it is known (the pixels for inpainting, a decoupled grayscale channel for colorization).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_score.sampling.base import SampleResult, initial_noise

from lit_score.rng import SeededNoise
from lit_score.sampling.pc import PCSampler
from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.sdes import SDE

Transform = Callable[[Tensor], Tensor]


def _replace_known(sde: SDE, data: Tensor, mask: Tensor, noise: Callable[[], Tensor], to: Transform,
                   back: Transform):
    def project(x: Tensor, x_mean: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = sde.marginal_prob(data, t)
        known = mean + std.reshape(-1, *[1] * (data.dim() - 1)) * noise()
        x = back(to(x) * (1 - mask) + to(known) * mask)
        x_mean = back(to(x_mean) * (1 - mask) + to(mean) * mask)
        return x, x_mean

    return project


def inpaint(sampler: PCSampler, D: Denoiser, sde: SDE, data: Tensor, mask: Tensor,
            seeds: Sequence[int] | Tensor) -> SampleResult:
    """Fill in where ``mask`` is 0, keeping ``data`` where it is 1 (mask broadcasts against data (B, ...))."""
    if len(seeds) != data.shape[0]:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {data.shape[0]} images")
    mask = torch.broadcast_to(mask.to(data), data.shape)
    shape = tuple(data.shape[1:])
    noise = SeededNoise([int(s) + 2**32 for s in seeds], shape, data.device)
    x = sde.prior_from_noise(initial_noise(seeds, shape, data.device))  # the seeds' unconditional start
    x = x * (1 - mask) + data * mask
    identity = lambda v: v  # noqa: E731
    return sampler.sample(D, sde, shape, seeds, data.device, x_init=x,
                          project=_replace_known(sde, data, mask, noise, identity, identity))


def decoupling_matrix(channels: int = 3) -> Tensor:
    """An orthogonal matrix whose first column is (1, ..., 1) / sqrt(C): coordinate 0 is the (scaled) grayscale."""
    first = torch.full((channels, 1), channels**-0.5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([first, torch.eye(channels, dtype=torch.float64)[:, 1:]], 1))
    return q * torch.sign(q[0, 0])


def colorize(sampler: PCSampler, D: Denoiser, sde: SDE, gray: Tensor, seeds: Sequence[int] | Tensor,
             channels: int = 3) -> SampleResult:
    """Colour images (B, C, ...) whose channel mean is ``gray`` (B, 1, ...)."""
    if gray.dim() < 2 or gray.shape[1] != 1:
        raise ValueError(f"gray must have one channel (B, 1, ...), got shape {tuple(gray.shape)}")
    if len(seeds) != gray.shape[0]:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {gray.shape[0]} images")
    M = decoupling_matrix(channels).to(gray)
    to = lambda v: torch.einsum("bc...,cd->bd...", v, M)  # noqa: E731
    back = lambda v: torch.einsum("bd...,cd->bc...", v, M)  # noqa: E731
    data = gray.expand(-1, channels, *gray.shape[2:])
    mask = torch.zeros_like(data)
    mask[:, 0] = 1
    shape = tuple(data.shape[1:])
    noise = SeededNoise([int(s) + 2**32 for s in seeds], shape, gray.device)
    x = sde.prior_from_noise(initial_noise(seeds, shape, gray.device))
    x = back(to(x) * (1 - mask) + to(data) * mask)
    return sampler.sample(D, sde, shape, seeds, gray.device, x_init=x,
                          project=_replace_known(sde, data, mask, noise, to, back))
