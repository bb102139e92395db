"""Counter-based random numbers: every image's noise is a function of its seed and the draw's index only, the same
on any batch, process count or device (Philox4x32-10, Salmon et al. 2011)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 round multipliers (Salmon et al. 2011, Table 2)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments
PHILOX_ROUNDS = 10
# counter word 3: SeededNoise / seeded_normal, starting_noise, lit_score.diffusion.augment, DataSpace.labels_for
NOISE_STREAM, PRIOR_STREAM, AUGMENT_STREAM, LABEL_STREAM = 0, 1, 2, 3


def philox_round_keys(k0: Tensor, k1: Tensor, rounds: int = PHILOX_ROUNDS) -> Tensor:
    """The key words (..., n) of every round stacked as (rounds, ..., 2, n), each round's pair in the order
    `philox4x32_words` uses."""
    keys = []
    for r in range(rounds):
        a, b = (k0 + r * PHILOX_W[0]) & _MASK32, (k1 + r * PHILOX_W[1]) & _MASK32
        keys.append(torch.stack([b, a] if r % 2 == 0 else [a, b], -2))
    return torch.stack(keys)


def philox_multipliers(device: torch.device | str) -> list[Tensor]:
    """The round multipliers (2, 1) in both pair orders, made once per generator (a host-to-device copy)."""
    return [torch.tensor(m, dtype=torch.long, device=device)[:, None] for m in (PHILOX_M, PHILOX_M[::-1])]


def philox4x32_words(x: Tensor, y: Tensor, round_keys: Tensor,
                     mults: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Philox4x32 rounds (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") on int64 tensors
    holding 32-bit words: x = counter words (0, 2) and y = words (3, 1) stacked on dim -2; returns the output words
    in the same layout. The pairs alternate their order each round, so a round is seven batched integer ops."""
    mults = philox_multipliers(x.device) if mults is None else mults
    for r in range(round_keys.shape[0]):
        p = x * mults[r % 2]  # 32 x 32 -> 64 bits; int64 wraps, its bit pattern is the unsigned product
        x, y = ((p >> 32) & _MASK32) ^ y ^ round_keys[r], (p & _MASK32).roll(1, -2)
    if round_keys.shape[0] % 2:
        x, y = x.roll(1, -2), y.roll(1, -2)
    return x, y


def philox4x32(ctr: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor],
               rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-R of counter words (c0, c1, c2, c3) and key words (k0, k1), 1-D int64 tensors in [0, 2^32)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*ctr)
    x, y = philox4x32_words(torch.stack([c0, c2], -2), torch.stack([c3, c1], -2),
                            philox_round_keys(*torch.broadcast_tensors(*key), rounds=rounds))
    return x[..., 0, :], y[..., 1, :], x[..., 1, :], y[..., 0, :]


