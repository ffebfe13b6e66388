"""Compile the restoration step for an H200 on a machine without a GPU, and report what it holds.

XLA can compile for a GPU it does not have (deviceless compilation): JAX's CUDA plugin gives a
compile-only device from a target description (`experiments/gpu/h200_target_config.txtpb`: the
H200's SM count, shared memory, memory size, compute capability 9.0), and `jit(...).lower(...)
.compile()` then runs XLA's whole GPU pipeline (fusion, cuDNN and Triton custom calls, buffer
assignment) for it. Nothing runs, so no device time is spent; what comes back is the compiled
step's memory (`memory_analysis`) and its HLO. On Llama-2-7B shapes the compiled GiB it reports
agree with the H200's own within 0.2 GiB (docs/bench_restore_step.md, "Deviceless compile").

Setup, once (a venv beside the project's environment, about 3.7 GB; the plugin's version is the
local jax's):

    python -m venv --system-site-packages .venv-gpu-aot
    v=$(python -c 'import jax; print(jax.__version__)')
    .venv-gpu-aot/bin/pip install "jax-cuda13-plugin[with-cuda]==$v" "jax-cuda13-pjrt==$v"

Then, e.g. the layouts of issue 22 part 3:

    .venv-gpu-aot/bin/python -m experiments.compile_offline --models llama2_7b --seq_len 4096 \\
        --variants loop/unfused/none,scan/fused/dots_no_batch --out docs/raw/compile_offline_h200.json

Per variant: compiled GiB (arguments + outputs - donated + XLA temp, as bench_restore_step's
`compiled_gib`), its parts, the compile seconds, and what one step executes with loops counted
(experiments/hlo_cost.py): matmul TFLOPs (remat recompute included) and cuDNN attention calls,
whence the attention forwards the backward reruns (`executed_work`). Mosaic GPU kernels
(`kernel_impl=pallas_mgpu`) reach XLA as MLIR that is compiled when the program first runs, so
here they are lowered, not compiled. `--dump DIR` keeps XLA's dumps (HLO after optimisation,
buffer assignment, memory-usage report: which buffers make the peak) in one directory.
Timing is not something this gives: tokens/s still need the device (bench_restore_step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The plugin refuses to start without a GPU driver's CUDA versions to check; compile-only use
# needs none. Set before jax initialises its backends (first use, not import).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_restore_step as bench  # noqa: E402
from experiments import hlo_cost  # noqa: E402

TARGETS = {"h200": os.path.join(os.path.dirname(__file__), "gpu", "h200_target_config.txtpb")}
SETUP = (
    "python -m venv --system-site-packages .venv-gpu-aot && .venv-gpu-aot/bin/pip install "
    '"jax-cuda13-plugin[with-cuda]==V" "jax-cuda13-pjrt==V" (V = this jax, {version}); then run this '
    "module with .venv-gpu-aot/bin/python (the module docstring)"
)


class SetupError(RuntimeError):
    """No compile-only GPU device: the CUDA plugin is missing or does not match jax."""


def compile_only_device(target: str = "h200"):
    """A device of a one-GPU compile-only topology for `target` (TARGETS)."""
    from jax.experimental import topologies

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}")
    with open(TARGETS[target]) as f:
        config = f.read()
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - jax raises NotImplementedError or RuntimeError by version
        reason = f"no compile-only CUDA device ({type(e).__name__}: {e}). "
        raise SetupError(reason + SETUP.format(version=jax.__version__)) from None
    return topology.devices[0]


def executed_work(compiled) -> dict:
    """What one step executes, loops counted (experiments/hlo_cost.py): matmul GFLOPs and cuDNN
    attention calls. Each layer runs one teacher and one student attention forward and one student
    backward, so forwards beyond 2 per backward are recomputes (the backward rerunning the forward
    because its residuals were not saved)."""
    cost = hlo_cost.of_compiled(compiled)
    calls = cost.opaque_custom_calls
    fwd = sum(n for t, n in calls.items() if t.startswith("__cudnn$fmha") and not t.endswith("Backward"))
    bwd = sum(n for t, n in calls.items() if t.startswith("__cudnn$fmha") and t.endswith("Backward"))
    return {
        "dot_gflops": cost.dot_flops / 1e9,
        "attention_fwd_calls": fwd,
        "attention_bwd_calls": bwd,
        "attention_fwd_recomputed": fwd - 2 * bwd if bwd else None,
        "unknown_trip_counts": cost.unknown_trip_counts,
    }


def compile_variant(
    device, shape, *, seq_len, batch, layout, fused, remat, attention_impl, kernel_impl, trainable_dtype="float32"
):
    """One variant compiled for `device`: memory parts (GiB), compile seconds, attention calls."""
    step, args = bench.abstract_step(
        shape,
        seq_len=seq_len,
        batch_per_device=batch,
        remat=remat,
        kernel_impl=kernel_impl,
        attention_impl=attention_impl,
        layout=layout,
        fused=fused,
        device=device,
        trainable_dtype=jnp.dtype(trainable_dtype),
    )
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = lambda x: x / 2**30  # noqa: E731
    return {
        "compiled_gib": gib(bench._compiled_bytes(compiled)),
        "argument_gib": gib(m.argument_size_in_bytes),
        "output_gib": gib(m.output_size_in_bytes),
        "alias_gib": gib(m.alias_size_in_bytes),
        "temp_gib": gib(m.temp_size_in_bytes),
        "compile_s": seconds,
        **executed_work(compiled),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="h200", choices=sorted(TARGETS))
    p.add_argument("--models", default="llama2_7b", help=f"comma list of {sorted(bench.SHAPES)}")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch_per_device", type=int, default=1)
    p.add_argument(
        "--variants",
        default=f"loop/unfused/none,{bench.DEFAULT_LAYOUT}/{'fused' if bench.DEFAULT_FUSED else 'unfused'}/"
        f"{bench.DEFAULT_REMAT}",
        help="comma list of layout/loss/remat (bench_restore_step's syntax); default: the loop and the default",
    )
    p.add_argument("--attention_impl", default="cudnn", help="what auto picks on the GPU for a maskless batch")
    p.add_argument(
        "--kernel_impl",
        default="pallas_gpu",
        help="the relation kernel: pallas_gpu (Triton; compiled here, so its memory counts) or pallas_mgpu "
        "(auto's pick on Hopper at head dim 128; lowered only). The deviceless device has no compute "
        "capability for auto to read",
    )
    p.add_argument(
        "--trainable_dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the trained projections' dtype (configs: float32); bfloat16 halves their gradient stacks, "
        "which isolates what those stacks hold",
    )
    p.add_argument(
        "--dump",
        default="",
        help="keep XLA's dumps (HLO, buffer assignment, memory-usage report) in DIR; the steps' modules "
        "(*jit_step*) are numbered in the order of the variants",
    )
    p.add_argument("--out", default="")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        variants = bench.parse_variants(args.variants)
    except ValueError as e:
        parser.error(str(e))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in bench.SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected some of {sorted(bench.SHAPES)}")
    if args.dump:  # read once, when XLA starts: one directory for every variant, modules in run order
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump}".strip()
    try:
        device = compile_only_device(args.target)
    except SetupError as e:
        parser.exit(2, f"compile_offline: {e}\n")
    rows = []
    print(
        f"{'model':10} {'layout':6} {'loss':8} {'remat':14} {'compiled GiB':>12} {'temp GiB':>8} "
        f"{'matmul TFLOP':>12} {'attn fwd recomputed':>19}"
    )
    for name in models:
        for layout, fused, remat in variants:
            loss = "fused" if fused else "unfused"
            row = {"model": name, "layout": layout, "fused": fused, "remat": remat}
            try:
                row.update(
                    compile_variant(
                        device,
                        bench.SHAPES[name],
                        seq_len=args.seq_len,
                        batch=args.batch_per_device,
                        layout=layout,
                        fused=fused,
                        remat=remat,
                        attention_impl=args.attention_impl,
                        kernel_impl=args.kernel_impl,
                        trainable_dtype=args.trainable_dtype,
                    )
                )
                print(
                    f"{name:10} {layout:6} {loss:8} {remat:14} {row['compiled_gib']:12.2f} {row['temp_gib']:8.2f} "
                    f"{row['dot_gflops'] / 1e3:12.2f} {str(row['attention_fwd_recomputed']):>19}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"{name:10} {layout:6} {loss:8} {remat:14} ERROR {row['error'][:100]}", flush=True)
            rows.append(row)
    out = {
        "target": args.target,
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "seq_len": args.seq_len,
        "batch_per_device": args.batch_per_device,
        "attention_impl": args.attention_impl,
        "kernel_impl": args.kernel_impl,
        "trainable_dtype": args.trainable_dtype,
        "command": "python -m experiments.compile_offline " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
