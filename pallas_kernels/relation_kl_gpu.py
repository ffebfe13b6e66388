"""Relation KL as Pallas kernels lowered through Triton (NVIDIA GPUs): impl "pallas_gpu".

Backend module of `relation_kl.py` (contract there; tiles from `blocks.py`,
tile math from `_math.py`, cost estimates from `cost.py`).

Three kernels, all on [B, Tp, H, Dp] inputs, grid (tiles, B, H):
  _fwd_kernel     one query block, ONE pass over the key tiles up to the diagonal:
                  both logit tiles, online statistics (see _math.py), writes the KL
                  row and the two base-2 LSEs (the residuals).
  _dleft_kernel   one query block, loop over key tiles: recompute both logit tiles
                  from the LSEs, dS = g (p_s - p_t) scale, d_left += dS @ s_right.
  _dright_kernel  one key block, loop over query tiles from the diagonal down:
                  the same dS, d_right += dS^T @ s_left.

Why a d_left/d_right split rather than one backward kernel by default: a fused
kernel computes each dS tile once (4 tile matmuls instead of 6, 2 exponentials per
pair instead of 4) but must scatter one of the two gradients with float32 atomics
across programs; in Pallas/Triton those are atomic_add on a [block, D] tile,
non-deterministic, and they may serialise in L2 at this tile count (T^2 D /
block_k adds per head). The split keeps every output block owned by one program
(deterministic, no atomics, no zero-init pass) at the price of recomputing the two
logit tiles once more. `BlockSizes(fused_bwd=True)` runs the fused variant
(_dright_kernel and `_dright` with fused=True) so an H200 can decide.

Causal tiles above the diagonal are skipped by loop bounds; tiles entirely below
it run without any mask arithmetic, only the diagonal ones are masked (unless
mask/segments are given, then every tile is). The query-block grid axis runs
from the longest rows to the shortest, so the heavy programs start first.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _math, cost

try:  # jax >= 0.4.36 names it CompilerParams; older: TritonCompilerParams.
    from jax.experimental.pallas import triton as _plgpu

    _CompilerParams = getattr(_plgpu, "CompilerParams", None) or _plgpu.TritonCompilerParams
    _inline_asm = getattr(_plgpu, "elementwise_inline_asm", None)
    _atomic_add = getattr(_plgpu, "atomic_add", None)
except ImportError:  # pragma: no cover - very old jax
    _CompilerParams = _inline_asm = _atomic_add = None


def _exp2_ftz(x):
    """2**x as one MUFU.EX2 (flush-to-zero). jnp.exp2 lowers to libdevice's
    __nv_exp2f, which adds range fix-ups for denormal results around it; here
    results below 2**-126 are probabilities we may flush to 0."""
    return _inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
    )[0]


def _exp2_for(cfg):
    # The interpreter cannot run PTX; it (and jax without inline asm) uses exp2.
    if cfg.blocks.fast_exp2 and not cfg.interpret and _inline_asm is not None:
        return _exp2_ftz
    return jnp.exp2


def _exp2_t_for(cfg):
    """The teacher's exponential: the polynomial one on the FMA pipes when `exp2_split`."""
    return _math.exp2_poly if cfg.blocks.exp2_split else _exp2_for(cfg)


def _compiler_params(num_warps, num_stages):
    if _CompilerParams is None:
        return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


_dot = _math.tile_dot


def _masked(u_s, u_t, rows, cols, q_ids, k_ids, causal):
    valid = None
    if causal:
        valid = rows[:, None] >= cols[None, :]
    if q_ids is not None:
        same = q_ids[:, None] == k_ids[None, :]
        valid = same if valid is None else valid & same
    return jnp.where(valid, u_s, -jnp.inf), jnp.where(valid, u_t, -jnp.inf)


def _key_loop(body, i, bq, bk, nk, causal, has_ids, init):
    """Loop over the key tiles of query block i: unmasked tiles, then the diagonal."""
    if not causal:
        return lax.fori_loop(0, nk, functools.partial(body, masked=has_ids), init)
    hi = lax.div((i + 1) * bq + bk - 1, bk)
    if has_ids:
        return lax.fori_loop(0, hi, functools.partial(body, masked=True), init)
    n_full = lax.div(i * bq, bk)  # key tiles entirely left of the diagonal
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init)
    return lax.fori_loop(n_full, hi, functools.partial(body, masked=True), carry)


def _unpack(refs, n_in, has_ids):
    ins, outs = list(refs[:n_in]), list(refs[n_in:])
    if not has_ids:
        ins[4:4] = [None, None]
    return ins, outs


