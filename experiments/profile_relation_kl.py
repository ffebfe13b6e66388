"""One layer's relation loss, forward + backward, per kernel impl: times, and one profiled call.

The shape is a SmolLM2 layer as the fused loss runs it: the [q | k | v] self-relations (9 + 3 + 3
heads, head dim 64) of B sequences of T tokens, bf16, causal, one `self_relation_kl_multi` call
(one launch per kernel when `blocks.merge_relations` says so). For each impl it times
value-and-grad of the summed KL rows (median of repeated calls after warm-up), then runs one more
call between `cuProfilerStart` and `cuProfilerStop`, so that Nsight Compute started with
`--profile-from-start off` reads only the kernels of that call (without a profiler attached the
two calls do nothing):

    PYTHONUNBUFFERED=1 python3 -m experiments.profile_relation_kl --out $OUT/prof.json
    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --section InstructionStats \\
        python3 -m experiments.profile_relation_kl --reps 0 > $OUT/ncu.txt

(On the H200 with jax 0.11.2 ncu died this way before profiling a kernel: docs/kernel_notes.md.)
`--reps 0` skips the timing (under ncu every kernel is replayed per section, so times mean
nothing there). Prints a table and writes JSON (`--out`): ms per call, the call's causal
(row, key) pairs and ns per pair.
"""

import argparse
import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.timing import median_seconds  # noqa: E402
from pallas_kernels import self_relation_kl_multi  # noqa: E402
from pallas_kernels.blocks import parse_impl_spec  # noqa: E402


class CudaProfilerRange:
    """cuProfilerStart / cuProfilerStop on the device's primary context (the one XLA uses), through
    the driver library. Without libcuda (CPU) or without a profiler attached it does nothing."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            self.lib = None
        self.ctx = ctypes.c_void_p()

    def _call(self, name, *args):
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            print(f"[profile] {name} returned CUDA error {rc}", flush=True)
        return rc

    def __enter__(self):
        if self.lib is None:
            return self
        dev = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(dev), 0)
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), dev)
        self._call("cuCtxPushCurrent_v2", self.ctx)
        self._call("cuProfilerStart")
        return self

    def __exit__(self, *exc):
        if self.lib is None:
            return False
        self._call("cuProfilerStop")
        self._call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))
        return False


def layer_inputs(B, T, heads, D, key=0, dtype=jnp.bfloat16):
    """(student, teacher) pairs per relation; the teacher is the student plus noise (a close
    teacher, as after RoPE scaling: the KL is small but not zero)."""
    pairs = []
    for i, h in enumerate(heads):
        k1, k2 = jax.random.split(jax.random.PRNGKey(key + i))
        s = jax.random.normal(k1, (B, T, h, D), jnp.float32)
        t = s + 0.3 * jax.random.normal(k2, s.shape)
        pairs.append((s.astype(dtype), t.astype(dtype)))
    return pairs


def build(spec):
    """value-and-grad of one layer's summed KL rows for an impl spec ("pallas_mgpu:merge_d_left=0":
    the impl and its BlockSizes overrides, blocks.parse_impl_spec; none: its defaults)."""
    impl, blocks = parse_impl_spec(spec)

    def loss(students, teachers):
        rows = self_relation_kl_multi(list(zip(students, teachers)), impl=impl, block_sizes=blocks)
        return sum(jnp.sum(r) for r in rows)

    return jax.jit(jax.value_and_grad(loss))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--impls",
        default="pallas_gpu,pallas_mgpu",
        help="comma list; impl:field sets a boolean BlockSizes field, impl:field=value any field "
        "(e.g. pallas_mgpu:schedule_barrier, pallas_mgpu:merge_d_left=0)",
    )
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--heads", default="9,3,3", help="heads per relation ([q | k | v] of a layer)")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=1, help="0: no timing (under a profiler)")
    p.add_argument("--no_profile_call", action="store_true", help="skip the call between cuProfilerStart/Stop")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    heads = tuple(int(h) for h in a.heads.split(","))
    if a.B < 1 or a.T < 1 or a.head_dim < 1 or not heads or min(heads) < 1:
        p.error("--B, --T, --head_dim and every --heads entry must be positive")
    try:
        [parse_impl_spec(s) for s in a.impls.split(",")]
    except ValueError as e:
        p.error(str(e))
    students, teachers = zip(*layer_inputs(a.B, a.T, heads, a.head_dim))
    causal_pairs = a.B * sum(heads) * a.T * (a.T + 1) / 2  # (row, key) pairs; the kernels skip the rest
    result = {
        "shape": {"B": a.B, "T": a.T, "heads": heads, "head_dim": a.head_dim, "dtype": "bfloat16"},
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "command": "python3 -m experiments.profile_relation_kl " + " ".join(sys.argv[1:] if argv is None else argv),
        "causal_pairs": causal_pairs,
        "rows": [],
    }
    print(f"device {result['device']}, jax {jax.__version__}, shape {result['shape']}", flush=True)
    for impl in a.impls.split(","):
        row = {"impl": impl}
        t0 = time.time()
        try:
            fn = build(impl)
            loss, grads = jax.block_until_ready(fn(students, teachers))
        except Exception as e:  # a kernel that does not lower here is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"{impl}: {row['error']}", flush=True)
            result["rows"].append(row)
            continue
        row["compile_and_first_s"] = round(time.time() - t0, 2)
        row["loss"] = float(loss)
        if a.reps > 0:
            sec = median_seconds(fn, students, teachers, budget=2.0, max_reps=30)
            row["ms"] = round(sec * 1e3, 3)
            row["ns_per_causal_pair"] = round(sec * 1e9 / causal_pairs, 5)
        if not a.no_profile_call:
            with CudaProfilerRange():
                jax.block_until_ready(fn(students, teachers))
        print(f"{impl}: {row}", flush=True)
        result["rows"].append(row)
    timed = [r for r in result["rows"] if "ms" in r]
    if timed:
        base = timed[0]["ms"]
        print(f"\n| impl | ms (fwd+bwd) | vs {timed[0]['impl']} | loss |\n|---|---|---|---|")
        for r in timed:
            print(f"| {r['impl']} | {r['ms']:.3f} | {r['ms'] / base:.3f} | {r['loss']:.6g} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
