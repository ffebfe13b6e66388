"""Compile time and compiled peak memory of the restoration train step on CPU: loop vs scan, unfused vs fused.

A narrow, deep model (hidden 64, 32 layers, T=256 by default) so the per-layer structure dominates:
the Python loop unrolls 32 layers into the HLO, nn.scan compiles one layer body; the unfused
relation loss keeps every layer's teacher and student q/k/v alive until the loss runs after both
forwards, the fused one (losses.fused_relation_loss) computes each layer's relation KL inside the
paired scan step. Measured per variant, in one process (each row a fresh jit):
  compile_s   wall time of lower() + compile() of the jitted train step (trainer.make_train_step);
  temp_MiB    compiled.memory_analysis().temp_size_in_bytes: XLA's peak scratch for the step
              (activations, residuals, the relation loss's inputs), excluding arguments/outputs;
  step_ms     median wall time of 3 executions after a warm-up (CPU, for reference only).
The loss value of every variant is printed too (all equal up to float rounding).

    python -m experiments.bench_scan_cpu [--layers 32 --hidden 64 --seq 256 --remat none,full]
writes docs/bench_scan_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from lard_jax import trainer
from lard_jax.model import LlamaConfig, LlamaForCausalLM, init_params, stack_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(cfg: LlamaConfig, *, scan: bool, fused: bool, seq: int, batch: int, lora_rank: int, kernel_impl: str):
    teacher = LlamaForCausalLM(cfg.replace(scan_layers=scan))
    student = LlamaForCausalLM(teacher.config.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    _, frozen = init_params(cfg, jax.random.PRNGKey(0))
    if scan:
        frozen = stack_layers(frozen)
    lora = trainer.LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.05) if lora_rank else trainer.LoraSpec()
    trainable = trainer.init_trainable(frozen, trainer.trainable_mask(frozen), lora, jax.random.PRNGKey(1))
    opt, sched = trainer.make_optimizer(lr=1e-4, warmup_steps=1, total_steps=10)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable), jax.random.PRNGKey(2))
    spec = trainer.LossSpec(kernel_impl=kernel_impl, fused=fused)
    step = jax.jit(trainer.make_train_step(teacher, student, spec, lora, opt, sched))
    ids = jax.random.randint(jax.random.PRNGKey(3), (1, batch, seq), 0, cfg.vocab_size)
    data = {"input_ids": ids, "mask": jnp.ones(ids.shape, bool)}
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out, metrics = compiled(state, frozen, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, frozen, data))
        times.append(time.perf_counter() - t0)
    return {
        "layout": "scan" if scan else "loop",
        "loss": "fused" if fused else "unfused",
        "remat": cfg.remat,
        "compile_s": round(compile_s, 2),
        "temp_MiB": round(mem.temp_size_in_bytes / 2**20, 2),
        "argument_MiB": round(mem.argument_size_in_bytes / 2**20, 2),
        "step_ms": round(1e3 * statistics.median(times), 1),
        "loss_value": float(metrics["loss"]),
        "hlo_lines": compiled.as_text().count("\n"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora_rank", type=int, default=8, help="LoRA rank with dropout 0.05 (0: full projections)")
    ap.add_argument("--remat", default="none,full")
    ap.add_argument("--kernel_impl", default="xla")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_scan_cpu"))
    args = ap.parse_args(argv)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
    )
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # backend warm-up, not charged to the first row
    rows = []
    for remat in args.remat.split(","):
        for scan in (False, True):
            for fused in (False, True):
                row = measure(
                    cfg.replace(remat=remat),
                    scan=scan,
                    fused=fused,
                    seq=args.seq,
                    batch=args.batch,
                    lora_rank=args.lora_rank,
                    kernel_impl=args.kernel_impl,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    cols = ["remat", "layout", "loss", "compile_s", "temp_MiB", "step_ms", "hlo_lines", "loss_value"]
    header = (
        f"Train step on CPU ({platform.processor() or platform.machine()}, jax {jax.__version__}): "
        f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV, "
        f"T={args.seq}, batch {args.batch}, LoRA r {args.lora_rank} (dropout 0.05), relation kernel "
        f"{args.kernel_impl!r}, Q/K/V relations on all layers."
    )
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(
            "# Scanned layers and the fused relation loss: compile time and compiled memory (CPU)\n\n"
            "`python -m experiments.bench_scan_cpu` ("
            + __doc__.split("\n\n")[1].replace("\n", " ").strip()
            + ")\n\n"
            + table
            + "\n"
        )


if __name__ == "__main__":
    main()
