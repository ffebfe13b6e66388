"""First device call for the Mosaic GPU relation-KL kernels (issue 24): do they compile, are they
exact, how fast are they against the Triton kernels. One process, on a Hopper GPU:

    python3 -m experiments.check_relation_kl_mgpu --out $OUT/check_mgpu.json

Per shape: the Mosaic forward's KL rows and base-2 LSEs against the Triton kernel's
(`relation_kl_gpu.forward`, the same residual convention) and, at T <= 2048, the KL rows against
the float64 dense reference; the Mosaic backward's d_left / d_right against the Triton backward's
from the same LSEs and a random row cotangent; then median times (forward, and forward + backward)
for both. A shape that fails
to compile or run is recorded with its error and the next one runs (the first call is a debugging
call). Writes JSON after every shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import blocks as blocks_lib
from pallas_kernels import relation_kl_gpu, relation_kl_mgpu
from pallas_kernels.relation_kl import Config
from pallas_kernels.relation_kl_reference import relation_kl_reference

# (B, T, H, H_right, D): the 7B shapes (MHA, GQA) and SmolLM2's, then small ones for the reference
SHAPES = (
    (1, 1024, 4, 2, 64),
    (1, 2048, 8, 8, 128),
    (1, 4096, 32, 32, 128),
    (1, 4096, 32, 8, 128),
    (2, 8192, 9, 3, 64),
    (1, 16384, 32, 32, 128),
)


def _inputs(B, T, H, Hr, D, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    left = lambda i: jax.random.normal(k[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    right = lambda i: jax.random.normal(k[i], (B, T, Hr, D), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    return left(0), right(1), left(2), right(3)


def _median_ms(fn, args, reps=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


def check(shape, causal=True):
    B, T, H, Hr, D = shape
    sl, sr, tl, tr = _inputs(B, T, H, Hr, D)
    scale = D**-0.5
    row = {"shape": dict(B=B, T=T, H=H, H_right=Hr, D=D), "causal": causal}
    cfg = Config(
        impl="pallas_gpu",
        causal=causal,
        scale=scale,
        blocks=blocks_lib.pick_blocks(None, "pallas_gpu", T, 2 * D, B * H),
        interpret=False,
    )
    triton = jax.jit(lambda *a: relation_kl_gpu.forward(*a, None, None, cfg=cfg))
    mosaic = jax.jit(lambda *a: relation_kl_mgpu.forward(*a, scale=scale, causal=causal))
    args = (sl, sr, tl, tr)
    ref_kl, ref_ls, ref_lt = triton(*args)
    kl, ls, lt = mosaic(*args)
    row["vs_triton"] = {"kl": _rel(kl, ref_kl), "lse_s": _rel(ls, ref_ls), "lse_t": _rel(lt, ref_lt)}
    if T <= 2048:  # right heads repeated to the left's (GQA), then the dense definition in float64
        f64 = [np.asarray(x, np.float64) for x in args]
        f64[1], f64[3] = (np.repeat(x, H // Hr, axis=2) for x in (f64[1], f64[3]))
        with jax.enable_x64(True):
            dense = relation_kl_reference(*[jnp.asarray(x) for x in f64], causal=causal, scale=scale)
        row["vs_float64_reference"] = {"kl": _rel(kl, dense)}
    g = jax.random.uniform(jax.random.PRNGKey(7), ref_kl.shape, jnp.float32)
    triton_bwd = jax.jit(lambda *a: relation_kl_gpu.backward(*a[:4], None, None, *a[4:], cfg=cfg))
    mosaic_bwd = jax.jit(lambda *a: relation_kl_mgpu.backward(*a, scale=scale, causal=causal))
    bargs = (*args, ref_ls, ref_lt, g)
    ref_dl, ref_dr = triton_bwd(*bargs)
    dl, dr = mosaic_bwd(*bargs)
    row["bwd_vs_triton"] = {"d_left": _rel(dl, ref_dl), "d_right": _rel(dr, ref_dr)}

    def both(fwd, bwd):
        def run(*a):
            kl_, ls_, lt_ = fwd(*a)
            return bwd(*a, ls_, lt_, kl_)

        return jax.jit(run)

    row["ms"] = {
        "mosaic_fwd": _median_ms(mosaic, args),
        "triton_fwd": _median_ms(triton, args),
        "mosaic_fwd_bwd": _median_ms(both(mosaic, mosaic_bwd), args),
        "triton_fwd_bwd": _median_ms(both(triton, triton_bwd), args),
    }
    row["speedup_fwd"] = row["ms"]["triton_fwd"] / row["ms"]["mosaic_fwd"]
    row["speedup_fwd_bwd"] = row["ms"]["triton_fwd_bwd"] / row["ms"]["mosaic_fwd_bwd"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="check_relation_kl_mgpu.json")
    p.add_argument("--shapes", default="", help="indices into SHAPES, e.g. 0,2 (default: all)")
    args = p.parse_args(argv)
    picked = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else list(SHAPES)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "argv": sys.argv, "rows": []}
    for shape in picked:
        try:
            row = check(shape)
        except Exception as e:  # noqa: BLE001  (record and go on: this is a debugging call)
            row = {"shape": shape, "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
