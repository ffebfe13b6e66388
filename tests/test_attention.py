"""Attention implementations (lard_jax.attention) against the dense XLA attention.

blockwise runs as is on CPU; pallas_tpu runs jax's Mosaic flash-attention kernel in Pallas' TPU
interpret mode (`force_tpu_interpret_mode`), plus a lowering check for platform "tpu"; cudnn needs
a GPU and is skipped here. Small blocks (8 x 16) and odd lengths so tiles, the diagonal skip and
the padding of T are all exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lard_jax import attention as attn
from lard_jax.model import LlamaConfig, init_params

MASKS = ("causal", "segments", "padding", "segments+padding")


def _inputs(seed, b, t, h, kv, d, dtype, mask_kind):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32).astype(dtype) for n in (h, kv, kv))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)
    pad = np.ones((b, t), bool)
    pad[0, : t // 5] = False  # left padding in row 0
    pad[-1, t - t // 4 :] = False  # right padding in the last row
    pad = jnp.asarray(pad)
    mask = {
        "causal": None,
        "segments": attn.MaskInfo(seg, None),
        "padding": attn.MaskInfo(None, pad),
        "segments+padding": attn.MaskInfo(seg, pad),
    }[mask_kind]
    return q, k, v, mask, pad


_dense = jax.jit(lambda q, k, v, m: attn.attention(q, k, v, mask=m, impl="xla"))


def _check(out, q, k, v, mask, dtype, rows=None):
    ref32 = _dense(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    dense = _dense(q, k, v, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    sel = (lambda x: np.asarray(x, np.float32)[rows]) if rows is not None else (lambda x: np.asarray(x, np.float32))
    err, dense_err = np.abs(sel(out) - sel(ref32)).max(), np.abs(sel(dense) - sel(ref32)).max()
    if dtype == jnp.float32:
        assert err < 2e-5, err
    else:  # bf16: no worse than the dense bf16 attention's own rounding, up to one bf16 ulp of O(1) values
        assert err <= 2 * dense_err + 1e-2, (err, dense_err)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("t,h,kv", [(37, 4, 2), (5, 6, 1)])
def test_blockwise_equals_dense(dtype, mask_kind, t, h, kv):
    q, k, v, mask, _ = _inputs(t + h, 2, t, h, kv, 16, dtype, mask_kind)
    out = jax.jit(lambda q, k, v, m: attn.attention(q, k, v, mask=m, impl="blockwise", block_q=8, block_k=16))(
        q, k, v, mask
    )
    _check(out, q, k, v, mask, dtype)


def test_blockwise_gradients_equal_dense():
    q, k, v, mask, _ = _inputs(0, 2, 29, 4, 2, 8, jnp.float32, "segments+padding")
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    for m in (mask, None):

        def loss(impl, q, k, v):
            return jnp.sum(attn.attention(q, k, v, mask=m, impl=impl, block_q=8, block_k=8) * w)  # noqa: B023

        ref = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)
        got = jax.jit(jax.grad(lambda *a: loss("blockwise", *a), argnums=(0, 1, 2)))(q, k, v)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype,mask_kind,t,h,kv",
    [
        (jnp.float32, "causal", 37, 4, 2),
        (jnp.float32, "segments+padding", 130, 2, 2),
        (jnp.bfloat16, "segments", 64, 4, 1),
    ],
)
def test_pallas_tpu_interpret_equals_dense(dtype, mask_kind, t, h, kv):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, mask, pad = _inputs(7, 2, t, h, kv, 16, dtype, mask_kind)
    with pltpu.force_tpu_interpret_mode():
        out = attn.attention(q, k, v, mask=mask, impl="pallas_tpu", block_q=128, block_k=128)
    # padded query rows attend differently (padding is a segment there); only real rows compare
    rows = np.asarray(pad) if mask is not None and mask.attention_mask is not None else None
    _check(out, q, k, v, mask, dtype, rows=rows)


def test_pallas_tpu_lowers_for_tpu():
    q, k, v, mask, _ = _inputs(3, 1, 256, 2, 1, 128, jnp.bfloat16, "segments")
    fn = jax.jit(lambda q, k, v, s: attn.attention(q, k, v, mask=attn.MaskInfo(s, None), impl="pallas_tpu"))
    exported = jax.export.export(fn, platforms=["tpu"])(q, k, v, mask.segment_ids)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_equals_dense():
    for mask_kind in ("causal", "padding"):
        q, k, v, mask, _ = _inputs(5, 2, 256, 4, 2, 64, jnp.bfloat16, mask_kind)
        _check(attn.attention(q, k, v, mask=mask, impl="cudnn"), q, k, v, mask, jnp.bfloat16)
    assert attn.resolve_impl("auto", dtype=jnp.bfloat16, head_dim=128) == "cudnn"


def test_auto_and_bad_impl():
    if jax.default_backend() == "cpu":
        assert attn.resolve_impl("auto", dtype=jnp.bfloat16, head_dim=128) == "blockwise"
    with pytest.raises(ValueError, match="attention_impl"):
        attn.resolve_impl("flash", dtype=jnp.float32, head_dim=8)
    with pytest.raises(ValueError, match="attention_impl"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, attention_impl="flash")


def test_model_logits_equal_across_impls():
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 45), 0, 61)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], 15, axis=1).reshape(1, 45).repeat(2, 0))
    pad = jnp.ones((2, 45), bool).at[1, 40:].set(False)
    blockwise = model.__class__(cfg.replace(attention_impl="blockwise"))
    for kw in ({}, {"segment_ids": seg, "attention_mask": pad}):
        ref = jax.jit(lambda p, x, kw: model.apply({"params": p}, x, **kw))(params, ids, kw)
        out = jax.jit(lambda p, x, kw: blockwise.apply({"params": p}, x, **kw))(params, ids, kw)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_at_16k():
    t, h, kv, d = 16384, 2, 1, 16
    q = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, kv, d), jnp.float32)
    tt_bytes = t * t  # one [T, T] buffer, even of bools
    fwd = _temp_bytes(lambda q, k, v: attn.attention(q, k, v, impl="blockwise"), q, k, k)
    assert fwd < tt_bytes // 16, fwd  # 16 MiB: no T x T buffer
    # the backward pass (remat per query block and per tile): ~14 MiB of tile temporaries plus
    # 0.5 KiB per token here; far from the 1 GiB of one float32 [T, T]
    bwd = _temp_bytes(jax.grad(lambda q, k, v: attn.attention(q, k, v, impl="blockwise").sum(), (0, 1, 2)), q, k, k)
    assert bwd < tt_bytes // 8, bwd
    # and the dense attention really needs one: the test would catch a [T, T] buffer
    dense = _temp_bytes(lambda q, k, v: attn.attention(q, k, v, impl="xla"), q, k, k)
    assert dense >= tt_bytes * 4, dense
