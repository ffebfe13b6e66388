"""Causal self-attention for the Llama model, in several implementations of the same function.

`attention(q, k, v, mask=..., impl=...)` with q [B, T, H, D] and k, v [B, S, KV, D] (GQA: head h
reads kv head h // (H // KV)) returns [B, T, H, D] in q's dtype. `mask` is None (plain causal), a
`MaskInfo(segment_ids, attention_mask)` (packed rows and/or key padding) or, for backward
compatibility, a dense boolean [B, 1, T, S] matrix. With a MaskInfo every implementation keeps the
diagonal, as `model.attention_mask_matrix` does, so padded query rows stay finite. Rows of padded
queries (attention_mask False) are outside the contract: finite, but each implementation fills
them its own way (dense: the valid keys of their segment plus themselves; cuDNN: their own value;
pallas_tpu: the other padded tokens); no loss or metric reads them.

Implementations (`LlamaConfig.attention_impl`):

* ``xla``       -- dense: `jax.nn.dot_product_attention` with an explicit [T, T] mask (O(T^2) memory).
* ``cudnn``     -- cuDNN flash attention through `jax.nn.dot_product_attention(implementation=
  "cudnn")` (GPU, fp16/bf16). A MaskInfo never becomes a [T, T] mask: `cudnn_masked_attention`
  reads the rows' segments (`segment_runs`) on the device and picks, per call, the exact path:
  one document per row starting at token 0 (padding only) -> cuDNN with per-row sequence lengths
  (public API, GQA native); up to `max_segments` runs per row (contiguous documents and padding:
  packing) ->
  cuDNN's packed (THD) layout with per-segment lengths and offsets (Hopper or newer; K/V heads
  repeated for GQA, see `_packed_attention`); anything else (an id split into several runs,
  more documents than `max_segments`, an empty row) -> `blockwise`. A dense legacy matrix goes in
  as cuDNN's dense mask.
* ``blockwise`` -- chunked online-softmax attention in plain XLA (`blockwise_attention`): a
  `lax.map` over query blocks, a `lax.scan` over key blocks, key blocks above the diagonal skipped
  by `lax.cond`. Memory is linear in T (no [T, T] buffer; see tests/test_attention.py), GQA reads
  the shared K/V block once per group, any T (padded to the block). Its gradient recomputes each
  query block's forward (`jax.checkpoint`), so the backward is linear in T too.
* ``pallas_tpu`` -- `jax.experimental.pallas.ops.tpu.flash_attention` (Mosaic TPU kernel): causal
  and segment ids; padding goes in as segment ids, GQA by repeating K/V heads (the kernel has no
  GQA), T padded to a multiple of 128.
* ``auto``      -- cuDNN on GPU when it supports the call (fp16/bf16, head_dim <= 128 and a multiple
  of 8; with or without a MaskInfo, which takes the paths above), Pallas flash attention on TPU,
  blockwise everywhere else.

`decode_attention` is the KV-cache step (a few new queries against a cache plus themselves).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

IMPLS = ("auto", "xla", "cudnn", "blockwise", "pallas_tpu")
_NEG = -1e30  # finite "minus infinity": masked scores, initial running max


MAX_SEGMENTS = 64  # runs per row that cuDNN's packed path takes (cudnn_masked_attention)
# The name on what cuDNN attention's backward reads from its forward (its output and softmax
# statistics; `with_named_residuals`): a remat policy that saves it spares the backward a rerun
# of the attention forward (model.remat_policy's "dots_no_batch_attention").
RESIDUALS_NAME = "attention_residuals"


class MaskInfo(NamedTuple):
    """What the dense mask is built from, without building it: per-token segment ids [B, T]
    (attend within a segment only) and a key-validity mask [B, T] (1 = real token). `runs`:
    their `segment_runs`, when computed once for all layers (`prepare_mask`); else None."""

    segment_ids: jax.Array | None = None
    attention_mask: jax.Array | None = None
    runs: SegmentRuns | None = None


def prepare_mask(segment_ids, attention_mask, seq_len: int, *, impl: str, dtype, head_dim: int) -> MaskInfo | None:
    """The MaskInfo every layer of a forward shares; with the runs cuDNN's masked paths read
    computed here once, when `impl` resolves to cudnn on this backend (not once per layer)."""
    if segment_ids is None and attention_mask is None:
        return None
    info = MaskInfo(segment_ids, attention_mask)
    if resolve_impl(impl, dtype=dtype, head_dim=head_dim, has_mask=True) == "cudnn":
        info = info._replace(runs=segment_runs(info, seq_len, MAX_SEGMENTS))
    return info


def dense_mask(segment_ids, attention_mask, seq_len):
    """Boolean [B|1, 1, T, T]: causal, same segment, real key; the diagonal always kept."""
    idx = jnp.arange(seq_len)
    allowed = (idx[None, :] <= idx[:, None])[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].astype(bool)
    return allowed | jnp.eye(seq_len, dtype=bool)[None, None]


def resolve_impl(impl: str, *, dtype=None, head_dim: int | None = None, has_mask: bool = False) -> str:
    """The concrete implementation `impl` stands for on the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    del has_mask  # a MaskInfo no longer rules cuDNN out (cudnn_masked_attention)
    if (
        backend == "gpu"
        and dtype is not None
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim is not None
        and head_dim <= 128
        and head_dim % 8 == 0
    ):
        return "cudnn"
    if backend == "tpu":
        return "pallas_tpu"
    return "blockwise"


