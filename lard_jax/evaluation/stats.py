"""95% intervals for accuracy cells: how far a mean over n prompts can be trusted.

`wilson_interval(k, n)`: the Wilson score interval of k successes in n trials (binary cells:
passkey, NIAH single, cloze). `bootstrap_interval(scores)`: the percentile bootstrap of the mean
(cells whose per-prompt score is a fraction, e.g. NIAH multi-value's share of values found).
`interval(scores)` picks Wilson when every score is 0 or 1, else the bootstrap. Intervals are
[lo, hi] lists of floats (JSON-ready).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["wilson_interval", "bootstrap_interval", "interval", "Z95"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(k: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval for k successes of n (n = 0: [0, 1], nothing is known)."""
    n = int(n)
    if n <= 0:
        return [0.0, 1.0]
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k} successes outside [0, n={n}]")
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends where rounding would leave 1e-18
    hi = 1.0 if k == n else min(1.0, centre + half)
    return [lo, hi]


def bootstrap_interval(
    scores: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of the mean of `scores` (fixed seed: reproducible)."""
    x = np.asarray(scores, np.float64)
    if x.size == 0:
        return [0.0, 1.0]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


def interval(scores: Sequence[float]) -> list[float]:
    """Wilson for 0/1 scores, the bootstrap for fractional ones."""
    x = np.asarray(scores, np.float64)
    if x.size and np.all((x == 0) | (x == 1)):
        return wilson_interval(float(x.sum()), int(x.size))
    return bootstrap_interval(x)
