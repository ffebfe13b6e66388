"""Intervals of accuracy cells (lard_jax.evaluation.stats) and their use by evaluate_synthetic."""

import numpy as np
import pytest

from lard_jax.evaluation import stats, synthetic
from lard_jax.tokenizer import ByteTokenizer


def test_wilson_matches_published_values():
    # 8 of 10: the Wilson 95% interval is (0.4902, 0.9433) (Wilson 1927; Newcombe 1998, table I style)
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = stats.wilson_interval(0, 100)  # no success: lower bound 0, upper ~ z^2 / (n + z^2)
    assert lo == 0.0 and hi == pytest.approx(stats.Z95**2 / (100 + stats.Z95**2), rel=1e-9)
    assert stats.wilson_interval(0, 0) == [0.0, 1.0]
    with pytest.raises(ValueError, match="outside"):
        stats.wilson_interval(11, 10)


def test_wilson_width_shrinks_like_one_over_sqrt_n():
    w = [np.diff(stats.wilson_interval(n // 2, n))[0] for n in (100, 400)]
    assert w[1] == pytest.approx(w[0] / 2, rel=0.02)  # 4x the prompts: half the width
    assert 0.18 < w[0] < 0.21  # +-~0.1 at n=100, p=0.5: why a cell needs >= 100 prompts


def test_interval_picks_wilson_for_binary_and_bootstrap_for_fractions():
    rng = np.random.default_rng(1)
    binary = (rng.random(120) < 0.3).astype(float)
    assert stats.interval(binary) == stats.wilson_interval(binary.sum(), binary.size)
    frac = rng.integers(0, 5, size=200) / 4.0  # e.g. NIAH multi-value: share of 4 values found
    lo, hi = stats.interval(frac)
    assert lo < frac.mean() < hi
    # the bootstrap's width is close to the normal approximation's for n = 200
    normal = 2 * stats.Z95 * frac.std(ddof=1) / np.sqrt(frac.size)
    assert hi - lo == pytest.approx(normal, rel=0.15)
    assert stats.interval(frac) == [lo, hi]  # reproducible (fixed seed)


def test_evaluate_synthetic_reports_counts_and_intervals():
    tok = ByteTokenizer()
    calls = []

    def generate(prompt, max_new):  # answers right on odd calls only
        calls.append(1)
        return tok.encode("1234567" if len(calls) % 2 else "no", add_bos=False)[:max_new]

    out = synthetic.evaluate_synthetic(generate, tok, "passkey", [512], [0.2, 0.8], 5, seed=0, progress=False)
    assert out["by_length_n"] == {512: 10}
    lo, hi = out["by_length_ci"][512]
    assert 0.0 <= lo <= out["by_length"][512] <= hi <= 1.0
    k = round(out["by_length"][512] * 10)
    assert [lo, hi] == stats.wilson_interval(k, 10)
