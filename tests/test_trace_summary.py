"""experiments/trace_summary.py: device time per step by kind and kernel from jax.profiler traces --
a synthetic GPU-shaped trace of known durations, and a real CPU profile written by the bench."""

import gzip
import json

import pytest

from experiments import bench_restore_step as bench
from experiments import trace_summary


def _write_trace(path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_device_kernels_are_summed_per_step_and_folded_into_kinds(tmp_path):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "XLA Ops"}},
    ]
    kernels = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 300.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 120.0),
        ("self_relation_kl_fwd", 80.0),
        ("dynamic_update_slice_fusion", 40.0),
        ("loop_multiply_fusion", 20.0),
        ("mystery_kernel", 10.0),
    ]
    events, ts = list(meta), 0.0
    for _ in range(2):  # two steps, kernels back to back
        for n, d in kernels:
            events.append({"ph": "X", "pid": 2, "tid": 7, "name": n, "ts": ts, "dur": d})
            events.append({"ph": "X", "pid": 2, "tid": 9, "name": "fusion.1", "ts": ts, "dur": d})  # derived row
            ts += d
    events.append({"ph": "X", "pid": 2, "tid": 7, "name": "wrapper", "ts": 0.0, "dur": ts})  # contains them all
    events.append({"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "ts": 0.0, "dur": 9999.0})
    _write_trace(tmp_path / "p" / "plugins" / "profile" / "run" / "gpu.trace.json.gz", events)
    s = trace_summary.summarize(str(tmp_path / "p"), steps=2)
    assert s["source"] == "device streams"
    assert s["device_ms_per_step"] == pytest.approx(0.570)
    assert s["kinds_ms_per_step"] == pytest.approx(
        {"gemm": 0.3, "attention": 0.12, "relation": 0.08, "copy": 0.04, "fusion": 0.02, "other": 0.01}
    )
    assert list(s["top_kernels_ms_per_step"])[0] == "sm90_xmma_gemm_bf16bf16_bf16f32"


def test_the_bench_writes_a_profile_the_summary_reads(tmp_path, capsys):
    argv = ["--models", "tiny", "--seq_len", "64", "--reps", "1", "--no_split", "--profile_dir", str(tmp_path)]
    (r,) = bench.main(argv)
    assert r["profile_steps"] == bench.PROFILE_STEPS and r["profile_dir"].startswith(str(tmp_path))
    out = tmp_path / "summary.json"
    (s,) = trace_summary.main([r["profile_dir"], "--steps", str(bench.PROFILE_STEPS), "--out", str(out)])
    assert s["device_ms_per_step"] > 0 and sum(s["kinds_ms_per_step"].values()) == pytest.approx(
        s["device_ms_per_step"]
    )
    # innermost events only: the kernels' time, never more than the threads' wall time of a step
    assert s["device_ms_per_step"] <= 2 * r["step_s"] * 1e3 * 4  # 2 XLA threads, generous slack
    assert "ThunkExecutor::Execute" not in s["top_kernels_ms_per_step"]
    assert json.loads(out.read_text())["summaries"][0]["profile"] == r["profile_dir"]
    assert "top kernels" in capsys.readouterr().out


def test_a_folder_without_a_trace_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no \\*.trace.json.gz"):
        trace_summary.summarize(str(tmp_path), steps=1)