def _seed_tensor(seeds: Sequence[int] | Tensor, device: torch.device | str | None) -> Tensor:
    if isinstance(seeds, Tensor):
        if seeds.dim() != 1 or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise ValueError(f"seeds must be a 1-D integer tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
        s = seeds.to(device=device if device is not None else seeds.device, dtype=torch.long)
    else:
        s = torch.tensor(list(seeds), dtype=torch.long, device=device if device is not None else "cpu")
    if s.numel() == 0:
        raise ValueError("need at least one seed to sample")
    return s


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _Philox:
    """Counter-based standard normals: image i, draw `step`, element j is a function of (seeds[i], step, j) only.

    Key = the seed's two 32-bit halves; counter = (c, step mod 2^32, step >> 32, stream) for c < n4 = ceil(n / 4).
    Words (0, 1) and (2, 3) of counter c are two float32 Box-Muller pairs (r_0, theta_0), (r_1, theta_1); element
    q n4 + c is r_0 cos theta_0, r_1 cos theta_1, r_0 sin theta_0, r_1 sin theta_1 for q = 0, 1, 2, 3.
    """

    def __init__(self, seeds: Sequence[int] | Tensor, shape: tuple[int, ...], device: torch.device | str | None,
                 dtype: torch.dtype) -> None:
        s = _seed_tensor(seeds, device)
        self.round_keys = philox_round_keys((s & _MASK32)[:, None], ((s >> 32) & _MASK32)[:, None])  # (R, B, 2, 1)
        self.shape, self.dtype, self.numel, self.batch = tuple(shape), dtype, _numel(shape), len(s)
        self.counter = torch.arange((self.numel + 3) // 4, dtype=torch.long, device=s.device)
        self.mults = philox_multipliers(s.device)

    def draw(self, step: int, stream: int = NOISE_STREAM) -> Tensor:
        """Draw ``step`` of every seed; device-side only (no host-to-device copy, no synchronisation)."""
        if not 0 <= step < 2**64:
            raise ValueError(f"the noise step must be in [0, 2^64), got {step}")
        x = torch.stack([self.counter, torch.full_like(self.counter, step >> 32)])  # words (0, 2)
        y = torch.stack([self.counter.new_full((1,), stream), self.counter.new_full((1,), step & _MASK32)])  # (3, 1)
        x, y = philox4x32_words(x, y, self.round_keys, self.mults)
        # u = (2k + 1) 2^-24, k the top 23 bits: exact in float32, never 0 or 1; the angle from the top 24 bits
        u = ((x >> 8) | 1).to(torch.float32) * 2.0**-24
        theta = (y.roll(1, -2) >> 8).to(torch.float32) * (2 * torch.pi * 2.0**-24)
        r = torch.sqrt(torch.log(u) * -2.0)
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], -2).reshape(self.batch, -1)
        return z[:, :self.numel].reshape(self.batch, *self.shape).to(self.dtype)


def seeded_normal(seeds: Sequence[int] | Tensor, shape: tuple[int, ...], step: int = 0,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                  stream: int = NOISE_STREAM) -> Tensor:
    """Standard normal noise (B, *shape) where row i depends only on (seeds[i], step).

    The same seed gives the same image whatever the batch or the number of processes it is drawn in: element j of
    row i is a counter-based draw, Philox4x32-10 of (seed, step, j) on the target device and a float32 Box-Muller
    transform. The 32-bit words are identical on every device; the float32 transcendental functions of CPU and
    CUDA may differ in the last bit. Values are float32-accurate whatever ``dtype``. ``stream`` (counter word 3)
    keeps the draws of different uses apart.
    """
    return _Philox(seeds, shape, device, dtype).draw(int(step), int(stream))


class SeededNoise:
    """Successive draws of per-image seeded normal noise: draw k of image i is seeded_normal(seeds[i], step=k),
    for k = ``step``, ``step`` + 1, ..."""

    def __init__(self, seeds: Sequence[int] | Tensor, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, step: int = 0) -> None:
        self._philox = _Philox(seeds, shape, device, dtype)
        self.shape, self.device, self.dtype, self.step = tuple(shape), device, dtype, int(step)

    def __call__(self) -> Tensor:
        z = self._philox.draw(self.step)
        self.step += 1
        return z


def starting_noise(seeds: Sequence[int] | Tensor, shape: tuple[int, ...],
                   device: torch.device | str = "cpu") -> Tensor:
    """The standard normal z (B, *shape) that every sampler starts from, x = (prior std or sigma_0) z: draw 0 of
    each seed's prior stream, which no SeededNoise / seeded_normal draw uses. One seed, one starting noise, for
    every sampler."""
    return _Philox(seeds, shape, device, torch.float32).draw(0, PRIOR_STREAM)


def seeded_prior(sde, seeds: Sequence[int] | Tensor, shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> Tensor:
    """One sample of p_T per seed: the seed's ``starting_noise`` mapped by ``sde.prior_from_noise``."""
    return sde.prior_from_noise(starting_noise(seeds, shape, device))
