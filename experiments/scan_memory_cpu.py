"""What each layout/loss/remat variant of the restoration step holds while it runs, compiled on the
CPU at reduced widths (no device needed): XLA's temp buffer and the compiled step's total
(arguments + outputs - donated + temp), from `Compiled.memory_analysis()`.

    python -m experiments.scan_memory_cpu --out docs/raw/scan_memory_cpu.json

The question it answers (issue 22 part 3): does the scanned step keep more than the Python loop
without remat, and does a remat policy bring it back? Llama-2-7B's layout at hidden 1024, MLP
2752, 8 heads of 128, 4 layers, vocab 8000, T 1024 (the GPU's figures are in
docs/bench_restore_step.md, "Remat in the scan"; this shows the same pattern without a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from experiments import bench_restore_step as bench

VARIANTS = (
    ("loop", False, "none"),
    ("scan", True, "none"),
    ("scan", False, "none"),
    ("scan", True, "dots_no_batch"),
    ("loop", False, "full"),
    ("scan", True, "full"),
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    shape = dict(bench.SHAPES["llama2_7b"])
    shape.update(
        hidden_size=1024,
        intermediate_size=2752,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=args.layers,
        vocab_size=8000,
    )
    rows = []
    print(f"{'layout':6} {'loss':8} {'remat':14} {'temp GiB':>9} {'total GiB':>9}")
    for layout, fused, remat in VARIANTS:
        t0 = time.perf_counter()
        step, step_args = bench.abstract_step(  # compiled only: no weights are made
            shape,
            seq_len=args.seq_len,
            batch_per_device=1,
            remat=remat,
            kernel_impl="auto",
            attention_impl="xla",
            layout=layout,
            fused=fused,
        )
        compiled = step.lower(*step_args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
        total = bench._compiled_bytes(compiled) / 2**30
        rows.append(dict(layout=layout, fused=fused, remat=remat, temp_gib=temp, compiled_gib=total))
        loss = "fused" if fused else "unfused"
        print(
            f"{layout:6} {loss:8} {remat:14} {temp:9.3f} {total:9.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True
        )
    out = {
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "shape": shape,
        "seq_len": args.seq_len,
        "command": "python -m experiments.scan_memory_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