def _fwd_kernel(*refs, c, causal, bq, bk, nq, nk, has_ids, exp2, exp2_t):
    (sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref), (kl_ref, lss_ref, lst_ref) = _unpack(
        refs, 6 if has_ids else 4, has_ids
    )
    i = nq - 1 - pl.program_id(0)
    sl, tl = sl_ref[...], tl_ref[...]
    rows = i * bq + jnp.arange(bq)
    q_ids = qid_ref[...] if has_ids else None

    def body(j, stats, masked):
        k0 = pl.multiple_of(j * bk, bk)
        u_s = _dot(sl, sr_ref[pl.ds(k0, bk), :])
        u_t = _dot(tl, tr_ref[pl.ds(k0, bk), :])
        diff = u_t - u_s
        if masked:
            k_ids = kid_ref[pl.ds(k0, bk)] if has_ids else None
            u_s, u_t = _masked(u_s, u_t, rows, k0 + jnp.arange(bk), q_ids, k_ids, causal)
        return _math.online_update(stats, u_s, u_t, diff, c, exp2, exp2_t=exp2_t)

    stats = _key_loop(body, i, bq, bk, nk, causal, has_ids, _math.init_stats((bq,)))
    kl, lse_s, lse_t = _math.finalize(stats, c)
    kl_ref[...] = kl
    lss_ref[...] = lse_s
    lst_ref[...] = lse_t


def _dleft_kernel(*refs, c, scale, causal, bq, bk, nq, nk, has_ids, exp2, exp2_t):
    (sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref, lss_ref, lst_ref, g_ref), (dl_ref,) = _unpack(
        refs, 9 if has_ids else 7, has_ids
    )
    i = nq - 1 - pl.program_id(0)
    sl, tl = sl_ref[...], tl_ref[...]
    lse_s, lse_t, g = lss_ref[...], lst_ref[...], g_ref[...] * scale
    rows = i * bq + jnp.arange(bq)
    q_ids = qid_ref[...] if has_ids else None

    def body(j, acc, masked):
        k0 = pl.multiple_of(j * bk, bk)
        sr = sr_ref[pl.ds(k0, bk), :]
        u_s = _dot(sl, sr)
        u_t = _dot(tl, tr_ref[pl.ds(k0, bk), :])
        if masked:
            k_ids = kid_ref[pl.ds(k0, bk)] if has_ids else None
            u_s, u_t = _masked(u_s, u_t, rows, k0 + jnp.arange(bk), q_ids, k_ids, causal)
        ds = _math.grad_logits(u_s, u_t, lse_s, lse_t, g, c, exp2, exp2_t=exp2_t)
        return acc + _dot(ds.astype(sr.dtype), sr, contract=(1, 0))

    acc = jnp.zeros(sl.shape, jnp.float32)
    acc = _key_loop(body, i, bq, bk, nk, causal, has_ids, acc)
    dl_ref[...] = acc.astype(dl_ref.dtype)


def _dright_kernel(*refs, c, scale, causal, bq, bk, nq, nk, has_ids, exp2, exp2_t, fused=False):
    """d_right over one key block (the query tiles from its diagonal on). `fused`: also add each
    tile's d_left share, ds . s_right, into the float32 d_left by atomic adds (refs then end with
    the zeros it starts from and the outputs d_left, d_right): each tile's logits and
    exponentials once for both gradients, where the two kernels compute them twice."""
    n_out = 2 if fused else 1
    n_in = (9 if has_ids else 7) + int(fused)
    ins, outs = _unpack(refs, n_in, has_ids)
    sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref, lss_ref, lst_ref, g_ref = ins[:9]
    dl_ref, dr_ref = (None, *outs) if n_out == 1 else outs
    j = pl.program_id(0)
    sr, tr = sr_ref[...], tr_ref[...]
    cols = j * bk + jnp.arange(bk)
    k_ids = kid_ref[...] if has_ids else None

    def body(i, acc, masked):
        q0 = pl.multiple_of(i * bq, bq)
        rows_ds = pl.ds(q0, bq)
        sl = sl_ref[rows_ds, :]
        u_s = _dot(sl, sr)
        u_t = _dot(tl_ref[rows_ds, :], tr)
        if masked:
            q_ids = qid_ref[rows_ds] if has_ids else None
            u_s, u_t = _masked(u_s, u_t, q0 + jnp.arange(bq), cols, q_ids, k_ids, causal)
        ds = _math.grad_logits(
            u_s, u_t, lss_ref[rows_ds], lst_ref[rows_ds], g_ref[rows_ds] * scale, c, exp2, exp2_t=exp2_t
        ).astype(sl.dtype)
        if dl_ref is not None:
            _atomic_add(dl_ref, (rows_ds, slice(None)), _dot(ds, sr, contract=(1, 0)))
        return acc + _dot(ds, sl, contract=(0, 0))

    acc = jnp.zeros(sr.shape, jnp.float32)
    if not causal:
        acc = lax.fori_loop(0, nq, functools.partial(body, masked=has_ids), acc)
    elif has_ids:
        acc = lax.fori_loop(lax.div(j * bk, bq), nq, functools.partial(body, masked=True), acc)
    else:
        # Query blocks from the diagonal: masked until the first block whose first
        # row is past this key block's last column, unmasked after it.
        n_diag = lax.div((j + 1) * bk + bq - 1, bq)
        acc = lax.fori_loop(lax.div(j * bk, bq), n_diag, functools.partial(body, masked=True), acc)
        acc = lax.fori_loop(n_diag, nq, functools.partial(body, masked=False), acc)
    dr_ref[...] = acc.astype(dr_ref.dtype)


