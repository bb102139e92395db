"""What every sampler is: draws images from a model's denoiser, each image's randomness from its own seed."""
from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.sdes import SDE, bcast
from lit_score.rng import starting_noise


@dataclass
class SampleResult:
    samples: Tensor  # (B, *shape)
    nfe: int  # network evaluations per image (the largest, where images differ)
    nfe_mean: float | None = None  # the mean over images, where images differ (adaptive solvers)
    labels: Tensor | None = None  # (B,) class labels of a conditional model's images
    network_evaluations: int | None = None  # network passes per image, guides included (guidance: up to 2 nfe)


class Sampler(abc.ABC):
    """Base class of samplers; YAMLs choose a subclass by ``class_path``.

    One seed, one starting noise: every sampler starts image i from the same standard normal z_i
    (``start_noise``: the seed's ``lit_score.rng.starting_noise`` unless given), scaled to its first time or noise
    level: x_T = prior std * z (VE: sigma_max z) in the t view, x_hat = sigma_0 z in the sigma view. Samplers that
    add noise later draw it from other streams. Samplers of the same ODE thus agree image by image.
    """

    @abc.abstractmethod
    def sample(self, D: Denoiser, sde: SDE, shape: tuple[int, ...], seeds: Sequence[int] | Tensor,
               device: torch.device | str = "cpu", start_noise: Tensor | None = None) -> SampleResult:
        """Draw len(seeds) samples of per-image ``shape`` from the model whose denoiser is ``D``, image i starting
        from ``start_noise[i]`` (standard normal, (B, *shape)) if given, else from its seed's starting noise."""

    def planned_nfe(self, sde: SDE) -> int | None:
        """Network evaluations per image ``sample`` will take under ``sde``; None when not known in advance."""
        return None


def initial_noise(seeds: Sequence[int] | Tensor, shape: tuple[int, ...], device: torch.device | str,
                  start_noise: Tensor | None = None) -> Tensor:
    """The standard normal z (B, *shape) a sampler starts from: ``start_noise`` if given (on ``device``), else the
    seeds' ``starting_noise``. Every sampler gets its start here."""
    if start_noise is None:
        return starting_noise(seeds, shape, device)
    if tuple(start_noise.shape) != (len(seeds), *shape):
        raise ValueError(f"start_noise must have shape {(len(seeds), *shape)} (one standard normal per seed), "
                         f"got {tuple(start_noise.shape)}")
    return start_noise.to(device=device, dtype=torch.float32)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None, none: str | None = None) -> None:
    """Raise ValueError unless ``value`` is an integer in [low, high] (or None, when ``none`` says what it means)."""
    if value is None and none is not None:
        return
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    valid += f" (or None: {none})" if none is not None else ""
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low
            or (high is not None and value > high)):
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, none: str | None = None) -> None:
    """Raise ValueError unless ``value`` is a number in the interval from ``low`` to ``high`` (open at an end where
    ``*_open``; unbounded where None), or None when ``none`` says what that means."""
    if value is None and none is not None:
        return
    if low is not None and high is not None:
        valid = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        valid = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        valid = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        valid = "a number"
    valid += f" (or None: {none})" if none is not None else ""
    ok = _is_real(value) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if isinstance(value, bool) or value not in choices:  # True == 1: a flag is no order
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def time_vector(t: float | Tensor, x: Tensor) -> Tensor:
    """t as one value per sample of x, on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def denoise(D: Denoiser, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """E[x_0 | x_t] = D(x_t / s(t); sigma(t)), the last step of samplers that end at t > 0."""
    return D(x / bcast(sde.scale(t), x), sde.sigma(t))
