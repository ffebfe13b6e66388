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


def test_kernels_that_overlap_their_successor_all_count(tmp_path):
    """On an H200 stream consecutive kernels overlap by a few microseconds (the next launch starts
    as the previous one drains). Each is a kernel, not a wrapper: an earlier version kept only
    events that ended before the next began and so dropped most relation-kernel time."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
    ]
    kernels = [
        ("relation_kl_fwd", 500.0),
        ("nvjet_gemm_NNT", 300.0),
        ("relation_kl_dleft", 400.0),
        ("loop_fusion", 50.0),
    ]
    events, ts = list(meta), 0.0
    for n, d in kernels:
        events.append({"ph": "X", "pid": 2, "tid": 7, "name": n, "ts": ts, "dur": d})
        ts += d - 3.0  # the next kernel starts 3 us before this one ends
    events.append({"ph": "X", "pid": 2, "tid": 7, "name": "wrapper", "ts": 0.0, "dur": ts + 10.0})  # a true wrapper
    # a 1 us memset wholly inside the tail of relation_kl_dleft (794-1194 us): both count
    events.append({"ph": "X", "pid": 2, "tid": 7, "name": "memset32", "ts": 1190.5, "dur": 1.0})
    _write_trace(tmp_path / "p" / "gpu.trace.json.gz", events)
    s = trace_summary.summarize(str(tmp_path / "p" / "gpu.trace.json.gz"), steps=1)
    assert s["device_ms_per_step"] == pytest.approx(1.251)
    assert s["kinds_ms_per_step"] == pytest.approx({"relation": 0.9, "gemm": 0.3, "fusion": 0.05, "copy": 0.001})


def test_two_programs_are_compared_kernel_by_kernel_with_launch_counts(tmp_path, capsys):
    """The comparison that explained the scan's extra time on the H200: the same kernel launched
    more often per step shows as a difference with its launch counts."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
    ]
    paths = []
    for label, n_attn, extra in (("loop", 2, []), ("scan", 3, [("dynamic_slice_fusion", 5.0)])):
        events, ts = list(meta), 0.0
        for _ in range(2):  # two steps
            for n, d in [("gemm_a", 100.0)] + [("flash_fprop", 20.0)] * n_attn + extra:
                events.append({"ph": "X", "pid": 2, "tid": 7, "name": n, "ts": ts, "dur": d})
                ts += d
        _write_trace(tmp_path / label / "t.trace.json.gz", events)
        paths.append(str(tmp_path / label))
    a, b = trace_summary.main(paths + ["--steps", "2"])
    assert a["kernels"]["flash_fprop"] == pytest.approx([0.04, 2.0])
    assert b["kernels"]["flash_fprop"] == pytest.approx([0.06, 3.0])
    diffs = trace_summary.kernel_differences(a, b)
    assert diffs[0] == pytest.approx(("flash_fprop", 0.04, 0.06, 2.0, 3.0))
    assert diffs[1] == pytest.approx(("dynamic_slice_fusion", 0.0, 0.005, 0.0, 1.0))
    assert {d[0] for d in diffs} == {"flash_fprop", "dynamic_slice_fusion", "gemm_a"}
    assert "largest differences, loop -> scan" in capsys.readouterr().out


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
