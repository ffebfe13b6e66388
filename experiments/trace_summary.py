"""Where a profiled step's device time goes: kernel time per step, by kind and by kernel, from a
`jax.profiler` trace; several traces side by side.

    python -m experiments.bench_restore_step --models llama2_7b --layouts_all --profile_dir /root/prof ...
    python -m experiments.trace_summary /root/prof/llama2_7b_loop_unfused_full_dp1 \
        /root/prof/llama2_7b_scan_fused_full_dp1 --steps 2 --out docs/raw/trace_layouts_h200.json

Reads the `*.trace.json.gz` that `jax.profiler.trace(dir)` writes under `dir/plugins/profile/<run>/`
(Chrome trace events). Device time is the sum of the innermost complete ("X") events on the
stream timelines of the processes named `/device:...` (one per GPU or TPU; every stream counted,
so overlapping streams add up; derived rows such as "XLA Ops" are left out), divided by
`--steps`. Without a device process (a CPU-only trace) the host's XLA threads stand in, so the
tool can be tested anywhere. Kernel names are folded into kinds by substrings:

  gemm        cuBLAS / cuBLASLt / CUTLASS matmuls ("gemm", "cutlass", "xmma", "nvjet", "cublas")
  attention   cuDNN / flash attention ("cudnn", "fmha", "flash", "sdpa")
  relation    our Pallas relation-KL kernels ("relation", "self_relation", "kl_")
  copy        data movement ("copy", "memcpy", "memset", "dynamic_slice", "dynamic_update_slice",
              "transpose", "concatenate", "pad", "slice")
  fusion      other XLA fusions ("fusion", "loop_", "input_", "reduce")
  other       the rest

A kind's share is what it is here, not a verdict: a kernel that fuses a copy into a matmul counts
as the matmul.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys

KINDS = (
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "dot")),
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("relation", ("relation", "self_relation", "kl_")),
    (
        "copy",
        (
            "copy",
            "memcpy",
            "memset",
            "dynamic_slice",
            "dynamic-slice",
            "dynamic_update_slice",
            "dynamic-update-slice",
            "transpose",
            "concatenate",
            "pad",
            "slice",
        ),
    ),
    ("fusion", ("fusion", "loop_", "input_", "reduce")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def trace_files(path: str) -> list[str]:
    """The trace files of a profile: `path` itself, or every *.trace.json.gz below it."""
    if os.path.isfile(path):
        return [path]
    found = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
    if not found:
        raise SystemExit(f"{path}: no *.trace.json.gz below it (was it written by jax.profiler.trace?)")
    return found


def load_events(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


_TS_EPS_US = 1e-3  # trace timestamps are microseconds with nanosecond digits: rounding slack


def _leaf_events(events: list[dict], stream: bool = False) -> list[dict]:
    """The complete events of one thread that contain no other (wrappers such as XLA's
    ThunkExecutor::Execute around the kernels it runs would count their kernels twice): an event
    whose next event lies wholly inside it is a wrapper.

    `stream` (a GPU stream's timeline): there consecutive kernels overlap by up to ~1.5 us (the
    next launch starts as the previous one drains; median 0.3 us on an H200), so a wrapper's next
    event must also start in its first half: a kernel shorter than that overlap which starts and
    ends inside its predecessor's tail does not make the predecessor a wrapper. (Host threads wrap
    late: ThunkExecutor's "wait for completion" holds events anywhere inside it.)"""
    spans = sorted(events, key=lambda e: (float(e.get("ts", 0.0)), -float(e.get("dur", 0.0))))
    leaves = []
    for i, e in enumerate(spans):
        start, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
        nxt = spans[i + 1] if i + 1 < len(spans) else None
        wrapper = (
            nxt is not None
            and float(nxt.get("ts", 0.0)) + float(nxt.get("dur", 0.0)) <= start + dur + _TS_EPS_US
            and (not stream or float(nxt.get("ts", 0.0)) < start + dur / 2)
        )
        if not wrapper:
            leaves.append(e)
    return leaves


