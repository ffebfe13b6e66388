"""What each layout's restoration step executes: matmul FLOPs and data movement, read from the
compiled program (no device needed; compiling on the CPU is enough).

    python -m experiments.layout_cost --model llama2_7b --seq_len 512 --layers 3,4 \
        --out docs/raw/layout_cost_llama2_7b_cpu.json

The step is the library's (`trainer.jit_train_step`, as `experiments/bench_restore_step.py` builds
it) for the layouts of `bench_restore_step --layouts_all`: loop/unfused, scan/unfused, scan/fused.
Each is compiled at two layer counts 3 <= L1 < L2 with the model's real widths (at 2 layers the
scanned part is one iteration, which XLA simplifies: not the per-layer program); `experiments.hlo_cost`
counts the optimized HLO with loop trip counts applied. From the two counts, per layer =
(c(L2) - c(L1)) / (L2 - L1) and fixed = c(L1) - L1 x per layer, so the model's full depth is
fixed + L x per layer (exact when the program is affine in L, which the two counts cannot prove:
add a third count to check). The relation loss uses `--kernel_impl` (default `reference`, dense
and loop-free, so every matmul is counted; the GPU's Pallas kernel is a custom call this reader
cannot see into, and is the same in every layout). Weights are random; nothing runs.

The question it answers (issue: the default layout as fast as the fastest): does the scanned,
fused step execute more matmul work than the loop (remat policy inside the scan, the fused
loss's recompute), or move more data (stacked per-layer buffers, layout copies)?
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from experiments import bench_restore_step, hlo_cost
from lard_jax import sharding as sharding_lib
from lard_jax.presets import MODEL_SHAPES

LAYOUTS = (("loop", False), ("scan", False), ("scan", True))


def compile_step(
    shape: dict,
    *,
    layers: int,
    seq_len: int,
    layout: str,
    fused: bool,
    kernel_impl: str,
    remat: str,
    attention_impl: str = "xla",
):
    """The compiled library step of one layout (bench_restore_step's, batch 1), at `layers`
    decoder layers of the given widths."""
    built = bench_restore_step.build_step(
        dict(shape, num_hidden_layers=layers, max_position_embeddings=seq_len),
        seq_len=seq_len,
        batch_per_device=1,
        remat=remat,
        kernel_impl=kernel_impl,
        attention_impl=attention_impl,
        layout=layout,
        fused=fused,
    )
    with sharding_lib.use_mesh(built.mesh):
        return built.step.lower(built.state, built.frozen, built.batch).compile()


def affine(c1: float, c2: float, l1: int, l2: int, full: int) -> dict:
    per_layer = (c2 - c1) / (l2 - l1)
    fixed = c1 - l1 * per_layer
    return {"per_layer": per_layer, "fixed": fixed, "full_depth": fixed + full * per_layer}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2_7b", choices=sorted(MODEL_SHAPES))
    p.add_argument(
        "--seq_len",
        type=int,
        default=512,
        help="projections' FLOPs per token do not depend on it; attention's and the relation loss's grow with it",
    )
    p.add_argument("--layers", default="3,4", help="two (or more) layer counts >= 3 to compile")
    p.add_argument("--kernel_impl", default="reference")
    p.add_argument("--remat", default="full")
    p.add_argument(
        "--attention_impl",
        default="cudnn" if jax.default_backend() == "gpu" else "xla",
        help="the model's attention (cudnn on a GPU, as bench_restore_step)",
    )
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    counts = sorted(int(x) for x in args.layers.split(","))
    if len(counts) < 2 or counts[0] < 3:
        p.error("--layers needs two or more layer counts >= 3, e.g. 3,4 (with 2 the scan runs 1 iteration)")
    shape = dict(MODEL_SHAPES[args.model])
    full = shape["num_hidden_layers"]
    runs = []
    for layout, fused in LAYOUTS:
        for n in counts:
            t = time.perf_counter()
            cost = hlo_cost.of_compiled(
                compile_step(
                    shape,
                    layers=n,
                    seq_len=args.seq_len,
                    layout=layout,
                    fused=fused,
                    kernel_impl=args.kernel_impl,
                    remat=args.remat,
                    attention_impl=args.attention_impl,
                )
            )
            runs.append({"layout": layout, "fused": fused, "layers": n, **cost.as_dict()})
            print(
                f"{layout:5} {'fused' if fused else 'unfused':8} L={n:<3} {cost.dot_flops / 1e12:9.3f} TFLOP "
                f"{runs[-1]['moved_gib_total']:8.2f} GiB moved  ({time.perf_counter() - t:.0f}s to compile)",
                flush=True,
            )
    l1, l2 = counts[0], counts[-1]
    table = []
    for layout, fused in LAYOUTS:
        mine = {r["layers"]: r for r in runs if (r["layout"], r["fused"]) == (layout, fused)}
        flops = affine(mine[l1]["dot_gflops"], mine[l2]["dot_gflops"], l1, l2, full)
        moved = affine(mine[l1]["moved_gib_total"], mine[l2]["moved_gib_total"], l1, l2, full)
        table.append({"layout": layout, "fused": fused, "dot_gflops": flops, "moved_gib": moved})
    loop = table[0]
    print(f"\n{args.model} at T={args.seq_len}, extrapolated to {full} layers from L={l1},{l2} (ratio to loop):")
    print(
        f"{'layout':6} {'loss':8} {'GFLOP/layer':>12} {'TFLOP total':>12} {'ratio':>6} "
        f"{'GiB moved/layer':>16} {'ratio':>6}"
    )
    for r in table:
        f, m = r["dot_gflops"], r["moved_gib"]
        r["flops_ratio_to_loop"] = f["full_depth"] / loop["dot_gflops"]["full_depth"]
        r["moved_ratio_to_loop"] = m["full_depth"] / loop["moved_gib"]["full_depth"]
        print(
            f"{r['layout']:6} {'fused' if r['fused'] else 'unfused':8} {f['per_layer']:12.1f} "
            f"{f['full_depth'] / 1e3:12.2f} {r['flops_ratio_to_loop']:6.3f} {m['per_layer']:16.2f} "
            f"{r['moved_ratio_to_loop']:6.3f}"
        )
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "layers_compiled": counts,
        "full_depth": full,
        "kernel_impl": args.kernel_impl,
        "remat": args.remat,
        "attention_impl": args.attention_impl,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "command": "python -m experiments.layout_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": runs,
        "table": table,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
