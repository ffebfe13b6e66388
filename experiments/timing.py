"""One way to time a device function for the benchmarks in experiments/."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, budget: float = 1.0, max_reps: int = 30) -> float:
    """Median seconds per call of `fn(*args)`; compile and warm-up excluded. Each sample runs the
    call enough times back to back for >= ~20 ms of device work; about `budget` seconds of samples,
    3 to `max_reps` of them."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(0.02 / est))
    reps = int(min(max_reps, max(3, budget / (est * inner))))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / inner)
    return statistics.median(samples)
