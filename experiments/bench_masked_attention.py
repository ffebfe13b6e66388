"""Masked causal attention on one GPU: forward+backward of every candidate against maskless cuDNN.

    PYTHONUNBUFFERED=1 python3 -m experiments.bench_masked_attention --out $OUT/masked_attention.json

Shapes (issue 22): (B, T, heads, kv heads, head_dim) = (4, 8192, 9, 3, 64), (1, 8192, 32, 8, 128),
(1, 32768, 9, 3, 64), (1, 32768, 32, 8, 128); bf16; loss = sum(out * w) with w fixed, grads of
q, k and v. Masks as lard_jax.data builds them: `per_document` (one document per row, padded at the
end: segment ids 1/0 and the same key mask) and `packed` (4 documents of random lengths per row,
ids 1..4, the last one padded at the end with id 0).

Candidates (rows of the table):
  cudnn_nomask       jax.nn.dot_product_attention(cudnn, causal) without any mask: the ceiling
  auto_per_document  lard_jax.attention.attention(impl="auto") with the per-document MaskInfo
                     (-> cudnn_masked_attention: run metadata + lax.switch -> sequence lengths)
  auto_packed        the same with the packed MaskInfo (-> cuDNN's packed layout, K/V repeated)
  packed_gqa_native  cuDNN's packed layout called without repeating K/V (checks jax's offsets)
  cudnn_dense_mask   cuDNN with the dense [T, T] mask (8K, D=64 only: a T^2 buffer)
  blockwise          our linear-memory XLA attention with the packed MaskInfo (8K, D=64 only)
Exactness at every shape that fits: real rows against dense XLA attention on float32 copies of the
inputs (8K only: dense needs the T^2 scores), ||out - ref|| / ||ref|| and the same for the grads.
Timing: median of repeated calls after compile and warm-up, each sample >= 20 ms of device work.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import median_seconds
from lard_jax import attention as attn

SHAPES = [(4, 8192, 9, 3, 64), (1, 8192, 32, 8, 128), (1, 32768, 9, 3, 64), (1, 32768, 32, 8, 128)]


timeit = functools.partial(median_seconds, budget=0.5, max_reps=20)  # experiments/timing.py


def masks(rng, b, t):
    lengths = rng.integers(t // 2, t + 1, b)
    per_doc_seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    per_doc = attn.MaskInfo(jnp.asarray(per_doc_seg), jnp.asarray(per_doc_seg.astype(bool)))
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t - 64), 3, replace=False))
        end = int(rng.integers(t - t // 8, t + 1))
        bounds = [0, *cuts.tolist(), end]
        for i in range(4):
            seg[r, bounds[i] : bounds[i + 1]] = i + 1
    packed = attn.MaskInfo(jnp.asarray(seg), jnp.asarray(seg > 0))
    return per_doc, packed


def fwd_bwd(fn, w):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_shape(b, t, h, kv, d, rng, result, out_path, check):
    keys = jax.random.split(jax.random.PRNGKey(t + h), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kv, d), jnp.bfloat16)
    w = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
    per_doc, packed = masks(rng, b, t)
    scale = 1.0 / d**0.5
    cands = {
        "cudnn_nomask": (
            None,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        ),
        "auto_per_document": (per_doc, lambda q, k, v: attn.attention(q, k, v, mask=per_doc, impl="auto")),
        "auto_packed": (packed, lambda q, k, v: attn.attention(q, k, v, mask=packed, impl="auto")),
    }
    if attn.packed_layout_available():

        def native(q, k, v, packed=packed):
            from jax._src.cudnn import fused_attention_stablehlo as fa

            runs = attn.segment_runs(packed, t, 64)
            off = jnp.pad(runs.starts, ((0, 0), (0, 1)), constant_values=-1)
            out = fa.dot_product_attention(
                q,
                k,
                v,
                q_seqlen=runs.lengths,
                kv_seqlen=runs.lengths,
                q_offsets=off,
                kv_offsets=off,
                scale=scale,
                mask_type=fa.MaskType.PADDING_CAUSAL,
            )
            return jnp.where(runs.valid[:, :, None, None], out, 0)

        cands["packed_gqa_native"] = (packed, native)
    if t <= 8192 and h < 16:
        dense = attn.dense_mask(packed.segment_ids, packed.attention_mask, t)
        cands["cudnn_dense_mask"] = (
            packed,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="cudnn"),
        )
        cands["blockwise"] = (packed, lambda q, k, v: attn.attention(q, k, v, mask=packed, impl="blockwise"))
    base_ms = None
    for name, (info, fn) in cands.items():
        row = {"shape": [b, t, h, kv, d], "candidate": name}
        try:
            g = fwd_bwd(fn, w if info is None else w * info.attention_mask[:, :, None, None])
            row["ms"] = 1e3 * timeit(g, q, k, v)
            if name == "cudnn_nomask":
                base_ms = row["ms"]
            row["speed_vs_cudnn_nomask"] = base_ms / row["ms"] if base_ms else None
            if check and info is not None and name not in ("cudnn_dense_mask", "blockwise"):
                # exactness on real rows against dense float32
                real = np.asarray(info.attention_mask)
                f32 = [x.astype(jnp.float32) for x in (q, k, v)]
                ref_o = np.asarray(jax.jit(lambda q, k, v, m=info: attn.attention(q, k, v, mask=m, impl="xla"))(*f32))
                got_o = np.asarray(jax.jit(fn)(q, k, v), np.float32)
                row["out_rel_err"] = float(np.linalg.norm(got_o[real] - ref_o[real]) / np.linalg.norm(ref_o[real]))
                ref_g = fwd_bwd(
                    lambda q, k, v, info=info: attn.attention(q, k, v, mask=info, impl="xla"),
                    w * info.attention_mask[:, :, None, None],
                )(*f32)
                got_g = g(q, k, v)
                row["grad_rel_err"] = [
                    float(np.linalg.norm(np.asarray(x, np.float32) - np.asarray(r)) / np.linalg.norm(np.asarray(r)))
                    for x, r in zip(got_g, ref_g)
                ]
        except Exception as e:  # a candidate the device or jax does not support: recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="masked_attention.json")
    p.add_argument("--no_check", action="store_true", help="time only (exactness checked in another run)")
    p.add_argument("--shapes", default="all", help="'all', 'tiny' or indices into SHAPES, e.g. 0,1")
    a = p.parse_args(argv)
    if a.shapes == "tiny":  # a CPU smoke run: cuDNN rows report errors, the others run
        shapes = [(2, 256, 6, 2, 64)]
    else:
        shapes = SHAPES if a.shapes == "all" else [SHAPES[int(i)] for i in a.shapes.split(",")]
    dev = jax.devices()[0]
    result = {
        "meta": {
            "device": dev.device_kind,
            "jax": jax.__version__,
            "command": "python3 -m experiments.bench_masked_attention " + " ".join(sys.argv[1:]),
            "packed_layout_available": attn.packed_layout_available(),
        },
        "rows": [],
    }
    rng = np.random.default_rng(0)
    for b, t, h, kv, d in shapes:
        bench_shape(b, t, h, kv, d, rng, result, a.out, check=t <= 8192 and not a.no_check)
    head = ("shape (B,T,H,KV,D)", "candidate", "ms", "x nomask", "out err", "grad err")
    print("\n{:26s} {:20s} {:>8s} {:>9s} {:>9s} {:>9s}".format(*head))
    for r in result["rows"]:
        ge = max(r["grad_rel_err"]) if r.get("grad_rel_err") else None
        print(
            f"{str(tuple(r['shape'])):26s} {r['candidate']:20s} "
            + (
                f"{r['ms']:8.2f} {r['speed_vs_cudnn_nomask'] or float('nan'):9.3f}"
                if "ms" in r
                else f"{'error':>8s} {'':9s}"
            )
            + (f" {r['out_rel_err']:9.2e}" if "out_rel_err" in r else f" {'':9s}")
            + (f" {ge:9.2e}" if ge is not None else "")
            + (f"  {r['error']}" if "error" in r else "")
        )


if __name__ == "__main__":
    main()