def attention(
    q,
    k,
    v,
    *,
    mask=None,
    impl: str = "xla",
    scale: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
    max_segments: int = MAX_SEGMENTS,
    name_residuals: bool = False,
):
    """Causal attention q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D]; see the module doc.
    `max_segments`: the most documents per row that cuDNN's packed path takes (cudnn with a
    MaskInfo); rows with more go through blockwise attention. `name_residuals`: cuDNN's VJP
    residuals named RESIDUALS_NAME for a remat policy (`with_named_residuals`; other
    implementations ignore it)."""
    b, t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    info = mask if isinstance(mask, MaskInfo) else None
    if info is not None and info.segment_ids is None and info.attention_mask is None:
        info, mask = None, None
    dense = mask if (mask is not None and info is None) else None  # legacy dense matrix
    impl = resolve_impl(impl, dtype=q.dtype, head_dim=d, has_mask=mask is not None)
    if dense is not None and impl not in ("xla", "cudnn"):
        raise ValueError(f"attention_impl {impl!r} takes MaskInfo, not a dense [T, T] mask")

    if impl in ("xla", "cudnn"):
        implementation = "cudnn" if impl == "cudnn" else None
        if mask is None:
            if impl == "cudnn" and name_residuals:
                causal = lambda q, k, v, _: jax.nn.dot_product_attention(  # noqa: E731
                    q, k, v, scale=scale, is_causal=True, implementation="cudnn"
                )
                return with_named_residuals(causal, q, k, v)
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
        if dense is None and impl == "cudnn":
            masked = lambda q, k, v, info: cudnn_masked_attention(  # noqa: E731
                q, k, v, info, scale=scale, max_segments=max_segments, block_q=block_q, block_k=block_k
            )
            return with_named_residuals(masked, q, k, v, info) if name_residuals else masked(q, k, v, info)
        if dense is None:
            dense = dense_mask(info.segment_ids, info.attention_mask, t)
        return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation=implementation)
    if impl == "blockwise":
        seg = None if info is None else info.segment_ids
        pad = None if info is None else info.attention_mask
        return blockwise_attention(
            q,
            k,
            v,
            causal=True,
            segment_ids=seg,
            kv_mask=pad,
            keep_diagonal=info is not None,
            scale=scale,
            block_q=block_q,
            block_k=block_k,
        )
    if impl == "pallas_tpu":
        return pallas_tpu_attention(q, k, v, mask=info, scale=scale, block=min(block_q, block_k))
    raise AssertionError(impl)


# ----------------------------------------------------------------------------------------------
# cuDNN with a MaskInfo: sequence lengths (padding) or the packed layout (documents), never a [T, T] mask


class SegmentRuns(NamedTuple):
    """What cuDNN's length-based masks need, read from a MaskInfo on the device.

    The runs of a row cover all its tokens: each maximal stretch of valid tokens with one segment
    id is a run, and so is each maximal stretch of invalid (padded) tokens, so that cuDNN's packed
    layout never meets a token outside every sequence (its backward gave NaN for those).
    starts, lengths: [B, M] int32, first position and length of the row's m-th run (-1 past the
    last run); count: [B] runs per row; valid_count: [B] runs of valid tokens; exact: [B] bool,
    True where the runs describe the MaskInfo exactly (every segment id of the row's valid tokens
    forms ONE run, at least one valid run, count <= M); valid: [B, T] the valid tokens.
    """

    starts: jax.Array
    lengths: jax.Array
    count: jax.Array
    valid_count: jax.Array
    exact: jax.Array
    valid: jax.Array


