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


# ----------------------------------------------------------------------------------------------
# cuDNN with a MaskInfo (cudnn_masked_attention): the run metadata and every branch, on CPU


def _runs_reference(seg, pad, m):
    """numpy: the runs covering each row (valid tokens of one id; stretches of padding), and
    whether they describe the mask."""
    b, t = pad.shape
    out = []
    for r in range(b):
        runs = []
        for i in range(t):
            key = (True, seg[r, i]) if pad[r, i] else (False, None)
            if not runs or key != runs[-1][2]:
                runs.append([i, 0, key])
            runs[-1][1] += 1
        ids = [x[2][1] for x in runs if x[2][0]]
        exact = len(ids) >= 1 and len(runs) <= m and len(set(ids)) == len(ids)
        out.append((runs, exact))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_segment_runs_match_numpy(seed):
    rng = np.random.default_rng(seed)
    b, t, m = 3, int(rng.integers(5, 40)), int(rng.integers(1, 6))
    seg = np.sort(rng.integers(0, 4, (b, t)), axis=1) if seed % 2 else rng.integers(0, 3, (b, t))
    pad = rng.random((b, t)) > (0.1 if seed % 3 else 0.0)
    pad[0, : t // 3] = False
    if seed == 5:
        pad[2] = False  # an empty row
    runs = jax.jit(lambda s, p: attn.segment_runs(attn.MaskInfo(s, p), t, m))(jnp.asarray(seg), jnp.asarray(pad))
    for r, (ref_runs, ref_exact) in enumerate(_runs_reference(seg, pad, m)):
        assert int(runs.count[r]) == len(ref_runs)
        assert bool(runs.exact[r]) == ref_exact
        for j in range(m):
            if j < len(ref_runs):
                assert (int(runs.starts[r, j]), int(runs.lengths[r, j])) == tuple(ref_runs[j][:2])
            else:
                assert int(runs.starts[r, j]) == -1 and int(runs.lengths[r, j]) == -1


def _packed_reference(q, k, v, runs, scale):
    """What cuDNN's packed layout computes, densely: each run a causal sequence of its own."""
    t = q.shape[1]
    pos = jnp.arange(t)
    lo = runs.starts[:, :, None, None]
    hi = lo + runs.lengths[:, :, None, None]
    i, j = pos[None, None, :, None], pos[None, None, None, :]
    allowed = ((lo <= j) & (j <= i) & (i < hi) & (runs.lengths[:, :, None, None] > 0)).any(axis=1)
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale)


