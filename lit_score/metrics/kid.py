"""Kernel Inception Distance (Binkowski et al. 2018) as torch-fidelity defines it: the unbiased MMD^2 with the
cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random equal-size subsets of the two sets."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def polynomial_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 of two equal-size sets (m, d): within-set kernel sums without the diagonal over m(m - 1),
    minus twice the cross sum over m^2, in float64."""
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(f"need two sets of the same shape (m >= 2, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
    return float(within / (m * (m - 1)) - 2 * k_xy.sum() / m ** 2)


def kernel_inception_distance(features1: Tensor, features2: Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """Mean and standard deviation of ``polynomial_mmd2`` over ``subsets`` pairs of subsets of ``subset_size``
    rows, drawn without replacement by ``numpy.random.RandomState(seed)`` (first from ``features1``, then from
    ``features2``, subset by subset): torch-fidelity's ``kid_subsets``, ``kid_subset_size`` and ``rng_seed``."""
    n1, n2 = features1.shape[0], features2.shape[0]
    if features1.dim() != 2 or features2.dim() != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"need features (N1, D) and (N2, D), got {tuple(features1.shape)} and "
                         f"{tuple(features2.shape)}")
    if subsets < 1 or subset_size < 2 or min(n1, n2) < subset_size:
        raise ValueError(f"KID draws {subsets} subsets of {subset_size} rows from sets of {n1} and {n2}; it needs "
                         f"subsets >= 1 and 2 <= subset_size <= both sizes (lower kid_subset_size or keep more "
                         f"features)")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        i1 = torch.from_numpy(rng.choice(n1, subset_size, replace=False))
        i2 = torch.from_numpy(rng.choice(n2, subset_size, replace=False))
        values.append(polynomial_mmd2(features1[i1], features2[i2]))
    return float(np.mean(values)), float(np.std(values))