def segment_runs(info: MaskInfo, seq_len: int, max_segments: int) -> SegmentRuns:
    """The runs of each row (see SegmentRuns)."""
    seg, pad = info.segment_ids, info.attention_mask
    b = (seg if seg is not None else pad).shape[0]
    valid = jnp.ones((b, seq_len), bool) if pad is None else pad.astype(bool)
    ids = jnp.zeros((b, seq_len), jnp.int32) if seg is None else seg.astype(jnp.int32)
    prev_valid = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    prev_ids = jnp.pad(ids[:, :-1], ((0, 0), (1, 0)))
    first = (valid != prev_valid) | (valid & (ids != prev_ids))  # a run starts here (not at 0 yet)
    first = first.at[:, 0].set(True)
    count = first.sum(axis=1, dtype=jnp.int32)
    valid_count = (first & valid).sum(axis=1, dtype=jnp.int32)
    run = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1  # run index of every token
    m = int(max_segments)
    slot = jnp.minimum(run, m)  # runs past M land in slot M (the row is then not exact)
    pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))

    def per_row(slot_r, first_r, pos_r):
        lengths = jax.ops.segment_sum(jnp.ones_like(slot_r), slot_r, num_segments=m + 1)[:m]
        starts = jnp.full((m + 1,), -1, jnp.int32).at[jnp.where(first_r, slot_r, m)].set(pos_r)[:m]
        return starts, lengths

    starts, lengths = jax.vmap(per_row)(slot, first, pos)
    used = jnp.arange(m)[None, :] < count[:, None]
    lengths = jnp.where(used, lengths, -1)
    starts = jnp.where(used, starts, -1)
    # distinct ids among the valid tokens: equal to the valid run count iff no id is split in two
    big = jnp.iinfo(jnp.int32).max
    sorted_ids = jnp.sort(jnp.where(valid, ids, big), axis=1)
    changes = (sorted_ids[:, 1:] != sorted_ids[:, :-1]) & (sorted_ids[:, 1:] != big)
    distinct = jnp.where(valid.any(axis=1), 1 + changes.sum(axis=1, dtype=jnp.int32), 0)
    exact = (valid_count >= 1) & (count <= m) & (distinct == valid_count)
    return SegmentRuns(starts, lengths, count, valid_count, exact, valid)


def _repeat_kv(x, groups: int):
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


def _keep_invalid_rows(out, v, valid, groups: int):
    """Rows of invalid (padded) queries attend to their own key only (the kept diagonal): v."""
    return jnp.where(valid[:, :, None, None], out, _repeat_kv(v, groups).astype(out.dtype))


def _lengths_attention(q, k, v, lengths, scale, implementation):
    """Causal attention over each row's first `lengths` tokens: cuDNN's padding-causal mask
    (GQA native). Rows past a length are left to the caller."""
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )


def packed_layout_available() -> bool:
    """cuDNN's packed (THD) layout through jax's cuDNN attention: a GPU of compute capability >= 9.0."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: F401
    except ImportError:  # pragma: no cover - a jax without the cuDNN module
        return False
    devices = jax.devices()
    if devices[0].platform != "gpu":
        return False
    cc = getattr(devices[0], "compute_capability", "0")
    try:
        return float(cc) >= 9.0
    except (TypeError, ValueError):
        return False


def _packed_attention(q, k, v, runs: SegmentRuns, scale):
    """cuDNN's packed layout: every run is its own causal sequence (positions restart with it).

    jax's wrapper (jax._src.cudnn.fused_attention_stablehlo, private) scales the key offsets by
    the QUERY head count (jax 0.10/0.11), so with GQA the K/V heads are repeated here to keep the
    offsets right; padding-causal so tokens outside every run are not read."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    g = q.shape[2] // k.shape[2]
    offsets = jnp.pad(runs.starts, ((0, 0), (0, 1)), constant_values=-1)
    return fa.dot_product_attention(
        q,
        _repeat_kv(k, g),
        _repeat_kv(v, g),
        q_seqlen=runs.lengths,
        kv_seqlen=runs.lengths,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=scale,
        mask_type=fa.MaskType.PADDING_CAUSAL,
    )


