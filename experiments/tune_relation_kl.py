"""Tile sweep of relation_kl ("pallas_gpu") per head-dim class and grid size, and
a layer's three relations (Q, K, V) as three launches or one.

    PYTHONUNBUFFERED=1 python3 -m experiments.tune_relation_kl --out $OUT/tune.json
    python -m experiments.tune_relation_kl --cpu_smoke --out /tmp/tune.json  # tiny, interpret mode (CPU)
    python -m experiments.tune_relation_kl --dry_run                         # the plan only, runs nothing

Shape classes (bf16, causal self-relations, the LinearARD loss):
  SmolLM2 (head_dim 64, T=8192): the Q relation (9 heads) and the K/V relations (3 KV
  heads) at micro-batch 2 and 4; Llama-2 shapes (head_dim 128, B=1, T=4096): 32 and 8 heads.
Each maps to a key of `pallas_kernels.blocks.GPU_TILE_TABLE`: (head-dim class, "few"
when B x H <= blocks.FEW_BATCH_HEADS else "many").

Per shape: FWD_CANDIDATES (block_q, block_k, warps, stages of the forward kernel; the
backward fields at the table default) timed forward-only, BWD_CANDIDATES (tiles of the
d_left and d_right kernels, warps, stages; forward fields at the default) timed
forward+backward; at most 6 + 6 configs per shape, the table default first. Every
config's KL rows, loss and gradient are checked against the default config's (relative
error < 1e-2 in bf16): a mismatch is recorded, printed and makes the run exit 1 (after
the JSON is written). A config that fails to lower or compile is recorded as skipped.
Compilation runs in a thread pool (XLA compiles the Triton kernels in C++), timing
serially: median of batches of calls (each batch >= ~20 ms of device work) after warm-up,
wall clock around jax.block_until_ready.

Per table key, the forward and backward candidates with the lowest geometric mean of
(time / default time) over the key's shapes are combined into that key's entry; the
combination is re-checked and re-timed beside the default on every shape of the key
("final"). Printed last: a table, the `GPU_TILE_TABLE = {...}` to paste into
pallas_kernels/blocks.py, and the suggested GPU_MERGE_RELATIONS.

Layer (SmolLM2, micro-batch 2 and 4): q (9 heads), k, v (3 each) as three launches vs
one 15-head launch (`self_relation_kl_multi`, concatenation included), table defaults
and tuned tiles; forward, forward+backward, and "remat" = forward + forward+backward
(what a remat="full" step runs when the relation residuals are not saved), per layer and
x 30 layers. Merged and separate results are checked against each other.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import median_seconds
from pallas_kernels import BlockSizes, blocks, self_relation_kl, self_relation_kl_multi

T0 = time.time()
TOL = 1e-2  # relative error vs the default config (bf16)
NUM_LAYERS = 30  # SmolLM2-135M

# name, head_dim, batch, heads, length
SHAPES = [
    ("d64_b2_h9", 64, 2, 9, 8192),  # SmolLM2 Q relation, micro-batch 2
    ("d64_b2_h3", 64, 2, 3, 8192),  # SmolLM2 K or V relation (3 KV heads)
    ("d64_b4_h9", 64, 4, 9, 8192),
    ("d64_b4_h3", 64, 4, 3, 8192),
    ("d128_b1_h32", 128, 1, 32, 4096),  # Llama-2-7B Q/K/V relation
    ("d128_b1_h8", 128, 1, 8, 4096),  # 8 heads (a GQA model's K/V)
]
LAYER_BATCHES = (2, 4)  # SmolLM2 layer: q 9 heads, k and v 3 heads, D = 64, T = 8192
LAYER_HEADS, LAYER_D, LAYER_T = (9, 3, 3), 64, 8192

FWD_FIELDS = ("block_q", "block_k", "num_warps_fwd", "num_stages_fwd")
BWD_FIELDS = ("block_q_dq", "block_k_dq", "block_q_dk", "block_k_dk", "num_warps_bwd", "num_stages_bwd")
# Candidates per head-dim class (the table default of the shape's key is added first).
# D = 64 rows are half as wide as D = 128: twice the rows fit the same registers and
# shared memory, so larger owned tiles (d_left rows, d_right keys) and 128-wide key
# tiles are in; for the few-heads grids, smaller owned tiles (more programs) too.
FWD_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
}
BWD_CANDIDATES = {
    64: [
        (64, 64, 64, 64, 4, 2),
        (64, 64, 64, 64, 4, 3),
        (128, 64, 64, 128, 8, 2),
        (128, 32, 32, 128, 4, 2),
        (128, 64, 64, 128, 8, 3),
        (32, 64, 64, 32, 4, 2),
    ],
    128: [
        (64, 64, 64, 64, 4, 2),
        (64, 64, 64, 64, 4, 3),
        (128, 128, 128, 128, 8, 2),
        (64, 32, 32, 64, 4, 2),
        (32, 64, 64, 32, 4, 2),
        (64, 64, 64, 64, 8, 2),
    ],
}
MAX_PER_KIND = 6  # at most 6 forward + 6 backward configs per shape class

INTERPRET = False
RESULTS: dict = {"meta": {}, "shapes": [], "table": {}, "layer": [], "mismatches": [], "skipped": []}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save(path):
    if path:
        RESULTS["meta"]["elapsed_s"] = time.time() - T0
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)


# ------------------------------------------------------------------ configs ---


def table_key(D, B, H):
    return blocks.gpu_table_key(blocks.padded_head_dim(D) * 2, B * H)


def key_str(key):
    return f"{key[0]},{key[1]}"


def default_for(D, B, H):
    return blocks.default_blocks("pallas_gpu", blocks.padded_head_dim(D) * 2, B * H)


def fields(b: BlockSizes, names):
    return tuple(getattr(b, f) for f in names)


def candidates(kind, D, B, H, limit=MAX_PER_KIND):
    """[(tuple of the kind's fields, BlockSizes)], the table default first, no duplicates."""
    base = default_for(D, B, H)
    names = FWD_FIELDS if kind == "fwd" else BWD_FIELDS
    pool = FWD_CANDIDATES if kind == "fwd" else BWD_CANDIDATES
    dclass = blocks.head_dim_class(blocks.padded_head_dim(D) * 2)
    out, seen = [], set()
    for tup in [fields(base, names)] + list(pool[dclass]):
        if tup in seen:
            continue
        seen.add(tup)
        out.append((tup, dataclasses.replace(base, **dict(zip(names, tup)))))
    return out[:limit]


def all_tunable_configs():
    """Every BlockSizes the tuner may choose (forward and backward candidates of every
    class combined pairwise): what tests/test_relation_kl.py runs in interpret mode."""
    out = []
    for dclass in sorted(FWD_CANDIDATES):
        fwd, bwd = FWD_CANDIDATES[dclass], BWD_CANDIDATES[dclass]
        for i in range(max(len(fwd), len(bwd))):
            f, b = fwd[i % len(fwd)], bwd[i % len(bwd)]
            out.append((dclass, BlockSizes(**dict(zip(FWD_FIELDS, f)), **dict(zip(BWD_FIELDS, b)))))
    return out


# ------------------------------------------------------------------- timing ---


timeit = functools.partial(median_seconds, budget=0.3, max_reps=15)  # experiments/timing.py


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def compile_all(jobs, workers):
    """jobs: {name: (jitted fn, args)} -> {name: compiled or the error string}.
    Lowering (Python) runs serially, XLA compilation in a thread pool."""
    lowered, out = {}, {}
    for name, (fn, args) in jobs.items():
        try:
            lowered[name] = fn.lower(*args)
        except Exception as e:  # noqa: BLE001
            out[name] = f"lowering failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
        for name, fut in futures.items():
            try:
                out[name] = fut.result()
            except Exception as e:  # noqa: BLE001
                out[name] = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return out


# ------------------------------------------------------------------- inputs ---


def make_inputs(B, T, H, D, seed):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (B, T, H, D), jnp.float32)
    t = x + 0.5 * jax.random.normal(k2, x.shape)
    w = jax.random.uniform(k3, (B, H, T), jnp.float32, 0.5, 1.5)
    return x.astype(jnp.bfloat16), t.astype(jnp.bfloat16), w


def fwd_fn(b):
    return jax.jit(lambda x, t: self_relation_kl(x, t, impl="pallas_gpu", block_sizes=b, interpret=INTERPRET))


def fwdbwd_fn(b):
    def loss(x, t, w):
        kl = self_relation_kl(x, t, impl="pallas_gpu", block_sizes=b, interpret=INTERPRET)
        return jnp.sum(w * kl), kl

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def pairs(B, T, H):
    return B * H * T * T / 2  # causal (row, key) pairs


def tflops(kind, B, T, H, D, ms):
    """Real TF/s: forward 2 matmuls per pair, forward+backward 2 + 6."""
    n = 2 if kind == "fwd" else 8
    return 2 * D * n * pairs(B, T, H) / ms / 1e9


# ------------------------------------------------------------------- phase 1 ---


def check(kind, out, ref):
    """Relative errors of a config's outputs against the default config's."""
    if kind == "fwd":
        return {"kl": rel(out, ref)}
    (loss, kl), g = out
    (rloss, rkl), rg = ref
    return {"loss": rel(loss, rloss), "kl": rel(kl, rkl), "grad": rel(g, rg)}


def run_configs(shape, kind, cfgs, args, workers, budget):
    """Compile, check against the first (default) config, time. -> list of result rows."""
    name = shape["name"]
    make = fwd_fn if kind == "fwd" else fwdbwd_fn
    jobs = {tup: (make(b), args) for tup, b in cfgs}
    compiled = compile_all(jobs, workers)
    rows, ref = [], None
    for i, (tup, b) in enumerate(cfgs):
        row = {"cfg": list(tup), "blocks": dataclasses.asdict(b)}
        c = compiled[tup]
        if isinstance(c, str):
            row["status"] = "skipped"
            row["error"] = c
            RESULTS["skipped"].append({"shape": name, "kind": kind, "cfg": list(tup), "error": c})
            log(f"{name} {kind} {tup}: SKIPPED {c[:160]}")
            rows.append(row)
            if i == 0:
                raise RuntimeError(f"{name}: the default config does not compile: {c}")
            continue
        try:
            out = jax.device_get(c(*args))
            if i == 0:
                ref = out
            errs = check(kind, out, ref)
            row["rel_err_vs_default"] = errs
            if not all(math.isfinite(v) and v < TOL for v in errs.values()):
                row["status"] = "MISMATCH"
                RESULTS["mismatches"].append({"shape": name, "kind": kind, "cfg": list(tup), "rel_err": errs})
                log(f"!!! {name} {kind} {tup}: MISMATCH vs default {errs}")
                rows.append(row)
                continue
            ms = 1e3 * timeit(c, *args, budget=budget)
        except Exception as e:  # noqa: BLE001
            row["status"] = "skipped"
            row["error"] = f"run failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            RESULTS["skipped"].append({"shape": name, "kind": kind, "cfg": list(tup), "error": row["error"]})
            log(f"{name} {kind} {tup}: run failed {row['error'][:160]}")
            rows.append(row)
            if i == 0:
                raise
            continue
        row["status"] = "ok"
        row["ms"] = ms
        row["tflops"] = tflops(kind, shape["B"], shape["T"], shape["H"], shape["D"], ms)
        log(f"{name} {kind} {tup}: {ms:.3f} ms {row['tflops']:.0f} TF/s  err {max(errs.values()):.1e}")
        rows.append(row)
    return rows, compiled


def sweep_shape(shape, workers, budget):
    B, T, H, D = shape["B"], shape["T"], shape["H"], shape["D"]
    x, t, w = make_inputs(B, T, H, D, seed=B * 1000 + H)
    res = {}
    for kind, args in (("fwd", (x, t)), ("fwdbwd", (x, t, w))):
        rows, compiled = run_configs(shape, kind, candidates(kind, D, B, H), args, workers, budget)
        res[kind] = rows
        shape.setdefault("_compiled", {})[kind] = compiled
    shape["_args"] = {"fwd": (x, t), "fwdbwd": (x, t, w)}
    return res


# ------------------------------------------------------------------- phase 2 ---


def choose(rows_per_shape):
    """Candidate (tuple) with the lowest geometric mean of ms / default ms over the
    shapes, among those that ran on all of them; None when only the default did."""
    ok = None
    for rows in rows_per_shape:
        names = {tuple(r["cfg"]) for r in rows if r.get("status") == "ok"}
        ok = names if ok is None else ok & names
    if not ok:
        return None, {}
    scores = {}
    for tup in ok:
        logs = []
        for rows in rows_per_shape:
            by = {tuple(r["cfg"]): r["ms"] for r in rows if r.get("status") == "ok"}
            logs.append(math.log(by[tup] / by[tuple(rows[0]["cfg"])]))
        scores[tup] = math.exp(sum(logs) / len(logs))
    return min(scores, key=scores.get), scores


def finalize_key(key, shapes, workers, budget):
    """Combine the key's best forward and backward fields; re-check and re-time vs the default."""
    fwd_best, fwd_scores = choose([s["sweep"]["fwd"] for s in shapes])
    bwd_best, bwd_scores = choose([s["sweep"]["fwdbwd"] for s in shapes])
    s0 = shapes[0]
    base = default_for(s0["D"], s0["B"], s0["H"])
    tuned = base
    if fwd_best is not None:
        tuned = dataclasses.replace(tuned, **dict(zip(FWD_FIELDS, fwd_best)))
    if bwd_best is not None:
        tuned = dataclasses.replace(tuned, **dict(zip(BWD_FIELDS, bwd_best)))
    entry = {
        "blocks": dataclasses.asdict(tuned),
        "fwd_geomean_vs_default": {str(list(k)): v for k, v in fwd_scores.items()},
        "bwd_geomean_vs_default": {str(list(k)): v for k, v in bwd_scores.items()},
        "shapes": [s["name"] for s in shapes],
    }
    RESULTS["table"][key_str(key)] = entry
    log(f"table {key}: {tuned}")
    for s in shapes:
        final = {}
        base = default_for(s["D"], s["B"], s["H"])
        for kind, make in (("fwd", fwd_fn), ("fwdbwd", fwdbwd_fn)):
            args = s["_args"][kind]
            ref_fn = s["_compiled"][kind][fields(base, FWD_FIELDS if kind == "fwd" else BWD_FIELDS)]
            # The forward-only function reads the forward fields alone.
            if tuned == base or (kind == "fwd" and fields(tuned, FWD_FIELDS) == fields(base, FWD_FIELDS)):
                new_fn = ref_fn
            else:
                new_fn = compile_all({"t": (make(tuned), args)}, workers)["t"]
                if isinstance(new_fn, str):
                    final[kind] = {"error": new_fn}
                    RESULTS["skipped"].append({"shape": s["name"], "kind": f"final {kind}", "error": new_fn})
                    continue
            errs = check(kind, jax.device_get(new_fn(*args)), jax.device_get(ref_fn(*args)))
            if not all(math.isfinite(v) and v < TOL for v in errs.values()):
                RESULTS["mismatches"].append({"shape": s["name"], "kind": f"final {kind}", "rel_err": errs})
                log(f"!!! {s['name']} final {kind}: MISMATCH vs default {errs}")
            # Interleaved, twice each, so drift hits both alike.
            d_ms, t_ms = [], []
            for _ in range(2):
                d_ms.append(1e3 * timeit(ref_fn, *args, budget=budget))
                t_ms.append(1e3 * timeit(new_fn, *args, budget=budget))
            final[kind] = {"default_ms": min(d_ms), "tuned_ms": min(t_ms), "rel_err_vs_default": errs}
        if not all("tuned_ms" in final.get(kind, {}) for kind in ("fwd", "fwdbwd")):
            s["final"] = final
            continue
        f, fb = final["fwd"], final["fwdbwd"]
        final["remat_default_ms"] = f["default_ms"] + fb["default_ms"]
        final["remat_tuned_ms"] = f["tuned_ms"] + fb["tuned_ms"]
        final["speedup_fwdbwd"] = fb["default_ms"] / fb["tuned_ms"]
        s["final"] = final
        log(
            f"{s['name']} final: fwd {f['default_ms']:.3f} -> {f['tuned_ms']:.3f} ms, "
            f"fwd+bwd {fb['default_ms']:.3f} -> {fb['tuned_ms']:.3f} ms"
        )
    # Keep the combination only if it beats the default in the confirming runs
    # (geometric mean over the key's shapes of forward + forward-backward, the remat cost).
    ratios = [
        s["final"]["remat_tuned_ms"] / s["final"]["remat_default_ms"]
        for s in shapes
        if "remat_tuned_ms" in s.get("final", {})
    ]
    gm = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
    entry["confirmed_remat_geomean_vs_default"] = gm
    if tuned != base and not gm < 1.0:
        log(f"table {key}: the combination did not beat the default when confirmed ({gm:.3f}); keeping the default")
        entry["candidate_blocks"] = entry["blocks"]
        entry["blocks"] = dataclasses.asdict(base)
        tuned = base
    return tuned


# ------------------------------------------------------------------- phase 3 ---


def layer_bench(B, T, D, heads, tuned_table, workers, budget):
    """q/k/v self-relations of one layer: three launches vs one, default and tuned tiles."""
    studs, teach, ws = [], [], []
    for i, H in enumerate(heads):
        x, t, w = make_inputs(B, T, H, D, seed=100 * B + i)
        studs.append(x)
        teach.append(t)
        ws.append(w)
    Hm = sum(heads)

    def blocks_of(H, tuned):
        key = table_key(D, B, H)
        return blocks.BlockSizes(**tuned_table[key_str(key)]["blocks"]) if tuned else default_for(D, B, H)

    def separate(tuned):
        bs = [blocks_of(H, tuned) for H in heads]

        def kls(s, tch):
            return [
                self_relation_kl(a, b, impl="pallas_gpu", block_sizes=bb, interpret=INTERPRET)
                for a, b, bb in zip(s, tch, bs)
            ]

        return kls

    def merged(tuned):
        bb = blocks_of(Hm, tuned)

        def kls(s, tch):
            return self_relation_kl_multi(
                list(zip(s, tch)), impl="pallas_gpu", block_sizes=bb, interpret=INTERPRET, merge=True
            )

        return kls

    def fwd(kls):
        return jax.jit(lambda s, tch: kls(s, tch))

    def fwdbwd(kls):
        def loss(s, tch, ws):
            out = kls(s, tch)
            return sum(jnp.sum(w * kl) for w, kl in zip(ws, out)), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    have_tuned = all(key_str(table_key(D, B, H)) in tuned_table for H in set(heads) | {Hm})
    variants = {"3 launches, default": separate(False), "1 launch, default": merged(False)}
    if have_tuned:
        variants.update({"3 launches, tuned": separate(True), "1 launch, tuned": merged(True)})
    args = {"fwd": (studs, teach), "fwdbwd": (studs, teach, ws)}
    jobs = {}
    for name, kls in variants.items():
        jobs[(name, "fwd")] = (fwd(kls), args["fwd"])
        jobs[(name, "fwdbwd")] = (fwdbwd(kls), args["fwdbwd"])
    compiled = compile_all(jobs, workers)
    row = {"B": B, "T": T, "D": D, "heads": list(heads), "variants": {}, "checks": {}}
    outs = {}
    for (name, kind), c in compiled.items():
        if isinstance(c, str):
            row["variants"].setdefault(name, {})[kind] = c
            RESULTS["skipped"].append({"layer": B, "variant": name, "kind": kind, "error": c})
            continue
        outs[(name, kind)] = jax.device_get(c(*args[kind]))
    # The one-launch results against three launches (same tiles): exact up to rounding.
    for tiles in ("default", "tuned"):
        a, b = outs.get((f"1 launch, {tiles}", "fwdbwd")), outs.get((f"3 launches, {tiles}", "fwdbwd"))
        if a is None or b is None:
            continue
        (la, kla), ga = a
        (lb, klb), gb = b
        errs = {"loss": rel(la, lb)}
        for r, i in zip("qkv", range(3)):
            errs[f"kl_{r}"] = rel(kla[i], klb[i])
            errs[f"grad_{r}"] = rel(ga[i], gb[i])
        row["checks"][tiles] = errs
        if not all(math.isfinite(v) and v < TOL for v in errs.values()):
            RESULTS["mismatches"].append({"layer": B, "tiles": tiles, "rel_err": errs})
            log(f"!!! layer B={B} {tiles}: one launch != three launches {errs}")
    for name in variants:
        v = row["variants"].setdefault(name, {})
        for kind in ("fwd", "fwdbwd"):
            c = compiled[(name, kind)]
            if isinstance(c, str):
                continue
            v[f"{kind}_ms"] = 1e3 * timeit(c, *args[kind], budget=budget)
        if "fwd_ms" in v and "fwdbwd_ms" in v:
            v["remat_ms"] = v["fwd_ms"] + v["fwdbwd_ms"]
            v[f"x{NUM_LAYERS}_fwdbwd_ms"] = NUM_LAYERS * v["fwdbwd_ms"]
            v[f"x{NUM_LAYERS}_remat_ms"] = NUM_LAYERS * v["remat_ms"]
        log(f"layer B={B} {name}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items() if isinstance(x, float)))
    RESULTS["layer"].append(row)
    return row


# ---------------------------------------------------------------------- main ---


def table_python(tuned_by_key):
    """GPU_TILE_TABLE source with the tuned entries (untuned keys keep today's), as
    `ruff format` writes it: one line per entry when it fits in 120 columns."""
    table = dict(blocks.GPU_TILE_TABLE)
    table.update(tuned_by_key)
    lines = ["GPU_TILE_TABLE: dict[tuple[int, str], BlockSizes] = {"]
    for key in sorted(table):
        b = table[key]
        diff = [f"{f.name}={getattr(b, f.name)}" for f in dataclasses.fields(b) if getattr(b, f.name) != f.default]
        head = f'    ({key[0]}, "{key[1]}"): BlockSizes('
        one = head + ", ".join(diff) + "),"
        if len(one) <= 120:
            lines.append(one)
        else:
            lines += [head] + [f"        {d}," for d in diff] + ["    ),"]
    lines.append("}")
    return "\n".join(lines)


def merge_suggestion():
    """Per head-dim class: one launch if it was faster than three (remat figure) at every batch."""
    out = {}
    for row in RESULTS["layer"]:
        dclass = blocks.head_dim_class(blocks.padded_head_dim(row["D"]) * 2)
        for tiles in ("tuned", "default"):
            one, three = row["variants"].get(f"1 launch, {tiles}", {}), row["variants"].get(f"3 launches, {tiles}", {})
            if "remat_ms" in one and "remat_ms" in three:
                out.setdefault(dclass, []).append(one["remat_ms"] < three["remat_ms"])
                break
    return {k: all(v) for k, v in out.items()}


def print_summary():
    print("\nshape | key | default fwd / fwd+bwd ms | tuned fwd / fwd+bwd ms | fwd+bwd speedup | tuned config")
    for s in RESULTS["shapes"]:
        f = s.get("final", {})
        if "speedup_fwdbwd" not in f:
            print(f"{s['name']} | {s['key']} | (no final timing)")
            continue
        tb = RESULTS["table"][s["key"]]["blocks"]
        print(
            f"{s['name']} | {s['key']} | {f['fwd']['default_ms']:.3f} / {f['fwdbwd']['default_ms']:.3f} | "
            f"{f['fwd']['tuned_ms']:.3f} / {f['fwdbwd']['tuned_ms']:.3f} | {f['speedup_fwdbwd']:.2f}x | "
            f"fwd {fields(BlockSizes(**tb), FWD_FIELDS)} bwd {fields(BlockSizes(**tb), BWD_FIELDS)}"
        )
    for row in RESULTS["layer"]:
        print(f"\nlayer B={row['B']} T={row['T']} heads {row['heads']}: ms per layer (x{NUM_LAYERS} layers)")
        for name, v in row["variants"].items():
            if "remat_ms" in v:
                print(
                    f"  {name:22s} fwd {v['fwd_ms']:.3f}  fwd+bwd {v['fwdbwd_ms']:.3f} "
                    f"({NUM_LAYERS * v['fwdbwd_ms']:.1f})  remat {v['remat_ms']:.3f} ({NUM_LAYERS * v['remat_ms']:.1f})"
                )
        for tiles, errs in row["checks"].items():
            print(f"  check one vs three launches ({tiles}): max rel err {max(errs.values()):.1e}")
    if "table_python" in RESULTS:
        print("\n# paste into pallas_kernels/blocks.py:\n" + RESULTS["table_python"])
        print(f"GPU_MERGE_RELATIONS (suggested from the layer runs): {RESULTS.get('merge_suggestion')}")
    print(f"\nskipped configs: {len(RESULTS['skipped'])}, mismatches: {len(RESULTS['mismatches'])}")


def plan(shapes):
    for name, D, B, H, T in shapes:
        key = table_key(D, B, H)
        grid = T // default_for(D, B, H).block_q * B * H
        print(f"{name}: D={D} B={B} H={H} T={T} key={key} forward grid at the default tiles: {grid} programs")
        for kind in ("fwd", "fwdbwd"):
            for tup, b in candidates(kind, D, B, H):
                blocks.pick_blocks(b, "pallas_gpu", T, blocks.padded_head_dim(D) * 2, B * H)  # raises if invalid
                print(f"  {kind:6s} {tup}")
    n = sum(len(candidates(k, D, B, H)) for _, D, B, H, _ in shapes for k in ("fwd", "fwdbwd"))
    print(f"{n} compiled configs in the sweep (+ up to 2 per shape to confirm, + 8 per layer batch)")


def main(argv=None):
    global INTERPRET, SHAPES, LAYER_BATCHES, LAYER_T, LAYER_D, MAX_PER_KIND
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="JSON path (written as the run goes)")
    p.add_argument("--budget_s", type=float, default=225.0, help="stop starting new shapes after this")
    p.add_argument("--layer_reserve_s", type=float, default=45.0, help="time kept for the layer section")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel compilations")
    p.add_argument("--time_budget", type=float, default=0.3, help="seconds of timing per config")
    p.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    p.add_argument("--no_layer", action="store_true")
    p.add_argument("--dry_run", action="store_true", help="print the plan and validate the configs; run nothing")
    p.add_argument("--cpu_smoke", action="store_true", help="tiny shapes, Pallas in interpret mode (CPU)")
    args = p.parse_args(argv)
    shapes = list(SHAPES)
    if args.cpu_smoke:
        INTERPRET, MAX_PER_KIND = True, 2
        shapes = [("d16_b2_h9", 16, 2, 9, 64), ("d16_b1_h3", 16, 1, 3, 64), ("d128_b1_h2", 128, 1, 2, 32)]
        LAYER_BATCHES, LAYER_T, LAYER_D = (1,), 64, 16
        args.time_budget = 0.01
    if args.only:
        keep = set(args.only.split(","))
        shapes = [s for s in shapes if s[0] in keep]
    if args.dry_run:
        plan(shapes)
        return 0
    deadline = T0 + args.budget_s
    dev = jax.devices()[0]
    RESULTS["meta"] = dict(
        device=str(dev.device_kind),
        jax=jax.__version__,
        backend=jax.default_backend(),
        argv=sys.argv,
        interpret=INTERPRET,
        dtype="bfloat16",
        causal=True,
        self_relation=True,
        tol_rel_vs_default=TOL,
        command="PYTHONUNBUFFERED=1 python3 -m experiments.tune_relation_kl --out $OUT/tune.json",
    )
    log("device", dev.device_kind, "jax", jax.__version__, "workers", args.workers)
    if jax.default_backend() != "gpu" and not INTERPRET:
        print("no GPU: use --cpu_smoke (interpret mode) or --dry_run", file=sys.stderr)
        return 2

    # Phase 1: sweep every shape.
    states = []
    for name, D, B, H, T in shapes:
        if time.time() > deadline - (0 if args.no_layer else args.layer_reserve_s):
            log(f"{name}: skipped (time budget)")
            RESULTS["skipped"].append({"shape": name, "error": "time budget"})
            continue
        s = dict(name=name, D=D, B=B, H=H, T=T, key=key_str(table_key(D, B, H)))
        s["default"] = dataclasses.asdict(default_for(D, B, H))
        try:
            s["sweep"] = sweep_shape(s, args.workers, args.time_budget)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            s["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            RESULTS["shapes"].append({k: v for k, v in s.items() if not k.startswith("_")})
            save(args.out)
            continue
        states.append(s)
        RESULTS["shapes"].append({k: v for k, v in s.items() if not k.startswith("_")})
        save(args.out)

    # Phase 2: one entry per table key, confirmed on each of its shapes.
    by_key: dict = {}
    for s in states:
        by_key.setdefault(tuple(s["key"].split(",")), []).append(s)
    tuned_by_key = {}
    for (dclass, size), group in by_key.items():
        key = (int(dclass), size)
        try:
            tuned_by_key[key] = finalize_key(key, group, args.workers, args.time_budget)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["table"][key_str(key)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        for s in group:  # refresh the JSON rows with the final timings
            for row in RESULTS["shapes"]:
                if row["name"] == s["name"]:
                    row["final"] = s.get("final")
        save(args.out)
    RESULTS["table_python"] = table_python(tuned_by_key)

    # Phase 3: the layer's three relations, three launches vs one.
    if not args.no_layer:
        tuned_table = {k: v for k, v in RESULTS["table"].items() if "blocks" in v}
        for B in LAYER_BATCHES:
            try:
                layer_bench(B, LAYER_T, LAYER_D, LAYER_HEADS, tuned_table, args.workers, args.time_budget)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                RESULTS["layer"].append({"B": B, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            save(args.out)
        RESULTS["merge_suggestion"] = merge_suggestion()
    save(args.out)
    print_summary()
    if RESULTS["mismatches"]:
        print(f"\n!!! {len(RESULTS['mismatches'])} MISMATCH(ES) against the default config:", file=sys.stderr)
        for m in RESULTS["mismatches"]:
            print("   ", json.dumps(m), file=sys.stderr)
        return 1
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
