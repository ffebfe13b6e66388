"""First device call for the Mosaic GPU relation-KL kernels (issue 24): do they compile, are they
exact, how fast are they against the Triton kernels. On a Hopper GPU:

    python3 -m experiments.check_relation_kl_mgpu --out $OUT/check_mgpu.json --per_case_timeout_s 120

Every case runs in its own subprocess under a time limit, so a kernel that deadlocks or fails to
compile costs one case, not the call; the JSON is rewritten after every case. Per case:
  * forward: the Mosaic KL rows and base-2 LSEs against the Triton forward's (the same residual
    convention); at T <= 2048 both against the dense reference (float64 inputs), so the Triton
    kernel's own error is the baseline;
  * backward, run even if the Mosaic forward failed: d_left / d_right from the Triton forward's
    LSEs and a random row cotangent, against the Triton backward's;
  * median times of the forward and of forward + backward for both kernels, and of cuDNN flash
    attention's forward + backward on the same shapes (the issue's yardstick, same process).
Each of VARIANTS (block sizes; the two-kernel tile-skipping backward or the fused one) is checked
and timed on its own. `ok` per variant, and per case for all of them: every relative error finite
and below --tol (bf16 inputs; d_right of GQA shapes is rounded to bf16 per query head before the
group sum, where the Triton kernel sums in float32).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

# (B, T, H, H_right, D, causal): small shapes first (the reference, and a quick verdict), then the
# 7B shapes (MHA, GQA), SmolLM2's, and a long one
CASES = (
    (1, 1024, 4, 2, 64, True),
    (1, 1024, 4, 2, 64, False),
    (1, 2048, 8, 8, 128, True),
    (1, 4096, 32, 32, 128, True),
    (1, 4096, 32, 8, 128, True),
    (2, 8192, 9, 3, 64, True),
    (1, 16384, 32, 32, 128, True),
)

# Through the public API, impl "pallas_mgpu" against "pallas_gpu" (the custom_vjp, padding and
# ids included): (B, T, H, H_right, D, causal, batch kind, pallas_mgpu's block_sizes); kind
# "padded": odd rows end 37 tokens early (a key mask); "packed": documents of 900 tokens (segment
# ids); T 1000: a padded length. The D 64 cases with a schedule pin block_q 64 (as they ran before
# D 64's default became 128 x 64).
BWD_128x64 = {"block_q_dq": 128, "block_q_dk": 128, "block_k_dq": 64, "block_k_dk": 64}
API_CASES = (
    (1, 1024, 4, 2, 64, True, "plain", None),
    (2, 1000, 4, 2, 64, True, "padded", None),
    (2, 2048, 8, 8, 128, True, "packed", None),
    (1, 4096, 32, 8, 128, True, "plain", None),
    (2, 8192, 9, 3, 64, True, "packed", None),
    (2, 1000, 4, 2, 64, False, "padded", None),
    (2, 2048, 4, 2, 64, True, "packed", {"block_q": 64, "block_k": 128}),  # block_q: D 64's default is 128
    (2, 2048, 8, 2, 128, True, "packed", {"fused_bwd": True}),
    (2, 1000, 4, 2, 64, True, "padded", {"fused_bwd": True}),
    (2, 2048, 8, 2, 128, True, "packed", {"fused_bwd": True, "schedule_barrier": True}),
    (2, 1000, 4, 2, 64, True, "padded", {"fused_bwd": True, "schedule_barrier": True, "block_q": 64}),
    (2, 1000, 4, 2, 64, False, "padded", {"fused_bwd": True, "schedule_barrier": True, "block_q": 64}),
    (2, 2048, 8, 2, 128, True, "packed", {"fused_bwd": True, "overlap_softmax": True}),
    (2, 1000, 4, 2, 64, True, "padded", {"fused_bwd": True, "overlap_softmax": True, "block_q": 64}),
    (2, 1000, 4, 2, 64, False, "padded", {"fused_bwd": True, "overlap_softmax": True, "block_q": 64}),
    (2, 2048, 8, 2, 128, True, "packed", {"fused_bwd": True, "merge_d_left": True}),
    (2, 1000, 4, 2, 64, True, "padded", {"fused_bwd": True, "merge_d_left": True, "block_q": 64}),
    (2, 1000, 4, 2, 64, False, "padded", {"fused_bwd": True, "merge_d_left": True, "block_q": 64}),
    # the forward on 64 x 128, the one-kernel backward on 128 x 64 (BlockSizes' *_dq / *_dk)
    (2, 2048, 4, 2, 64, True, "packed", {"fused_bwd": True, "block_q": 64, "block_k": 128, **BWD_128x64}),
)


# (name, block_q, block_kv, head dims, fused[, keyword arguments of both kernels, or a pair
# (forward's, backward's)]): the forward and backward on those blocks (128 x 128 exceeds Hopper's
# shared memory at head dim 128); fused: the one-kernel backward (`mosaic_backward_fused`, d_left by
# TMA reduce-add); *_sched: with the compute warpgroups' ping-pong (BlockSizes.schedule_barrier;
# _bwd: in the backward only; _ring3: a 3-slot ring, D 64 only, for the warpgroup that runs half a
# step behind); *_pair: the two logit wgmmas issued together without the ping-pong (the other half
# of the change); *_overlap: each step issues the next step's logit wgmmas before its own
# exponentials (BlockSizes.overlap_softmax; _fwd: in the forward only; _ring3: the forward's ring a
# slot longer, since a step's tiles are now needed at the start of the step before, the forward
# alone fitting 3 slots at D 128; _ring3_bwd: the backward's too, D 64 only); *_merge: the backward
# sums the two warpgroups' d_left parts before one reduce-add (BlockSizes.merge_d_left; 64 x 128 and
# 128 x 64: the second warpgroup's first steps fully masked, and a last pair of one step);
# fused_64x128_bwd128x64: each kernel on its own fastest D 64 blocks (tenth session). The first two
# sessions' JSON also has
# "pipelined_64x64", a backward through emit_pipeline_warp_specialized without tile skipping, since
# removed.
VARIANTS = (
    ("skip_64x64", 64, 64, (64, 128), False),
    ("skip_64x128", 64, 128, (64, 128), False),
    ("skip_128x64", 128, 64, (64, 128), False),
    ("skip_128x128", 128, 128, (64,), False),
    ("fused_64x64", 64, 64, (64, 128), True),
    ("fused_64x128", 64, 128, (64,), True),
    ("fused_64x64_sched", 64, 64, (64, 128), True, {"schedule_barrier": True}),
    ("fused_64x64_pair", 64, 64, (64, 128), True, {"pair_wgmmas": True}),
    ("fused_64x64_sched_bwd", 64, 64, (64, 128), True, ({}, {"schedule_barrier": True})),
    ("fused_64x64_sched_ring3", 64, 64, (64,), True, {"schedule_barrier": True, "max_concurrent_steps": 3}),
    ("fused_64x64_overlap", 64, 64, (64, 128), True, {"overlap_softmax": True}),
    ("fused_64x64_overlap_fwd", 64, 64, (64, 128), True, ({"overlap_softmax": True}, {})),
    (
        "fused_64x64_overlap_ring3",
        64,
        64,
        (64, 128),
        True,
        ({"overlap_softmax": True, "max_concurrent_steps": 3}, {"overlap_softmax": True}),
    ),
    ("fused_64x64_overlap_ring3_bwd", 64, 64, (64,), True, {"overlap_softmax": True, "max_concurrent_steps": 3}),
    ("fused_64x64_merge", 64, 64, (64, 128), True, ({}, {"merge_d_left": True})),
    ("fused_64x128_merge", 64, 128, (64,), True, ({}, {"merge_d_left": True})),
    ("fused_128x64_merge", 128, 64, (64,), True, ({}, {"merge_d_left": True})),
    ("fused_128x64", 128, 64, (64,), True),
    # the forward on 64 x 128 (its fastest at D 64), the one-kernel backward on 128 x 64 (its fastest)
    ("fused_64x128_bwd128x64", 64, 128, (64,), True, ({}, {"block_q": 128, "block_kv": 64})),
)


def variant_kernels(variant, **kw):
    """(forward, backward) of one VARIANTS entry, with `kw` (scale, causal) bound."""
    from pallas_kernels import relation_kl_mgpu

    _, bq, bkv, _, fused, *extra = variant
    kw = dict(kw, block_q=bq, block_kv=bkv)
    fwd_kw, bwd_kw = (extra[0] if isinstance(extra[0], tuple) else (extra[0], extra[0])) if extra else ({}, {})
    bwd = relation_kl_mgpu.mosaic_backward_fused if fused else relation_kl_mgpu.mosaic_backward
    return (  # a variant's own block_q / block_kv for one kernel override the shared ones
        functools.partial(relation_kl_mgpu.mosaic_forward, **{**kw, **fwd_kw}),
        functools.partial(bwd, **{**kw, **bwd_kw}),
    )


# --cases: 0-6 the kernels, 7-25 the API (14-25 fused backward, 16-18 ping-pong, 19-21 overlap_softmax,
# 22-24 merge_d_left, 25 the backward on its own blocks)
ALL_CASES = CASES + API_CASES


def _median_ms(fn, args):
    from experiments.timing import median_seconds

    return 1e3 * median_seconds(fn, *args)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


def _attempt(row, key, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (record, go on with the other parts of the case)
        row.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-2000:]
        return None


def _cudnn_fwd_bwd(causal):
    import jax
    import jax.numpy as jnp

    def loss(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda sl, sr, tl, tr: grad(sl, sr, tr)


def _dense64(args, g, *, causal, scale, **kw):
    """KL rows and d(sum(g * kl))/d(s_left, s_right) from the dense definition
    (`relation_kl_reference`, which repeats the right heads for GQA) in float64 on the host CPU
    (the GPU's BLAS has no float64 GEMM); kw: mask / segment_ids."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.relation_kl_reference import relation_kl_reference

    cpu = jax.devices("cpu")[0]
    with jax.enable_x64(True), jax.default_device(cpu):  # arrays made inside, or they are float32
        sl, sr, tl, tr = (jax.device_put(np.asarray(x, np.float64), cpu) for x in args)
        kw = {n: jax.device_put(np.asarray(v), cpu) for n, v in kw.items()}
        g64 = jax.device_put(np.asarray(g, np.float64), cpu)

        def weighted(sl, sr):
            kl = relation_kl_reference(sl, sr, tl, tr, causal=causal, scale=scale, **kw)
            return jnp.sum(g64 * kl), kl

        (_, kl), (dl, dr) = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(sl, sr)
        return [np.asarray(v) for v in (kl, dl, dr)]


def run_case(case, tol, variants=None):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import blocks as blocks_lib
    from pallas_kernels import relation_kl_gpu
    from pallas_kernels.relation_kl import Config

    B, T, H, Hr, D, causal = case
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    left = lambda i: jax.random.normal(k[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    right = lambda i: jax.random.normal(k[i], (B, T, Hr, D), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    args = (left(0), right(1), left(2), right(3))
    scale = D**-0.5
    row = {"case": dict(B=B, T=T, H=H, H_right=Hr, D=D, causal=causal), "errors": {}}
    cfg = Config(
        impl="pallas_gpu",
        causal=causal,
        scale=scale,
        blocks=blocks_lib.pick_blocks(None, "pallas_gpu", T, 2 * D, B * H),
        interpret=False,
    )
    t_fwd = jax.jit(lambda *a: relation_kl_gpu.forward(*a, None, None, cfg=cfg))
    t_bwd = jax.jit(lambda *a: relation_kl_gpu.backward(*a[:4], None, None, *a[4:], cfg=cfg))
    ref_kl, ref_ls, ref_lt = t_fwd(*args)
    g = jax.random.uniform(k[4], ref_kl.shape, jnp.float32)
    dense = _dense64(args, g, causal=causal, scale=scale) if T <= 2048 else None
    if dense is not None:
        row["triton_fwd_kl_vs_dense"] = _rel(ref_kl, dense[0])
    bargs = (*args, ref_ls, ref_lt, g)
    ref_dl, ref_dr = t_bwd(*bargs)
    row["triton_bwd_max_abs"] = [float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in (ref_dl, ref_dr)]
    if dense is not None:
        row["triton_bwd_vs_dense"] = [_rel(ref_dl, dense[1]), _rel(ref_dr, dense[2])]

    def both(fwd, bwd):
        def run(*a):
            kl, ls, lt = fwd(*a)
            return bwd(*a, ls, lt, kl)

        return jax.jit(run)

    row["ms"] = {"triton_fwd": _median_ms(t_fwd, args), "triton_fwd_bwd": _median_ms(both(t_fwd, t_bwd), args)}
    # the issue's yardstick in this process: cuDNN flash attention, forward + backward (q = left,
    # k = right, v = the teacher's right side: the same shapes, GQA without repeating K/V)
    row["ms"]["cudnn_attention_fwd_bwd"] = _attempt(row, "cudnn_time", lambda: _median_ms(_cudnn_fwd_bwd(causal), args))

    def check(m_fwd, m_bwd):  # one variant: errors against Triton (and dense), then times
        v, rel = {"errors": {}}, {}
        out = _attempt(v, "forward", lambda: m_fwd(*args))
        if out is not None:
            rel.update(fwd_kl=_rel(out[0], ref_kl), fwd_lse_s=_rel(out[1], ref_ls), fwd_lse_t=_rel(out[2], ref_lt))
            if dense is not None:
                rel["fwd_kl_vs_dense"] = _rel(out[0], dense[0])
        grads = _attempt(v, "backward", lambda: m_bwd(*bargs))
        if grads is not None:
            rel.update(bwd_d_left=_rel(grads[0], ref_dl), bwd_d_right=_rel(grads[1], ref_dr))
            v["bwd_max_abs"] = [float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in grads]
            if dense is not None:
                rel.update(bwd_d_left_vs_dense=_rel(grads[0], dense[1]), bwd_d_right_vs_dense=_rel(grads[1], dense[2]))
        v["rel_err_vs_triton"] = rel
        v["ok"] = bool(out is not None and grads is not None and all(np.isfinite(x) and x < tol for x in rel.values()))
        ms = v["ms"] = {}
        if out is not None:
            ms["fwd"] = _attempt(v, "fwd_time", lambda: _median_ms(m_fwd, args))
        if out is not None and grads is not None:
            ms["fwd_bwd"] = _attempt(v, "fwd_bwd_time", lambda: _median_ms(both(m_fwd, m_bwd), args))
        return v

    row["variants"] = {}
    for variant in VARIANTS:
        name, bq, bkv, head_dims = variant[:4]
        if T % (2 * bq) or T % (2 * bkv) or D not in head_dims or (variants is not None and name not in variants):
            continue
        row["variants"][name] = check(*(jax.jit(k) for k in variant_kernels(variant, scale=scale, causal=causal)))
    row["ok"] = bool(row["variants"]) and all(v["ok"] for v in row["variants"].values())
    return row


def run_api_case(case, tol):
    """relation_kl(impl="pallas_mgpu") against impl="pallas_gpu" and (T <= 2048) the float64 dense
    reference: KL rows and the gradients of sum(g * kl) for both student inputs, then times."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import relation_kl

    B, T, H, Hr, D, causal, kind, block_sizes = case
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    left = lambda i: jax.random.normal(k[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    right = lambda i: jax.random.normal(k[i], (B, T, Hr, D), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    args = (left(0), right(1), left(2), right(3))
    g = jax.random.uniform(k[4], (B, H, T), jnp.float32)
    kw = {}
    if kind == "padded":
        kw["mask"] = jnp.arange(T)[None, :] < (T - 37 * (jnp.arange(B) % 2))[:, None]
    if kind == "packed":
        kw["segment_ids"] = jnp.broadcast_to(jnp.arange(T) // 900, (B, T)).astype(jnp.int32)
    row = {"case": dict(B=B, T=T, H=H, H_right=Hr, D=D, causal=causal, kind=kind, blocks=block_sizes), "errors": {}}

    def make(impl):
        blocks = block_sizes if impl == "pallas_mgpu" else None

        def loss(sl, sr, tl, tr):
            kl = relation_kl(sl, sr, tl, tr, causal=causal, impl=impl, block_sizes=blocks, **kw)
            return jnp.sum(g * kl), kl

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (_, kl_t), (dl_t, dr_t) = make("pallas_gpu")(*args)
    out = _attempt(row, "mosaic", lambda: make("pallas_mgpu")(*args))
    rel = {}
    if out is not None:
        (_, kl_m), (dl_m, dr_m) = out
        rel = dict(kl=_rel(kl_m, kl_t), d_left=_rel(dl_m, dl_t), d_right=_rel(dr_m, dr_t))
        row["mosaic_max_abs"] = [float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in (kl_m, dl_m, dr_m)]
    if T <= 2048:
        kl64, dl64, dr64 = _dense64(args, g, causal=causal, scale=D**-0.5, **kw)
        row["triton_vs_dense"] = dict(kl=_rel(kl_t, kl64), d_left=_rel(dl_t, dl64), d_right=_rel(dr_t, dr64))
        if out is not None:
            rel.update(
                kl_vs_dense=_rel(kl_m, kl64), d_left_vs_dense=_rel(dl_m, dl64), d_right_vs_dense=_rel(dr_m, dr64)
            )
    row["rel_err_vs_triton"] = rel
    row["ok"] = bool(out is not None and all(np.isfinite(v) and v < tol for v in rel.values()))
    row["ms"] = {"triton_fwd_bwd": _median_ms(make("pallas_gpu"), args)}
    if out is not None:
        row["ms"]["mosaic_fwd_bwd"] = _attempt(row, "mosaic_time", lambda: _median_ms(make("pallas_mgpu"), args))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="check_relation_kl_mgpu.json")
    p.add_argument("--cases", default="", help="indices into ALL_CASES, e.g. 0,2,7 (default: all)")
    p.add_argument("--per_case_timeout_s", type=float, default=120.0, help="each case's subprocess limit")
    p.add_argument("--tol", type=float, default=2e-2, help="largest relative error counted as ok (bf16)")
    p.add_argument("--variants", default="", help="comma list of VARIANTS names to run (default: all)")
    p.add_argument("--one_case", type=int, default=-1, help=argparse.SUPPRESS)  # the subprocess's mode
    args = p.parse_args(argv)
    names = [v[0] for v in VARIANTS]
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in names for v in wanted):
        p.error(f"--variants: unknown {sorted(set(wanted) - set(names))}; expected some of {names}")
    if args.one_case >= 0:
        case = ALL_CASES[args.one_case]
        row = (run_api_case if len(case) == 8 else functools.partial(run_case, variants=wanted or names))(
            case, args.tol
        )
        with open(args.out, "w") as f:
            json.dump(row, f)
        return row
    import jax

    picked = [int(i) for i in args.cases.split(",")] if args.cases else list(range(len(ALL_CASES)))
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "argv": sys.argv, "rows": []}
    for i in picked:
        with tempfile.TemporaryDirectory() as tmp:
            part = os.path.join(tmp, "case.json")
            cmd = [sys.executable, "-m", "experiments.check_relation_kl_mgpu", "--one_case", str(i), "--out", part]
            cmd += ["--tol", str(args.tol)] + (["--variants", args.variants] if args.variants else [])
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.per_case_timeout_s)
                row = (
                    json.load(open(part))
                    if proc.returncode == 0
                    else {"case": ALL_CASES[i], "returncode": proc.returncode}
                )
                if proc.returncode:
                    row["stderr_tail"] = proc.stderr[-3000:]
            except subprocess.TimeoutExpired:
                row = {
                    "case": ALL_CASES[i],
                    "timeout_s": args.per_case_timeout_s,
                    "note": "hung or too slow: a deadlock?",
                }
            row["seconds"] = time.perf_counter() - t0
        out["rows"].append(row)
        brief = {k: v for k, v in row.items() if k not in ("stderr_tail", "errors", "variants")}
        brief["variants"] = {
            n: {"ok": v["ok"], "ms": v["ms"], "errors": list(v["errors"])} for n, v in row.get("variants", {}).items()
        }
        print(json.dumps(brief), flush=True)
        out["summary"] = summarize(out["rows"])
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    print_summary(out["summary"])
    return out


def summarize(rows) -> list[dict]:
    """One line per case: ok, the Triton / cuDNN / fastest Mosaic forward + backward (ms) and the
    Mosaic time as a ratio of each (the issue's targets: <= 1.15x cuDNN at D 128, 1.3x at D 64)."""
    lines = []
    for row in rows:
        case, ms = row.get("case"), row.get("ms") or {}
        line = {"case": case, "ok": row.get("ok", False)}
        mosaic = {n: v["ms"].get("fwd_bwd") for n, v in row.get("variants", {}).items() if v.get("ok")}
        mosaic = {n: t for n, t in mosaic.items() if isinstance(t, float)}
        if "mosaic_fwd_bwd" in ms:  # an API case: relation_kl("pallas_mgpu")
            mosaic["relation_kl"] = ms["mosaic_fwd_bwd"]
        triton = ms.get("triton_fwd_bwd")
        cudnn = ms.get("cudnn_attention_fwd_bwd")
        if mosaic:
            best = min(mosaic, key=mosaic.get)
            line.update(best=best, mosaic_ms=mosaic[best])
            if isinstance(triton, float):
                line["vs_triton"] = mosaic[best] / triton
            if isinstance(cudnn, float):
                line["vs_cudnn"] = mosaic[best] / cudnn
        line.update(triton_ms=triton, cudnn_ms=cudnn)
        lines.append(line)
    return lines


def _case_name(case) -> str:
    """B2 T8192 H9/3 D64 causal[ packed][ blocks]: a case (dict from a row, or an ALL_CASES tuple)."""
    if isinstance(case, dict):
        keys = ("B", "T", "H", "H_right", "D", "causal", "kind", "blocks")
        case = tuple(case.get(k) for k in keys)
    B, T, H, Hr, D, causal, *rest = list(case) + [None, None]
    name = f"B{B} T{T} H{H}/{Hr} D{D} {'causal' if causal else 'full'}"
    kind, blocks = rest[0], rest[1]
    return name + (f" {kind}" if kind else "") + (f" {blocks}" if blocks else "")


def print_summary(lines) -> None:
    fmt = lambda v, f: format(v, f) if isinstance(v, float) else "-".rjust(int(f.split(".")[0]))  # noqa: E731
    print(
        f"\n{'case':44} {'ok':>5} {'best Mosaic':>16} {'ms':>8} {'Triton':>8} {'cuDNN':>8} {'/Triton':>7} {'/cuDNN':>7}"
    )
    for ln in lines:
        print(
            f"{_case_name(ln['case']):48} {str(ln['ok']):>5} {ln.get('best', '-'):>16} "
            f"{fmt(ln.get('mosaic_ms'), '8.3f')} "
            f"{fmt(ln.get('triton_ms'), '8.3f')} {fmt(ln.get('cudnn_ms'), '8.3f')} "
            f"{fmt(ln.get('vs_triton'), '7.2f')} {fmt(ln.get('vs_cudnn'), '7.2f')}"
        )


if __name__ == "__main__":
    main()