def cudnn_masked_attention(
    q,
    k,
    v,
    info: MaskInfo,
    *,
    scale: float,
    max_segments: int = MAX_SEGMENTS,
    block_q: int = 512,
    block_k: int = 512,
    implementation: str | None = "cudnn",
    packed: bool | None = None,
):
    """Exact causal attention under a MaskInfo with cuDNN's length-based masks (module doc).

    The path is chosen on the device per call (`lax.switch`; every branch compiled once):
    0 = per-row sequence lengths (every row one run starting at 0), 1 = packed layout (every row
    exact under `segment_runs`), 2 = blockwise (the general case). `implementation` goes to
    `jax.nn.dot_product_attention` (None: XLA, what the CPU tests run); `packed`: use the packed
    layout (default: when `packed_layout_available()`). Invalid query rows return v (their own
    key), as every other implementation does."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    runs = info.runs
    if runs is None or runs.starts.shape[1] != max_segments:
        runs = segment_runs(info, t, max_segments)
    use_packed = packed_layout_available() if packed is None else packed

    def lengths_path(q, k, v):
        out = _lengths_attention(q, k, v, jnp.maximum(runs.lengths[:, 0], 1), scale, implementation)
        return _keep_invalid_rows(out, v, runs.valid, g)

    def packed_path(q, k, v):
        return _keep_invalid_rows(_packed_attention(q, k, v, runs, scale), v, runs.valid, g)

    def general_path(q, k, v):
        return blockwise_attention(
            q,
            k,
            v,
            causal=True,
            segment_ids=info.segment_ids,
            kv_mask=info.attention_mask,
            keep_diagonal=True,
            scale=scale,
            block_q=block_q,
            block_k=block_k,
        )

    # one document per row, from token 0 (padding after it, if any): sequence lengths suffice
    one_prefix_run = jnp.all(runs.exact & (runs.valid_count == 1) & runs.valid[:, 0])
    if use_packed:
        branch = jnp.where(one_prefix_run, 0, jnp.where(jnp.all(runs.exact), 1, 2))
        return lax.switch(branch, (lengths_path, packed_path, general_path), q, k, v)
    return lax.cond(one_prefix_run, lengths_path, general_path, q, k, v)


# ----------------------------------------------------------------------------------------------
# blockwise (linear memory, plain XLA)


def with_named_residuals(fn, q, k, v, aux=None):
    """fn(q, k, v, aux) with the residuals its VJP keeps named RESIDUALS_NAME (q, k, v excepted).

    A remat policy decides per value whether the backward keeps it or reruns what made it; the
    residuals of cuDNN's VJP (its output and softmax statistics) are not matmul outputs, so
    "dots_no_batch" drops them and the backward reruns the whole attention forward (31 reruns a
    step on Llama-2-7B: docs/bench_restore_step.md, "Deviceless compile"). Named, a policy can
    keep them ("dots_no_batch_attention"). q, k and v stay unnamed: the policy recomputes them
    from the layer's saved matmuls. `aux`: arrays `fn` reads that take no gradient (the mask).
    Not differentiated, this is `fn` itself (the inference path, no statistics); differentiated,
    the same values and gradients as `fn`'s own VJP. `attention` wraps cuDNN in it only when asked
    (`name_residuals`, set by the model under that policy), so every other path is the plain call."""
    return _named_vjp(_VjpFn(fn), q, k, v, aux)


class _VjpFn:
    """The function and, once its forward has been traced, the structure of its VJP (a custom_vjp's
    residuals must be arrays, so the structure travels here, beside them)."""

    def __init__(self, fn):
        self.fn, self.tree = fn, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _named_vjp(f: _VjpFn, q, k, v, aux):
    return f.fn(q, k, v, aux)


def _named_vjp_fwd(f: _VjpFn, q, k, v, aux):
    out, vjp = jax.vjp(lambda q, k, v: f.fn(q, k, v, aux), q, k, v)
    leaves, f.tree = jax.tree_util.tree_flatten(vjp)
    inputs = (id(q), id(k), id(v))
    return out, ([x if id(x) in inputs else checkpoint_name(x, RESIDUALS_NAME) for x in leaves], aux)


def _named_vjp_bwd(f: _VjpFn, res, g):
    named, aux = res
    dq, dk, dv = jax.tree_util.tree_unflatten(f.tree, named)(g)
    return dq, dk, dv, jax.tree_util.tree_map(lambda _: None, aux)


_named_vjp.defvjp(_named_vjp_fwd, _named_vjp_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def blockwise_attention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    segment_ids=None,
    kv_segment_ids=None,
    kv_mask=None,
    keep_diagonal: bool = False,
    scale: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
):
    """Online-softmax attention over [block_q, block_k] tiles; memory O(T * (D + block)).

    q [B, T, H, D], k/v [B, S, KV, D]; query i and key j sit at positions i and j (self-attention
    when S == T). segment_ids [B, T] (and kv_segment_ids [B, S], default the same) restrict
    attention to equal ids; kv_mask [B, S] drops keys; keep_diagonal re-allows key i for query i.
    Scores and the softmax are float32; probabilities are cast to v's dtype for the PV product
    (as jax.nn.dot_product_attention does), accumulated in float32.
    """
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} kv heads")
    g = h // kvh
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if kv_segment_ids is None and segment_ids is not None:
        if s_len != t:
            raise ValueError("kv_segment_ids is needed when the key length differs from the query length")
        kv_segment_ids = segment_ids
    bq = min(block_q, _round_up(t, 8))
    bk = min(block_k, _round_up(s_len, 8))
    tp, sp = _round_up(t, bq), _round_up(s_len, bk)
    nq, nk = tp // bq, sp // bk

    qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, sp - s_len), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, sp - s_len), (0, 0), (0, 0)))
    # [nq, B, KV, G, bq, D] and [nk, B, KV, bk, D]: GQA groups share one K/V block, never repeated.
    qb = qp.reshape(b, nq, bq, kvh, g, d).transpose(1, 0, 3, 4, 2, 5)
    kb = kp.reshape(b, nk, bk, kvh, d).transpose(1, 0, 3, 2, 4)
    vb = vp.reshape(b, nk, bk, kvh, d).transpose(1, 0, 3, 2, 4)
    q_pos = jnp.arange(tp, dtype=jnp.int32).reshape(nq, bq)
    k_pos = jnp.arange(sp, dtype=jnp.int32).reshape(nk, bk)
    key_ok = jnp.arange(sp) < s_len
    key_ok = jnp.broadcast_to(key_ok, (b, sp))
    if kv_mask is not None:
        key_ok = key_ok & jnp.pad(kv_mask.astype(bool), ((0, 0), (0, sp - s_len)))
    key_ok = key_ok.reshape(b, nk, bk).transpose(1, 0, 2)  # [nk, B, bk]
    use_seg = segment_ids is not None
    if use_seg:
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t))).reshape(b, nq, bq).transpose(1, 0, 2)
        k_seg = (
            jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s_len)), constant_values=-1)
            .reshape(b, nk, bk)
            .transpose(1, 0, 2)
        )
    else:  # dummies keep one code path; XLA drops them
        q_seg = jnp.zeros((nq, 1, bq), jnp.int32)
        k_seg = jnp.zeros((nk, 1, bk), jnp.int32)

    def one_query_block(q_blk, qpos, qseg):
        # q_blk [B, KV, G, bq, D]; qpos [bq]; qseg [B|1, bq]
        def tile(carry, xs):
            m, l, acc = carry
            k_blk, v_blk, kpos, kok, kseg = xs

            def compute(carry):
                m, l, acc = carry
                s = jnp.einsum("bkgqd,bkcd->bkgqc", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
                allowed = kok[:, None, None, None, :]
                if causal:
                    allowed = allowed & (kpos[None, :] <= qpos[:, None])
                if use_seg:
                    allowed = allowed & (qseg[:, None, None, :, None] == kseg[:, None, None, None, :])
                if keep_diagonal:
                    allowed = allowed | (kpos[None, :] == qpos[:, None])
                s = jnp.where(allowed, s, _NEG)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                l_new = l * alpha + p.sum(-1)
                pv = jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
                return m_new, l_new, acc * alpha[..., None] + pv

            if causal:  # skip tiles wholly above the diagonal (the diagonal itself is never in one)
                carry = lax.cond(kpos[0] <= qpos[-1], compute, lambda c: c, carry)
            else:
                carry = compute(carry)
            return carry, None

        # Nested remat: the backward of the key scan then keeps only the (m, l, acc) carries per
        # tile, not each tile's [bq, bk] scores, so its memory is O(T / bk * bq * D) per query block.
        tile = jax.checkpoint(tile)
        shape = q_blk.shape[:-1]
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(q_blk.shape, jnp.float32))
        (m, l, acc), _ = lax.scan(tile, init, (kb, vb, k_pos, key_ok, k_seg))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return out.astype(q.dtype)

    one_query_block = jax.checkpoint(one_query_block)
    out = lax.map(lambda xs: one_query_block(*xs), (qb, q_pos, q_seg))  # [nq, B, KV, G, bq, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, h, d)
    return out[:, :t]


# ----------------------------------------------------------------------------------------------
# Pallas TPU flash attention


def pallas_tpu_attention(q, k, v, *, mask: MaskInfo | None = None, scale: float | None = None, block: int = 512):
    """jax's Pallas TPU flash attention (causal, segment ids) on our [B, T, H, D] layout.

    Padding is folded into the segment ids (a padded token gets id -1 as query and key, so real
    rows never see it and padded rows stay finite). The kernel has no GQA: K/V heads are repeated.
    On CPU run it inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

    b, t, h, d = q.shape
    kvh = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tp = _round_up(t, 128)
    blk = min(_round_up(block, 128), tp)
    while tp % blk:
        blk -= 128
    seg = None
    if mask is not None and (mask.segment_ids is not None or mask.attention_mask is not None):
        ids = jnp.zeros((b, t), jnp.int32) if mask.segment_ids is None else mask.segment_ids.astype(jnp.int32)
        if mask.attention_mask is not None:
            ids = jnp.where(mask.attention_mask.astype(bool), ids, -1)
        ids = jnp.pad(ids, ((0, 0), (0, tp - t)), constant_values=-2)
        seg = tpu_fa.SegmentIds(q=ids, kv=ids)

    def heads_first(x):
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    kr = jnp.repeat(k, h // kvh, axis=2) if kvh != h else k
    vr = jnp.repeat(v, h // kvh, axis=2) if kvh != h else v
    sizes = tpu_fa.BlockSizes(
        block_q=blk,
        block_k_major=blk,
        block_k=blk,
        block_b=1,
        block_q_major_dkv=blk,
        block_k_major_dkv=blk,
        block_k_dkv=blk,
        block_q_dkv=blk,
        block_k_major_dq=blk,
        block_k_dq=blk,
        block_q_dq=blk,
    )
    out = tpu_fa.flash_attention(
        heads_first(q),
        heads_first(kr),
        heads_first(vr),
        segment_ids=seg,
        causal=True,
        sm_scale=scale,
        block_sizes=sizes,
    )
    return out.transpose(0, 2, 1, 3)[:, :t]


# ----------------------------------------------------------------------------------------------
# KV-cache decoding


def decode_attention(q, k_new, v_new, k_cache, v_cache, cache_len, *, scale: float | None = None):
    """New queries against a KV cache plus themselves.

    q [B, t, H, D]; k_new/v_new [B, t, KV, D] (the new tokens' keys/values, post-RoPE);
    k_cache/v_cache [B, KV, C, D] (layout of one layer of the cache); cache_len [B] int: row b's
    cache holds valid keys at indices < cache_len[b] (later entries are ignored). New token s
    attends to the valid cache and to new tokens <= s. Memory O(B * H * t * C).
    """
    b, t, h, d = q.shape
    kvh, c = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qg = q.reshape(b, t, kvh, g, d)
    s_cache = jnp.einsum("btkgd,bkcd->bkgtc", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    s_new = jnp.einsum("btkgd,bskd->bkgts", qg, k_new, preferred_element_type=jnp.float32)
    cache_ok = jnp.arange(c)[None, :] < jnp.asarray(cache_len)[:, None]  # [B, C]
    new_ok = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [t, t]
    s_cache = jnp.where(cache_ok[:, None, None, None, :], s_cache * scale, _NEG)
    s_new = jnp.where(new_ok[None, None, None], s_new * scale, _NEG)
    scores = jnp.concatenate([s_cache, s_new], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_new.dtype)
    p_cache, p_new = probs[..., :c], probs[..., c:]
    out = jnp.einsum(
        "bkgtc,bkcd->btkgd", p_cache, v_cache.astype(v_new.dtype), preferred_element_type=jnp.float32
    ) + jnp.einsum("bkgts,bskd->btkgd", p_new, v_new, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
