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
D 64). `--schedule_barrier` ablates the ping-pong variant instead, `--overlap_softmax` the
overlapped one, `--merge_d_left` the backward with merged d_left (the default at D 128).
`--blocks` sets the kernels' tiles: "64,64" (the default here and at D 128), "128,64" (D 64's default
since the tenth session), or "FQ,FK:BQ,BK" for a forward and a backward on different blocks.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.profile_relation_kl import layer_inputs  # noqa: E402
from experiments.timing import median_seconds  # noqa: E402
from pallas_kernels import relation_kl_mgpu  # noqa: E402

FWD_VARIANTS = ((), ("exp",), ("teacher_logits",), ("exp", "teacher_logits"))
BWD_VARIANTS = ((), ("exp",), ("teacher_logits",), ("d_left",), ("exp", "teacher_logits", "d_left"))
DEFAULT_CASES = "1,16384,32,128;4,8192,15,64"


def _positive_ints(part, n):
    """ "4,8192" -> (4, 8192) when `part` holds n positive integers, else None."""
    fields = part.split(",")
    if len(fields) != n or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
        return None
    return tuple(int(f) for f in fields)


def parse_cases(text):
    cases = []
    for part in text.split(";"):
        case = _positive_ints(part, 4)
        if case is None:
            raise ValueError(f"case {part!r}: expected B,T,H,D (positive integers)")
        cases.append(case)
    return cases


def inputs(B, T, H, D, abstract):
    """(student, teacher) of a self-relation (profile_relation_kl's layer inputs) and the
    backward's row cotangent; abstract: their shapes only (a dry run)."""
    if abstract:
        x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
        return (x, x), jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    ((s, t),) = layer_inputs(B, T, (H,), D)
    return (s, t), jax.random.uniform(jax.random.PRNGKey(99), (B, H, T), jnp.float32)


def parse_blocks(text):
    """ "128,64" -> ((128, 64), (128, 64)); "64,128:128,64" -> the forward's and the backward's
    (block_q, block_kv)."""
    pairs = [_positive_ints(part, 2) for part in text.split(":")]
    if len(pairs) > 2 or None in pairs:
        raise ValueError(f"blocks {text!r}: expected BQ,BKV or FQ,FK:BQ,BK (positive integers)")
    return pairs[0], pairs[-1]


def kernel(kind, ablate, D, schedule_barrier, overlap_softmax=False, merge_d_left=False, blocks=(64, 64)):
    """The jitted forward ((s, t) -> KL rows and LSEs) or fused backward ((s, t, lse_s, lse_t, g)
    -> gradients) of a self-relation on `blocks` (block_q, block_kv), with `ablate` (merge_d_left:
    the backward's only)."""
    kw = dict(
        scale=D**-0.5,
        causal=True,
        schedule_barrier=schedule_barrier,
        ablate=ablate,
        block_q=blocks[0],
        block_kv=blocks[1],
    )
    if overlap_softmax:
        kw["overlap_softmax"] = True
    if merge_d_left and kind == "bwd":
        kw["merge_d_left"] = True
    if kind == "fwd":
        return jax.jit(lambda s, t: relation_kl_mgpu.mosaic_forward(s, s, t, t, **kw))
    return jax.jit(lambda s, t, ls, lt, g: relation_kl_mgpu.mosaic_backward_fused(s, s, t, t, ls, lt, g, **kw))


def name(ablate):
    return "as is" if not ablate else "no " + " + ".join(ablate)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="B,T,H,D;... (self-relation, causal, bf16)")
    p.add_argument("--schedule_barrier", action="store_true", help="ablate the ping-pong variant")
    p.add_argument("--overlap_softmax", action="store_true", help="ablate the overlapped variant (BlockSizes)")
    p.add_argument("--merge_d_left", action="store_true", help="the backward with merged d_left (BlockSizes)")
    p.add_argument("--blocks", default="64,64", help="BQ,BKV for both kernels, or FQ,FK:BQ,BK (forward:backward)")
    p.add_argument("--dry_run", action="store_true", help="lower every variant for cuda (no GPU needed)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        cases = parse_cases(a.cases)
        fwd_blocks, bwd_blocks = parse_blocks(a.blocks)
    except ValueError as e:
        p.error(str(e))
    if a.schedule_barrier + a.overlap_softmax + a.merge_d_left > 1:
        p.error("--schedule_barrier, --overlap_softmax and --merge_d_left: one schedule at a time")
    result = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "command": "python3 -m experiments.ablate_relation_kl_mgpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "schedule_barrier": a.schedule_barrier,
        "overlap_softmax": a.overlap_softmax,
        "merge_d_left": a.merge_d_left,
        "blocks": {"fwd": list(fwd_blocks), "bwd": list(bwd_blocks)},
        "rows": [],
    }
    for B, T, H, D in cases:
        (s, t), g = inputs(B, T, H, D, a.dry_run)
        # the backward's row inputs: the forward's LSEs as it is (an ablated backward's times do not
        # depend on them; its outputs are wrong anyway)
        rows = (
            (g, g)
            if a.dry_run
            else kernel("fwd", (), D, a.schedule_barrier, a.overlap_softmax, blocks=fwd_blocks)(s, t)[1:]
        )
        for kind, variants in (("fwd", FWD_VARIANTS), ("bwd", BWD_VARIANTS)):
            base = None
            for ablate in variants:
                own = fwd_blocks if kind == "fwd" else bwd_blocks
                fn = kernel(kind, ablate, D, a.schedule_barrier, a.overlap_softmax, a.merge_d_left, blocks=own)
                args = (s, t) if kind == "fwd" else (s, t, *rows, g)
                row = {"case": dict(B=B, T=T, H=H, D=D), "kernel": kind, "ablate": list(ablate)}
                if a.dry_run:
                    row["lowered"] = "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
                else:
                    t0 = time.time()
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
