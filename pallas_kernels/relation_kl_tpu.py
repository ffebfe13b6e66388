"""Relation KL as Pallas kernels lowered through Mosaic (TPU): impl "pallas_tpu".

Backend module of `relation_kl.py` (contract there; tiles and the (8, 128)
block rules from `blocks.py`, tile math from `_math.py`, cost estimates from
`cost.py`). Same algorithm as `relation_kl_gpu.py` (one-pass forward with online
statistics, LSE residuals, recomputing d_left / d_right backward); what differs
is how a TPU wants the work cut up:

  * Every grid step handles ONE [block_q, block_k] tile. The reduction over
    tiles is the last grid axis ("arbitrary"), its running state lives in VMEM
    scratch (float32) and the output block is written on the last step. This is
    the pattern of jax/experimental/pallas/ops/tpu/flash_attention.py.
  * Blocks respect the (8, 128) vreg tiling: inputs are viewed as
    [B, Tp, H * Dq] with Dq a multiple of 128 (D is zero-padded here; zeros add
    nothing to a dot product), so a head is a lane-aligned [block, Dq] window
    picked by the index map (no transpose). Row statistics travel as
    [B, H, Tp, 1] columns and key ids as [B, 1, Tp] rows, so a tile's masks and
    statistics broadcast to [block_q, block_k] without relayouts.
  * Causal: tiles above the diagonal are skipped with `pl.when`, and the index
    maps clamp the key (d_right: query) block to the last (first) one needed,
    so the pipeline sees an unchanged block index and fetches nothing for a
    skipped step. Tiles entirely below the diagonal run without mask arithmetic
    (with mask/segment ids every visited tile is masked).
  * d_right: grid (B, H_right, key blocks, G, query blocks); the G query heads
    that share a right head (GQA) are summed in the VMEM accumulator, so no
    per-query-head float32 buffer goes through HBM.

The tile math is `_math.py` called with keepdims=True (row statistics
[rows, 1]), the 2-D form Mosaic lowers without 1-D relayouts. `interpret=True` runs the
kernels in Pallas' TPU interpret mode (`pltpu.InterpretParams`) on CPU, which
simulates VMEM scratch and the block DMAs.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _math, blocks, cost

# ---------------------------------------------------------------- tile math ---


def _dot(a, b):
    """[m, k] x [k, n] -> [m, n] f32."""
    return _math.tile_dot(a, b, (1, 0))


def _dot_nt(a, b):
    """[m, k] x [n, k] -> [m, n] f32 (a @ b.T)."""
    return _math.tile_dot(a, b, (1, 1))


_online_update = functools.partial(_math.online_update, keepdims=True)
_grad_logits = functools.partial(_math.grad_logits, keepdims=True)


def _masked(r_s, r_t, q0, k0, q_ids, k_ids, causal):
    """-inf outside (causal) and outside q_ids[i] == k_ids[j]; ids [bq, 1], [1, bk]."""
    valid = None
    if causal:
        shape = r_s.shape
        rows = lax.broadcasted_iota(jnp.int32, shape, 0) + q0
        cols = lax.broadcasted_iota(jnp.int32, shape, 1) + k0
        valid = rows >= cols
    if q_ids is not None:
        same = q_ids == k_ids
        valid = same if valid is None else valid & same
    return jnp.where(valid, r_s, -jnp.inf), jnp.where(valid, r_t, -jnp.inf)


def _visit(tile, i, j, bq, bk, causal, has_ids):
    """Run tile(masked) for query block i x key block j, skipping causal upper tiles."""
    if not causal:
        tile(masked=has_ids)
        return
    needed = j * bk <= (i + 1) * bq - 1  # first key <= last row
    if has_ids:
        pl.when(needed)(lambda: tile(masked=True))
        return
    below = (j + 1) * bk - 1 <= i * bq  # last key <= first row: no mask
    pl.when(below)(lambda: tile(masked=False))
    pl.when(needed & jnp.logical_not(below))(lambda: tile(masked=True))


# lax.div, not //: floor division of signed ints lowers through sign(), which
# Mosaic can only lower once it knows the chip; the operands are >= 0 anyway.
def _last_k_block(i, bq, bk):
    return lax.div((i + 1) * bq - 1, bk)


def _first_q_block(j, bq, bk):
    return lax.div(j * bk, bq)


# ------------------------------------------------------------------ kernels ---


def _split_refs(refs, has_ids, n_rows_in, n_out):
    """(sl, sr, tl, tr, q_ids|None, k_ids|None, *row inputs), outputs, scratch."""
    n_in = 4 + 2 * has_ids + n_rows_in
    ins = list(refs[:n_in])
    if not has_ids:
        ins[4:4] = [None, None]
    return ins, refs[n_in : n_in + n_out], refs[n_in + n_out :]


def _fwd_kernel(*refs, c, causal, bq, bk, has_ids):
    (sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref), outs, stat_refs = _split_refs(refs, has_ids, 0, 3)
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        for ref, v in zip(stat_refs, _math.init_stats((bq, 1))):
            ref[...] = v

    def tile(masked):
        r_s = _dot_nt(sl_ref[...], sr_ref[...])
        r_t = _dot_nt(tl_ref[...], tr_ref[...])
        diff = r_t - r_s
        if masked:
            ids = (qid_ref[...], kid_ref[...]) if has_ids else (None, None)
            r_s, r_t = _masked(r_s, r_t, i * bq, j * bk, *ids, causal)
        stats = _online_update(tuple(ref[...] for ref in stat_refs), r_s, r_t, diff, c)
        for ref, v in zip(stat_refs, stats):
            ref[...] = v

    _visit(tile, i, j, bq, bk, causal, has_ids)

    @pl.when(j == nk - 1)
    def _finish():
        for ref, v in zip(outs, _math.finalize(tuple(r[...] for r in stat_refs), c)):
            ref[...] = v


def _dleft_kernel(*refs, c, scale, causal, bq, bk, has_ids):
    (sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref, lss_ref, lst_ref, g_ref), (dl_ref,), (acc_ref,) = _split_refs(
        refs, has_ids, 3, 1
    )
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def tile(masked):
        sr = sr_ref[...]
        r_s = _dot_nt(sl_ref[...], sr)
        r_t = _dot_nt(tl_ref[...], tr_ref[...])
        if masked:
            ids = (qid_ref[...], kid_ref[...]) if has_ids else (None, None)
            r_s, r_t = _masked(r_s, r_t, i * bq, j * bk, *ids, causal)
        ds = _grad_logits(r_s, r_t, lss_ref[...], lst_ref[...], g_ref[...] * scale, c)
        acc_ref[...] += _dot(ds.astype(sr.dtype), sr)

    _visit(tile, i, j, bq, bk, causal, has_ids)

    @pl.when(j == nk - 1)
    def _finish():
        dl_ref[...] = acc_ref[...].astype(dl_ref.dtype)


def _dright_kernel(*refs, c, scale, causal, bq, bk, has_ids):
    (sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref, lss_ref, lst_ref, g_ref), (dr_ref,), (acc_ref,) = _split_refs(
        refs, has_ids, 3, 1
    )
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    last = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when((g == 0) & (i == 0))
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def tile(masked):
        sl = sl_ref[...]
        r_s = _dot_nt(sl, sr_ref[...])
        r_t = _dot_nt(tl_ref[...], tr_ref[...])
        if masked:
            ids = (qid_ref[...], kid_ref[...]) if has_ids else (None, None)
            r_s, r_t = _masked(r_s, r_t, i * bq, j * bk, *ids, causal)
        ds = _grad_logits(r_s, r_t, lss_ref[...], lst_ref[...], g_ref[...] * scale, c)
        acc_ref[...] += _dot(ds.T.astype(sl.dtype), sl)

    _visit(tile, i, j, bq, bk, causal, has_ids)

    @pl.when(last)
    def _finish():
        dr_ref[...] = acc_ref[...].astype(dr_ref.dtype)


# ----------------------------------------------------------------- wrappers ---


def _interpret(cfg):
    return pltpu.InterpretParams() if cfg.interpret else False


def _lane_pad(x):
    """[B, Tp, H, Dp] -> [B, Tp, H * Dq], Dq a multiple of 128 (zero columns)."""
    B, Tp, H, Dp = x.shape
    Dq = blocks.lane_dim(Dp)
    if Dq != Dp:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, Dq - Dp)))
    return x.reshape(B, Tp, H * Dq), Dq


def _prepare(sl, sr, tl, tr, q_ids, k_ids):
    (sl, Dq), (sr, _), (tl, _), (tr, _) = map(_lane_pad, (sl, sr, tl, tr))
    ids = ()
    if q_ids is not None:
        B, Tp = q_ids.shape
        ids = (q_ids.reshape(B, Tp, 1), k_ids.reshape(B, 1, Tp))
    return (sl, sr, tl, tr), ids, Dq


def _row_specs(bq, bk, Dq, G, causal, has_ids):
    """Specs of (sl, sr, tl, tr[, q_ids, k_ids]) for grids (b, h, i, j) whose last
    axis walks key blocks; causal steps past the diagonal keep the last block."""
    kb = (lambda i, j: jnp.minimum(j, _last_k_block(i, bq, bk))) if causal else (lambda i, j: j)
    left = pl.BlockSpec((None, bq, Dq), lambda b, h, i, j: (b, i, h))
    right = pl.BlockSpec((None, bk, Dq), lambda b, h, i, j: (b, kb(i, j), lax.div(h, G)))
    specs = [left, right, left, right]
    if has_ids:
        specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kb(i, j))),
        ]
    return specs


def _fold_vmap(fn):
    """fn with a vmap rule that folds the mapped axis into the batch axis (axis 0
    of every argument and result): one pallas_call with a larger B instead of a
    batched pallas_call. Same work either way; needed because the TPU
    interpreter of jax 0.10.2 fails on a batched pallas_call whose grid has
    dimension_semantics (it does not count the added grid axis)."""

    @jax.custom_batching.custom_vmap
    def folded(*args):
        return fn(*args)

    @folded.def_vmap
    def _rule(axis_size, in_batched, *args):
        def fold(x, batched):
            x = x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            return x.reshape((-1,) + x.shape[2:])

        outs = folded(*jax.tree.map(fold, args, tuple(in_batched)))
        outs = jax.tree.map(lambda y: y.reshape((axis_size, -1) + y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return folded


def forward(sl, sr, tl, tr, q_ids, k_ids, *, cfg):
    return _fold_vmap(functools.partial(_forward, cfg=cfg))(sl, sr, tl, tr, q_ids, k_ids)


def backward(sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g, *, cfg):
    return _fold_vmap(functools.partial(_backward, cfg=cfg))(sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g)


def _forward(sl, sr, tl, tr, q_ids, k_ids, *, cfg):
    B, Tp, H, Dp = sl.shape
    G = H // sr.shape[2]
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    has_ids = q_ids is not None
    xs, ids, Dq = _prepare(sl, sr, tl, tr, q_ids, k_ids)
    col = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    row = jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, c=cfg.scale * _math.LOG2E, causal=cfg.causal, bq=bq, bk=bk, has_ids=has_ids),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(B, H, Tp // bq, Tp // bk),
            in_specs=_row_specs(bq, bk, Dq, G, cfg.causal, has_ids),
            out_specs=[col] * 3,
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32)] * 5,
        ),
        out_shape=[row] * 3,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost.estimate(
            "fwd", B=B, H=H, T=Tp, D=Dq, causal=cfg.causal, operands=(*xs, *ids), outputs=[row] * 3
        ),
        interpret=_interpret(cfg),
        name="relation_kl_fwd_tpu",
    )(*xs, *ids)
    return tuple(o.reshape(B, H, Tp) for o in outs)


def _backward(sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g, *, cfg):
    B, Tp, H, Dp = sl.shape
    Hr = sr.shape[2]
    G = H // Hr
    bl = cfg.blocks
    has_ids = q_ids is not None
    xs, ids, Dq = _prepare(sl, sr, tl, tr, q_ids, k_ids)
    rows_in = tuple(x.reshape(B, H, Tp, 1) for x in (lse_s, lse_t, g))
    common = dict(c=cfg.scale * _math.LOG2E, scale=cfg.scale, causal=cfg.causal, has_ids=has_ids)
    args = (*xs, *ids, *rows_in)
    shapes = dict(B=B, H=H, T=Tp, D=Dq, causal=cfg.causal, operands=args)

    bq, bk = bl.block_q_dq, bl.block_k_dq
    out = jax.ShapeDtypeStruct((B, Tp, H * Dq), sl.dtype)
    col = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    d_sl = pl.pallas_call(
        functools.partial(_dleft_kernel, bq=bq, bk=bk, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(B, H, Tp // bq, Tp // bk),
            in_specs=_row_specs(bq, bk, Dq, G, cfg.causal, has_ids) + [col] * 3,
            out_specs=pl.BlockSpec((None, bq, Dq), lambda b, h, i, j: (b, i, h)),
            scratch_shapes=[pltpu.VMEM((bq, Dq), jnp.float32)],
        ),
        out_shape=out,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost.estimate("dleft", outputs=out, **shapes),
        interpret=_interpret(cfg),
        name="relation_kl_dleft_tpu",
    )(*args)

    # Grid (b, hr, j, g, i): key block j of right head hr owns its output and
    # accumulates over the G grouped query heads and the query blocks i.
    bq, bk = bl.block_q_dk, bl.block_k_dk
    qb = (lambda i, j: jnp.maximum(i, _first_q_block(j, bq, bk))) if cfg.causal else (lambda i, j: i)
    left = pl.BlockSpec((None, bq, Dq), lambda b, r, j, g, i: (b, qb(i, j), r * G + g))
    right = pl.BlockSpec((None, bk, Dq), lambda b, r, j, g, i: (b, j, r))
    specs = [left, right, left, right]
    if has_ids:
        specs += [
            pl.BlockSpec((None, bq, 1), lambda b, r, j, g, i: (b, qb(i, j), 0)),
            pl.BlockSpec((None, 1, bk), lambda b, r, j, g, i: (b, 0, j)),
        ]
    col = pl.BlockSpec((None, None, bq, 1), lambda b, r, j, g, i: (b, r * G + g, qb(i, j), 0))
    out = jax.ShapeDtypeStruct((B, Tp, Hr * Dq), sr.dtype)
    d_sr = pl.pallas_call(
        functools.partial(_dright_kernel, bq=bq, bk=bk, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(B, Hr, Tp // bk, G, Tp // bq),
            in_specs=specs + [col] * 3,
            out_specs=pl.BlockSpec((None, bk, Dq), lambda b, r, j, g, i: (b, j, r)),
            scratch_shapes=[pltpu.VMEM((bk, Dq), jnp.float32)],
        ),
        out_shape=out,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=cost.estimate("dright", outputs=out, **shapes),
        interpret=_interpret(cfg),
        name="relation_kl_dright_tpu",
    )(*args)

    d_sl = d_sl.reshape(B, Tp, H, Dq)[..., :Dp]
    d_sr = d_sr.reshape(B, Tp, Hr, Dq)[..., :Dp]
    return d_sl, d_sr