def _specs(B, Tp, H, Hr, Dp, n_tiles, blk, tiled_side, has_ids, reverse):
    """BlockSpecs for (sl, sr, tl, tr[, q_ids, k_ids]); `tiled_side` is 'left' or
    'right': that side is cut into [blk, Dp] tiles along the grid, the other side
    is the whole sequence of the head."""
    G = H // Hr
    tile = (lambda p: n_tiles - 1 - p) if reverse else (lambda p: p)
    if tiled_side == "left":
        left = pl.BlockSpec((None, blk, None, Dp), lambda p, b, h: (b, tile(p), h, 0))
        right = pl.BlockSpec((None, Tp, None, Dp), lambda p, b, h: (b, 0, h // G, 0))
        qid = pl.BlockSpec((None, blk), lambda p, b, h: (b, tile(p)))
        kid = pl.BlockSpec((None, Tp), lambda p, b, h: (b, 0))
    else:
        left = pl.BlockSpec((None, Tp, None, Dp), lambda p, b, h: (b, 0, h, 0))
        right = pl.BlockSpec((None, blk, None, Dp), lambda p, b, h: (b, tile(p), h // G, 0))
        qid = pl.BlockSpec((None, Tp), lambda p, b, h: (b, 0))
        kid = pl.BlockSpec((None, blk), lambda p, b, h: (b, tile(p)))
    specs = [left, right, left, right]
    return specs + [qid, kid] if has_ids else specs


def forward(sl, sr, tl, tr, q_ids, k_ids, *, cfg):
    B, Tp, H, Dp = sl.shape
    Hr = sr.shape[2]
    bl = cfg.blocks
    bq, bk = bl.block_q, bl.block_k
    nq, nk = Tp // bq, Tp // bk
    has_ids = q_ids is not None
    kernel = functools.partial(
        _fwd_kernel,
        c=cfg.scale * _math.LOG2E,
        causal=cfg.causal,
        bq=bq,
        bk=bk,
        nq=nq,
        nk=nk,
        has_ids=has_ids,
        exp2=_exp2_for(cfg),
        exp2_t=_exp2_t_for(cfg),
    )
    row_spec = pl.BlockSpec((None, None, bq), lambda p, b, h: (b, h, nq - 1 - p))
    row = jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)
    args = (sl, sr, tl, tr) + ((q_ids, k_ids) if has_ids else ())
    return pl.pallas_call(
        kernel,
        grid=(nq, B, H),
        in_specs=_specs(B, Tp, H, Hr, Dp, nq, bq, "left", has_ids, reverse=True),
        out_specs=[row_spec] * 3,
        out_shape=[row] * 3,
        compiler_params=_compiler_params(bl.num_warps_fwd, bl.num_stages_fwd),
        cost_estimate=cost.estimate("fwd", B=B, H=H, T=Tp, D=Dp, causal=cfg.causal, operands=args, outputs=[row] * 3),
        interpret=cfg.interpret,
        name="relation_kl_fwd",
    )(*args)


def backward(sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g, *, cfg):
    B, Tp, H, Dp = sl.shape
    Hr = sr.shape[2]
    bl = cfg.blocks
    has_ids = q_ids is not None
    ids = (q_ids, k_ids) if has_ids else ()
    common = dict(
        c=cfg.scale * _math.LOG2E,
        scale=cfg.scale,
        causal=cfg.causal,
        has_ids=has_ids,
        exp2=_exp2_for(cfg),
        exp2_t=_exp2_t_for(cfg),
    )
    params = _compiler_params(bl.num_warps_bwd, bl.num_stages_bwd)
    args = (sl, sr, tl, tr, *ids, lse_s, lse_t, g)
    shapes = dict(B=B, H=H, T=Tp, D=Dp, causal=cfg.causal, operands=args)
    if bl.fused_bwd:
        return _dright(args, common, params, shapes, cfg, has_ids, fused=True)

    bq, bk = bl.block_q_dq, bl.block_k_dq
    nq, nk = Tp // bq, Tp // bk
    row_blk = pl.BlockSpec((None, None, bq), lambda p, b, h: (b, h, nq - 1 - p))
    out = jax.ShapeDtypeStruct(sl.shape, sl.dtype)
    d_sl = pl.pallas_call(
        functools.partial(_dleft_kernel, bq=bq, bk=bk, nq=nq, nk=nk, **common),
        grid=(nq, B, H),
        in_specs=_specs(B, Tp, H, Hr, Dp, nq, bq, "left", has_ids, reverse=True) + [row_blk] * 3,
        out_specs=pl.BlockSpec((None, bq, None, Dp), lambda p, b, h: (b, nq - 1 - p, h, 0)),
        out_shape=out,
        compiler_params=params,
        cost_estimate=cost.estimate("dleft", outputs=out, **shapes),
        interpret=cfg.interpret,
        name="relation_kl_dleft",
    )(*args)
    return d_sl, _dright(args, common, params, shapes, cfg, has_ids, fused=False)[1]


def _dright(args, common, params, shapes, cfg, has_ids, *, fused):
    """The d_right kernel over key blocks (block_q_dk x block_k_dk): (None, d_right), or with
    `fused` (`BlockSizes(fused_bwd=True)`) also d_left, added by atomic adds into a
    zero-initialised float32 buffer that every program of a head shares: (d_left, d_right). The
    fused d_left is not deterministic to the last bit (the order of the adds varies on a GPU).
    One output per query head; grouped heads (GQA) are summed here in float32."""
    if fused and _atomic_add is None:  # pragma: no cover - a jax without Pallas Triton atomics
        raise ValueError("BlockSizes(fused_bwd=True) needs jax.experimental.pallas.triton.atomic_add")
    sl, sr = args[0], args[1]
    B, Tp, H, Dp = sl.shape
    Hr = sr.shape[2]
    G = H // Hr
    bl = cfg.blocks
    bq, bk = bl.block_q_dk, bl.block_k_dk
    nq, nk = Tp // bq, Tp // bk
    row_all = pl.BlockSpec((None, None, Tp), lambda p, b, h: (b, h, 0))
    d_right = jax.ShapeDtypeStruct((B, Tp, H, Dp), sr.dtype if G == 1 else jnp.float32)
    right_spec = pl.BlockSpec((None, bk, None, Dp), lambda p, b, h: (b, p, h, 0))
    in_specs = _specs(B, Tp, H, Hr, Dp, nk, bk, "right", has_ids, reverse=False) + [row_all] * 3
    if fused:
        whole_left = pl.BlockSpec((None, Tp, None, Dp), lambda p, b, h: (b, 0, h, 0))  # every program adds into it
        d_left = jax.ShapeDtypeStruct((B, Tp, H, Dp), jnp.float32)
        extra = dict(
            in_specs=in_specs + [whole_left],
            out_specs=[whole_left, right_spec],
            out_shape=[d_left, d_right],
            input_output_aliases={len(args): 0},  # the zeros d_left starts from
        )
        operands, outputs = (*args, jnp.zeros(d_left.shape, d_left.dtype)), [d_left, d_right]
    else:
        extra = dict(in_specs=in_specs, out_specs=right_spec, out_shape=d_right)
        operands, outputs = args, d_right
    out = pl.pallas_call(
        functools.partial(_dright_kernel, bq=bq, bk=bk, nq=nq, nk=nk, fused=fused, **common),
        grid=(nk, B, H),
        compiler_params=params,
        cost_estimate=cost.estimate("dfused" if fused else "dright", outputs=outputs, **shapes),
        interpret=cfg.interpret,
        name="relation_kl_dfused" if fused else "relation_kl_dright",
        **extra,
    )(*operands)
    d_sl, d_sr = out if fused else (None, out)
    if G > 1:
        d_sr = d_sr.reshape(B, Tp, Hr, G, Dp).sum(axis=3)
    return (None if d_sl is None else d_sl.astype(sl.dtype)), d_sr
