"""experiments/profile_relation_kl.py on CPU: the layer's relation loss per impl, the impl:field
syntax, and the profiler range doing nothing without a GPU."""

import json

import numpy as np
import pytest

from experiments import profile_relation_kl as prof


def test_times_each_impl_and_agrees(tmp_path):
    out = tmp_path / "prof.json"
    result = prof.main(
        ["--impls", "xla,reference,xla:fast_exp2", "--B", "1", "--T", "48", "--heads", "2,1"]
        + ["--head_dim", "16", "--out", str(out)]
    )
    rows = result["rows"]
    assert [r["impl"] for r in rows] == ["xla", "reference", "xla:fast_exp2"]
    assert all(r["ms"] > 0 and np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    np.testing.assert_allclose([r["loss"] for r in rows], rows[0]["loss"], rtol=1e-5)
    assert result["causal_pairs"] == 1 * 3 * 48 * 49 / 2
    assert json.loads(out.read_text())["shape"]["heads"] == [2, 1]


def test_a_kernel_that_cannot_run_is_recorded():
    result = prof.main(["--impls", "pallas_gpu,xla", "--B", "1", "--T", "32", "--heads", "1", "--head_dim", "16"])
    assert "error" in result["rows"][0] and "ms" in result["rows"][1]


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        prof.main(["--impls", "xla:bogus"])
    assert "not boolean BlockSizes fields" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prof.main(["--heads", "9,0"])


def test_profiler_range_is_harmless_without_a_profiler():
    with prof.CudaProfilerRange():
        pass