def device_time(events: list[dict]) -> tuple[collections.Counter, collections.Counter, str]:
    """kernel name -> summed duration (µs) of the innermost events on the device's streams,
    kernel name -> number of launches, and which timelines were read. A device's derived rows
    (XLA Modules, XLA Ops, Steps, ...) repeat the streams' time, so only threads named
    "Stream ..." count when the device has any."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e.get("tid")): e["args"].get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    device = {pid for pid, n in procs.items() if n.startswith("/device:")}
    if device:
        streams = {k for k, n in threads.items() if k[0] in device and n.lower().startswith("stream")}
        keep = streams or {k for k in threads if k[0] in device} or None
        source = "device streams" if streams else "device"
    else:  # CPU trace: XLA's executor threads on the host
        streams = set()
        keep = {k for k, n in threads.items() if "XLA" in n}
        source = "host XLA threads (no device in this trace)"
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        key = (e.get("pid"), e.get("tid"))
        if (keep is None and e.get("pid") in device) or (keep is not None and key in keep):
            by_thread[key].append(e)
    total, calls = collections.Counter(), collections.Counter()
    for key, evs in by_thread.items():
        for e in _leaf_events(evs, stream=key in streams):
            total[e.get("name", "?")] += float(e.get("dur", 0.0))
            calls[e.get("name", "?")] += 1
    return total, calls, source


def summarize(path: str, steps: int, top: int = 15) -> dict:
    kernels, launches = collections.Counter(), collections.Counter()
    source = ""
    for f in trace_files(path):
        k, c, source = device_time(load_events(f))
        kernels.update(k)
        launches.update(c)
    per_step = {n: us / steps / 1e3 for n, us in kernels.items()}  # ms per step
    kinds = collections.Counter()
    for n, ms in per_step.items():
        kinds[kind_of(n)] += ms
    return {
        "profile": path,
        "source": source,
        "steps": steps,
        "device_ms_per_step": sum(per_step.values()),
        "kinds_ms_per_step": dict(kinds.most_common()),
        "top_kernels_ms_per_step": dict(collections.Counter(per_step).most_common(top)),
        # every kernel: (ms per step, launches per step), for comparing two programs kernel by kernel
        "kernels": {n: [per_step[n], launches[n] / steps] for n in sorted(per_step, key=lambda n: -per_step[n])},
    }


def kernel_differences(a: dict, b: dict, top: int = 15) -> list[tuple[str, float, float, float, float]]:
    """The kernels whose time per step differs most between two summaries:
    (name, ms in a, ms in b, launches in a, launches in b), largest |difference| first."""
    ka, kb = a.get("kernels", {}), b.get("kernels", {})
    rows = [(n, *ka.get(n, (0.0, 0.0)), *kb.get(n, (0.0, 0.0))) for n in set(ka) | set(kb)]
    rows = [(n, ms_a, ms_b, la, lb) for n, ms_a, la, ms_b, lb in rows]
    return sorted(rows, key=lambda r: -abs(r[2] - r[1]))[:top]


def print_side_by_side(summaries: list[dict]) -> None:
    labels = [os.path.basename(os.path.normpath(s["profile"])) or s["profile"] for s in summaries]
    first = summaries[0]["kinds_ms_per_step"]
    kinds = sorted({k for s in summaries for k in s["kinds_ms_per_step"]}, key=lambda k: -first.get(k, 0))
    print(f"{'ms per step':12} " + " ".join(f"{x[:22]:>22}" for x in labels))
    print(f"{'total':12} " + " ".join(f"{s['device_ms_per_step']:22.2f}" for s in summaries))
    for k in kinds:
        print(f"{k:12} " + " ".join(f"{s['kinds_ms_per_step'].get(k, 0.0):22.2f}" for s in summaries))
    for s, label in zip(summaries, labels):
        print(f"\n{label} ({s['source']}): top kernels, ms per step")
        for n, ms in s["top_kernels_ms_per_step"].items():
            print(f"  {ms:9.3f}  {kind_of(n):9} {n[:110]}")
    for s, label in zip(summaries[1:], labels[1:]):
        print(f"\nlargest differences, {labels[0]} -> {label}: ms per step (launches per step)")
        for n, ms_a, ms_b, la, lb in kernel_differences(summaries[0], s):
            print(f"  {ms_a:9.3f} ({la:5.0f}) -> {ms_b:9.3f} ({lb:5.0f})  {kind_of(n):9} {n[:90]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", help="profile dirs (jax.profiler.trace's) or *.trace.json.gz files")
    p.add_argument("--steps", type=int, default=1, help="steps each trace holds (times are divided by it)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    summaries = [summarize(x, args.steps, args.top) for x in args.profiles]
    print_side_by_side(summaries)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": "python -m experiments.trace_summary "
                    + " ".join(sys.argv[1:] if argv is None else argv),
                    "summaries": summaries,
                },
                f,
                indent=2,
            )
    return summaries


if __name__ == "__main__":
    main()