CUDNN_MASKS = {
    "per_document": lambda rng, b, t: (
        np.where(np.arange(t)[None] < rng.integers(t // 2, t + 1, (b, 1)), 1, 0),
        None,
    ),
    "packed": lambda rng, b, t: (np.sort(rng.integers(1, 5, (b, t)), axis=1), None),
    "packed+padding": lambda rng, b, t: (
        np.sort(rng.integers(1, 4, (b, t)), axis=1),
        np.arange(t)[None] < rng.integers(t // 2, t, (b, 1)),
    ),
    "left_padding": lambda rng, b, t: (None, np.arange(t)[None] >= rng.integers(1, t // 2, (b, 1))),
    "split_segment": lambda rng, b, t: (np.tile(np.arange(t) // 3 % 2, (b, 1)), None),  # blockwise branch
    "too_many_segments": lambda rng, b, t: (np.tile(np.arange(t) // 2, (b, 1)), None),  # > max_segments
}


@pytest.mark.parametrize("packed", [False, True], ids=["lengths_or_blockwise", "with_packed"])
@pytest.mark.parametrize("kind", sorted(CUDNN_MASKS))
def test_cudnn_masked_branches_equal_dense(monkeypatch, kind, packed):
    """Every branch of cudnn_masked_attention, with XLA standing in for cuDNN (implementation=None)
    and a dense emulation of the packed layout: values and gradients equal dense attention."""
    monkeypatch.setattr(attn, "_packed_attention", _packed_reference)
    rng = np.random.default_rng(len(kind) + 7 * packed)
    b, t, h, kv, d = 2, 23, 6, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    if kind == "per_document" and packed:
        pytest.skip("the lengths branch is the same with or without the packed one")
    seg, pad = CUDNN_MASKS[kind](rng, b, t)
    if kind == "per_document":
        seg, pad = seg, seg.astype(bool)  # as lard_jax.data builds it: segment ids 1/0 and the same mask
    info = attn.MaskInfo(
        None if seg is None else jnp.asarray(seg, jnp.int32), None if pad is None else jnp.asarray(pad)
    )
    # Padded query rows are outside the contract (finite, but each implementation fills them its
    # own way; every loss masks them): compared on real rows, and weighted 0 in the loss.
    real = np.ones((b, t), bool) if pad is None else np.asarray(pad, bool)
    w = jnp.asarray(rng.normal(size=q.shape) * real[:, :, None, None], jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    masked = lambda q, k, v: attn.cudnn_masked_attention(  # noqa: E731
        q, k, v, info, scale=0.3, max_segments=4, block_q=8, block_k=8, implementation=None, packed=packed
    )
    dense = lambda q, k, v: attn.attention(q, k, v, mask=info, impl="xla", scale=0.3)  # noqa: E731
    out = np.asarray(jax.jit(masked)(q, k, v))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], np.asarray(jax.jit(dense)(q, k, v))[real], atol=2e-5, rtol=1e-5)
    got = jax.jit(jax.grad(lambda *a: loss(masked, *a), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=1e-4)


def test_cudnn_masked_has_no_square_buffer():
    """The lengths branch (XLA standing in for cuDNN aside) and the run metadata hold no [T, T]
    array: compile the metadata alone at T = 16384 and check its temporaries are linear in T."""
    t = 16384
    seg = jnp.ones((2, t), jnp.int32)
    size = _temp_bytes(lambda s: attn.segment_runs(attn.MaskInfo(s, s.astype(bool)), t, 64), seg)
    assert size < 64 * t * 2 * 8, size  # far below one [T, T] bool (268 MB)


def test_auto_takes_cudnn_with_a_mask_on_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn.resolve_impl("auto", dtype=jnp.bfloat16, head_dim=64, has_mask=True) == "cudnn"
    assert attn.resolve_impl("auto", dtype=jnp.float32, head_dim=64, has_mask=True) == "blockwise"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("kind", sorted(CUDNN_MASKS))
def test_cudnn_masked_equals_dense_on_gpu(kind):
    rng = np.random.default_rng(3)
    b, t, h, kv, d = 2, 512, 6, 2, 64
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16) for n in (h, kv, kv))
    seg, pad = CUDNN_MASKS[kind](rng, b, t)
    if kind == "per_document":
        pad = seg.astype(bool)
    info = attn.MaskInfo(
        None if seg is None else jnp.asarray(seg, jnp.int32), None if pad is None else jnp.asarray(pad)
    )
    real = np.ones((b, t), bool) if pad is None else np.asarray(pad, bool)
    w = jnp.asarray(rng.normal(size=q.shape) * real[:, :, None, None], jnp.float32)
    outs, grads = [], []
    for impl in ("cudnn", "xla"):
        f = lambda q, k, v, impl=impl: attn.attention(q, k, v, mask=info, impl=impl)  # noqa: E731
        outs.append(np.asarray(jax.jit(f)(q, k, v), np.float32)[real])
        g = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
        grads.append([np.asarray(x, np.float32) for x in g(q, k, v)])
    rel = lambda a, r: np.linalg.norm(a - r) / np.linalg.norm(r)  # noqa: E731
    assert rel(*outs) < 1e-2, rel(*outs)
    for a, r in zip(*grads):
        assert rel(a, r) < 2e-2, rel(a, r)


def test_prepare_mask_computes_runs_once_for_cudnn(monkeypatch):
    """On a GPU backend the MaskInfo every layer shares carries the runs (computed once); the
    masked cuDNN path reads them and gives what it gives from scratch. On CPU none are computed."""
    rng = np.random.default_rng(11)
    b, t = 2, 23
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
    pad = jnp.asarray(np.arange(t)[None] < np.array([[t], [17]]))
    assert attn.prepare_mask(seg, pad, t, impl="auto", dtype="bfloat16", head_dim=8).runs is None
    assert attn.prepare_mask(None, None, t, impl="auto", dtype="bfloat16", head_dim=8) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    info = attn.prepare_mask(seg, pad, t, impl="auto", dtype="bfloat16", head_dim=8)
    fresh = attn.segment_runs(attn.MaskInfo(seg, pad), t, attn.MAX_SEGMENTS)
    for a, r in zip(info.runs, fresh):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, 8)), jnp.float32) for n in (4, 2, 2))
    kw = dict(scale=0.3, block_q=8, block_k=8, implementation=None, packed=False)
    with_runs = attn.cudnn_masked_attention(q, k, v, info, **kw)
    without = attn.cudnn_masked_attention(q, k, v, attn.MaskInfo(seg, pad), **kw)
    np.testing.assert_array_equal(np.asarray(with_runs), np.asarray(without))


# ------------------------------------------------------------ residuals named for a remat policy
def _named_case(seed, masked):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (2, 24, 4, 8))
    k = jax.random.normal(keys[1], (2, 24, 2, 8))
    v = jax.random.normal(keys[2], (2, 24, 2, 8))
    g = jax.random.normal(keys[3], q.shape)
    info = None
    if masked:  # a packed row and a padded row
        info = attn.MaskInfo(jnp.array([[0] * 15 + [1] * 9, [0] * 24]), jnp.array([[1] * 24, [1] * 17 + [0] * 7]))
    dense = lambda q, k, v, info: attn.attention(q, k, v, mask=info, impl="xla")  # noqa: E731
    return q, k, v, g, info, dense


@pytest.mark.parametrize("masked", [False, True])
def test_named_residuals_keep_values_and_gradients(masked):
    """with_named_residuals is fn with its VJP's residuals named: the same output and gradients,
    plainly differentiated, under a policy that keeps the named residuals, and under one that keeps
    nothing (the forward rerun)."""
    q, k, v, g, info, dense = _named_case(7 + masked, masked)
    plain = lambda q, k, v: (dense(q, k, v, info) * g).sum()  # noqa: E731
    named = lambda q, k, v: (attn.with_named_residuals(dense, q, k, v, info) * g).sum()  # noqa: E731
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v)
    keep = jax.checkpoint_policies.save_only_these_names(attn.RESIDUALS_NAME)
    for fn in (named, jax.checkpoint(named, policy=keep), jax.checkpoint(named)):
        got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # a float32 sum of 1,536 products, jit vs eager
        for a, b in zip(got[1], want[1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    out = attn.with_named_residuals(dense, q, k, v, info)  # not differentiated: fn itself
    np.testing.assert_array_equal(out, dense(q, k, v, info))


def test_the_policy_keeps_the_named_residuals_and_not_the_inputs(capsys):
    q, k, v, g, info, dense = _named_case(3, False)
    named = lambda q, k, v: (attn.with_named_residuals(dense, q * 2.0, k, v) * g).sum()  # noqa: E731
    keep = jax.checkpoint_policies.save_only_these_names(attn.RESIDUALS_NAME)
    from jax.ad_checkpoint import print_saved_residuals

    print_saved_residuals(jax.checkpoint(named, policy=keep), q, k, v)
    lines = capsys.readouterr().out.splitlines()
    assert any(f"named '{attn.RESIDUALS_NAME}'" in ln for ln in lines), lines
    # q * 2.0 is an input of the attention: recomputed from q, not saved under the name
    assert not any(ln.startswith("f32[2,24,4,8]") and "named" in ln for ln in lines), lines


def test_remat_policy_with_attention_residuals_trains_like_dots_no_batch():
    """ "dots_no_batch_attention" is "dots_no_batch" plus cuDNN's residuals; on CPU (dense attention,
    nothing named) the scanned model's loss and gradients are the same."""
    from lard_jax.model import LlamaForCausalLM

    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 61)
    results = []
    for remat in ("dots_no_batch", "dots_no_batch_attention"):
        model = LlamaForCausalLM(LlamaConfig(**base, num_key_value_heads=2, remat=remat, scan_layers=True))
        params = model.init(jax.random.PRNGKey(0), ids)["params"]
        results.append(
            jax.value_and_grad(lambda p, m=model: m.apply({"params": p}, ids).astype(jnp.float32).std())(params)
        )
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
