"""What bounds the Mosaic GPU relation-KL kernels: time them with one stage of work left out.

No hardware counters can be read under JAX here (Nsight Compute segfaulted, docs/kernel_notes.md),
so this times each kernel as it is and with one stage removed (`relation_kl_mgpu.ABLATIONS`):

  exp             every exponential becomes one FMA (the MUFU's work goes)
  teacher_logits  the student's logit tile stands in for the teacher's (one wgmma per step fewer)
  d_left          the fused backward skips d_left's wgmma and TMA reduce-add

and prints each time and its difference from the kernel as it is. A stage whose removal saves
little is hidden under another; the stage whose removal saves most is the bound. The outputs of an
ablated kernel are wrong on purpose; only the times mean anything.

    PYTHONUNBUFFERED=1 python3 -m experiments.ablate_relation_kl_mgpu --out $OUT/ablate.json
    python -m experiments.ablate_relation_kl_mgpu --dry_run   # CPU: lower every variant for "cuda"

Shapes (`--cases`, B,T,H,D;...): the paper's T 16384, 32 heads, D 128 (where the kernel is
1.22x cuDNN attention) and SmolLM2's layer as the fused loss merges it (B 4, T 8192, 15 heads,
D 64). `--schedule_barrier` ablates the ping-pong variant instead.
"""

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import relation_kl_mgpu  # noqa: E402

FWD_VARIANTS = ((), ("exp",), ("teacher_logits",), ("exp", "teacher_logits"))
BWD_VARIANTS = ((), ("exp",), ("teacher_logits",), ("d_left",), ("exp", "teacher_logits", "d_left"))
DEFAULT_CASES = "1,16384,32,128;4,8192,15,64"


def parse_cases(text):
    cases = []
    for part in text.split(";"):
        fields = part.split(",")
        if len(fields) != 4 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
            raise ValueError(f"case {part!r}: expected B,T,H,D (positive integers)")
        cases.append(tuple(int(f) for f in fields))
    return cases


def inputs(B, T, H, D, abstract):
    """Self-relation inputs (left = right) and the backward's row inputs."""
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    row = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    if abstract:
        return (x, x), (row, row, row)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    s = jax.random.normal(k1, x.shape, jnp.float32)
    t = (s + 0.3 * jax.random.normal(k2, x.shape)).astype(x.dtype)
    g = jax.random.uniform(k3, row.shape, jnp.float32)
    return (s.astype(x.dtype), t), g


def kernels(ablate, D, schedule_barrier):
    kw = dict(scale=D**-0.5, causal=True, schedule_barrier=schedule_barrier)
    fwd = functools.partial(relation_kl_mgpu.mosaic_forward, ablate=tuple(a for a in ablate if a != "d_left"), **kw)
    bwd = functools.partial(relation_kl_mgpu.mosaic_backward_fused, ablate=ablate, **kw)
    return (
        jax.jit(lambda s, t: fwd(s, s, t, t)),
        jax.jit(lambda s, t, ls, lt, g: bwd(s, s, t, t, ls, lt, g)),
    )


def name(ablate):
    return "as is" if not ablate else "no " + " + ".join(ablate)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="B,T,H,D;... (self-relation, causal, bf16)")
    p.add_argument("--schedule_barrier", action="store_true", help="ablate the ping-pong variant")
    p.add_argument("--dry_run", action="store_true", help="lower every variant for cuda (no GPU needed)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        cases = parse_cases(a.cases)
    except ValueError as e:
        p.error(str(e))
    result = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "command": "python3 -m experiments.ablate_relation_kl_mgpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "schedule_barrier": a.schedule_barrier,
        "rows": [],
    }
    for B, T, H, D in cases:
        (s, t), g_or_rows = inputs(B, T, H, D, a.dry_run)
        for kind, variants in (("fwd", FWD_VARIANTS), ("bwd", BWD_VARIANTS)):
            base = None
            for ablate in variants:
                fwd, bwd = kernels(ablate, D, a.schedule_barrier)
                row = {"case": dict(B=B, T=T, H=H, D=D), "kernel": kind, "ablate": list(ablate)}
                if a.dry_run:
                    args = (s, t) if kind == "fwd" else (s, t, *g_or_rows)
                    text = (fwd if kind == "fwd" else bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
                    row["lowered"] = "mosaic_gpu" in text
                else:
                    from experiments.timing import median_seconds

                    t0 = time.time()
                    _, ls, lt = jax.block_until_ready(fwd(s, t))  # LSEs of this variant's forward
                    args = (s, t) if kind == "fwd" else (s, t, ls, lt, g_or_rows)
                    fn = fwd if kind == "fwd" else bwd
                    row["ms"] = round(1e3 * median_seconds(fn, *args, budget=1.5, max_reps=30), 4)
                    row["compile_and_time_s"] = round(time.time() - t0, 1)
                    base = row["ms"] if base is None else base
                    row["saved_ms"] = round(base - row["ms"], 4)
                print(f"B{B} T{T} H{H} D{D} {kind} {name(ablate)}: {row}", flush=True)
                result["rows"].append(row)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(result, f, indent=1)
    timed = [r for r in result["rows"] if "ms" in r]
    if timed:
        print("\n| case | kernel | variant | ms | saved ms |\n|---|---|---|---|---|")
        for r in timed:
            c = r["case"]
            print(
                f"| B{c['B']} T{c['T']} H{c['H']} D{c['D']} | {r['kernel']} | {name(r['ablate'])} "
                f"| {r['ms']:.3f} | {r['saved_ms']:.3f} |"
            )
    return result


if __name__ == "__main__":
    main()
