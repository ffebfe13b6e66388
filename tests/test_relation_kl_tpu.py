"""impl="pallas_tpu" (Mosaic TPU kernels) against the float64 reference.

No TPU here: the kernels run in Pallas' TPU interpret mode on CPU
(`interpret=True` -> `pltpu.InterpretParams()`, which simulates the VMEM
scratch and block copies and fills uninitialised scratch with NaN), and the
Mosaic lowering itself is checked by exporting for platform "tpu" (Pallas ->
Mosaic MLIR, including the (8, 128) block-shape rules; the Mosaic compiler in
libtpu is not run). Reference and tolerances are those of test_relation_kl.py
(shared through tests/kernel_cases.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, relation_kl, relation_kl_tpu, self_relation_kl
from pallas_kernels.relation_kl import _resolve_impl
from tests import kernel_cases
from tests.kernel_cases import (
    assert_matches_reference,
    case_kwargs,
    make_inputs,
    pallas_call_costs,
    reference64,
    rel_err,
    rng_fixture,  # noqa: F401 (the "rng" fixture)
)

# Query blocks 32/64/128 against 128-key blocks: the causal clamps and skips
# see block_q < block_k, block_q == block_k and several tiles per row.
MIXED = BlockSizes(block_q=64, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dk=32, block_k_dk=128)


def kl_and_grads(sl, sr, tl, tr, w, blocks=MIXED, **kw):
    return kernel_cases.kl_and_grads(sl, sr, tl, tr, w, impl="pallas_tpu", interpret=True, block_sizes=blocks, **kw)


CASES = {
    # name: (B, T, H, Hr, D, options); D = 64 and 80 are padded to 128 lanes.
    "odd_T_one_block": (2, 37, 2, 2, 64, {}),  # blocks capped to 64 = padded T
    "gqa2_T200": (1, 200, 4, 2, 128, {}),
    # T a multiple of the blocks: no ids, so the causal fast path (tiles below
    # the diagonal unmasked, only diagonal tiles masked) is the one that runs.
    "no_ids_T256": (1, 256, 2, 1, 128, {}),
    "gqa4_noncausal": (2, 100, 4, 1, 64, {"causal": False}),
    "padding_mask_D80": (3, 130, 2, 2, 80, {"mask": True}),
    "segments_and_mask": (2, 150, 2, 1, 128, {"mask": True, "segments": True}),
    "noncausal_segments": (1, 64, 2, 2, 64, {"causal": False, "segments": True, "scale": 0.3}),
    "default_blocks_T300": (1, 300, 2, 2, 128, {"blocks": None}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(rng, case):
    B, T, H, Hr, D, opts = CASES[case]
    sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D)
    kw = case_kwargs(rng, B, T, opts)
    kl, (d_sl, d_sr) = kl_and_grads(sl, sr, tl, tr, w, blocks=opts.get("blocks", MIXED), **kw)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w, **kw)
    assert kl.shape == (B, H, T)
    assert d_sl.shape == sl.shape and d_sr.shape == sr.shape
    assert_matches_reference(kl, (d_sl, d_sr), ref, (r_sl, r_sr), kw)


def test_self_relation_sums_both_gradients(rng):
    B, T, H, D = 1, 130, 2, 64
    x, _, t, _, w = make_inputs(rng, B, T, H, H, D)

    def loss(s):
        kl = self_relation_kl(s, t, impl="pallas_tpu", interpret=True, block_sizes=MIXED)
        return jnp.sum(w * kl), kl

    (_, kl), d_x = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    ref, (r_l, r_r) = reference64(x, x, t, t, w)
    assert rel_err(kl, ref) <= 1e-5
    assert rel_err(d_x, r_l + r_r) <= 1e-4


def test_bf16(rng):
    B, T, H, Hr, D = 1, 200, 4, 2, 128
    sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D, dtype=jnp.bfloat16)
    kl, (d_sl, d_sr) = kl_and_grads(sl, sr, tl, tr, w)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w)
    assert d_sl.dtype == jnp.bfloat16 and d_sr.dtype == jnp.bfloat16
    assert rel_err(kl, ref) <= 1e-2
    assert rel_err(d_sl, r_sl) <= 1e-2
    assert rel_err(d_sr, r_sr) <= 1e-2


def test_large_logits_do_not_overflow(rng):
    # scale * |x|^2 ~ 1e4; tolerances as in test_relation_kl.py (f32 logits).
    sl, sr, tl, tr, w = make_inputs(rng, 1, 48, 2, 2, 64, std=35.0)
    kl, (d_sl, d_sr) = kl_and_grads(sl, sr, tl, tr, w)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w)
    assert np.abs(np.asarray(ref)).max() > 1e3
    assert rel_err(kl, ref) <= 1e-4
    assert rel_err(d_sl, r_sl) <= 3e-3
    assert rel_err(d_sr, r_sr) <= 3e-3


def test_jit_vmap_and_frozen_teacher(rng):
    """vmap over an outer axis (layers) with a shared (unmapped) padding mask;
    the teacher gets a zero gradient."""
    L, T, H, D = 2, 40, 2, 64
    sl, sr, tl, tr, w = make_inputs(rng, L, T, H, H, D)
    add_b = lambda x: x[:, None]  # [L, 1, T, H, D]: batch of one per layer
    sl, sr, tl, tr = map(add_b, (sl, sr, tl, tr))
    mask = jnp.asarray(np.arange(T)[None] < 33)
    kl_fn = lambda a, b, c, d: relation_kl(a, b, c, d, mask=mask, impl="pallas_tpu", interpret=True)
    loss = lambda *x: jnp.sum(w[:, None] * jax.vmap(kl_fn)(*x))
    d_sl, d_sr, d_tl = jax.jit(jax.grad(loss, (0, 1, 2)))(sl, sr, tl, tr)
    assert not np.any(np.asarray(d_tl))
    for l in range(L):
        _, (r_sl, r_sr) = reference64(sl[l], sr[l], tl[l], tr[l], w[l][None], mask=mask)
        assert rel_err(d_sl[l], r_sl) <= 1e-4
        assert rel_err(d_sr[l], r_sr) <= 1e-4


# -------------------------------------------------- TPU-specific structure ---


@pytest.mark.parametrize(
    "dtype,D,Hr,causal,mask",
    [
        (jnp.bfloat16, 128, 2, True, True),
        (jnp.float32, 64, 4, False, False),
    ],
)
def test_lowers_to_mosaic(dtype, D, Hr, causal, mask):
    """Forward and both backward kernels lower for TPU (block shapes, ops)."""
    B, T, H = 1, 300, 4
    x = jax.ShapeDtypeStruct((B, T, H, D), dtype)
    r = jax.ShapeDtypeStruct((B, T, Hr, D), dtype)
    m = jax.ShapeDtypeStruct((B, T), jnp.bool_)

    def loss(a, b, c, d, valid):
        return relation_kl(a, b, c, d, mask=valid if mask else None, causal=causal, impl="pallas_tpu").sum()

    exported = jax.export.export(jax.jit(jax.value_and_grad(loss, (0, 1))), platforms=["tpu"])(x, r, x, r, m)
    assert exported.mlir_module().count("tpu_custom_call") == 3


def test_causal_skipped_tiles_fetch_nothing():
    """Walking the forward grid, the right-side block index changes only on the
    tiles that are computed: skipped steps re-use the last block (no DMA)."""
    bq, bk, Tp = 32, 128, 512
    right_spec = relation_kl_tpu._row_specs(bq, bk, 128, 1, True, False)[1]
    fetches = needed = 0
    for i in range(Tp // bq):
        last = None
        for j in range(Tp // bk):
            block = int(right_spec.index_map(0, 0, i, j)[1])
            fetches += block != last
            last = block
            needed += j * bk <= (i + 1) * bq - 1
    assert fetches == needed < (Tp // bq) * (Tp // bk)


def test_cost_estimate_is_the_documented_formula():
    """As in test_relation_kl.py, with the lane-padded head dim the kernels see:
    forward 2*T^2*D*H, d_left and d_right 3*T^2*D*H each (causal), 2 exp2 per pair."""
    B, T, H, Hr, D = 2, 200, 4, 2, 80
    Tp, Dq = 256, 128  # T to a multiple of the 128 blocks; D 80 -> 128 -> 128 lanes
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    r = jax.ShapeDtypeStruct((B, T, Hr, D), jnp.float32)

    def fwd_bwd(a, b, c, d):
        loss = lambda a, b: relation_kl(a, b, c, d, impl="pallas_tpu", interpret=True).sum()
        return jax.value_and_grad(loss, (0, 1))(a, b)

    costs = pallas_call_costs(fwd_bwd, x, r, x, r)
    assert set(costs) == {"relation_kl_fwd_tpu", "relation_kl_dleft_tpu", "relation_kl_dright_tpu"}
    assert costs["relation_kl_fwd_tpu"].flops == 2 * Tp**2 * Dq * H * B
    assert costs["relation_kl_dleft_tpu"].flops == 3 * Tp**2 * Dq * H * B
    assert costs["relation_kl_dright_tpu"].flops == 3 * Tp**2 * Dq * H * B
    for c in costs.values():
        assert c.transcendentals == Tp**2 * H * B
    inputs = 2 * B * Tp * (H + Hr) * Dq * 4 + 2 * B * Tp * 4  # + q/k ids (T padded)
    assert costs["relation_kl_fwd_tpu"].bytes_accessed == inputs + 3 * B * H * Tp * 4


def test_block_rules_and_auto_dispatch(rng, monkeypatch):
    sl, sr, tl, tr, _ = make_inputs(rng, 1, 300, 2, 2, 64)
    with pytest.raises(ValueError, match="block_sizes"):
        relation_kl(
            sl, sr, tl, tr, impl="pallas_tpu", interpret=True, block_sizes={"block_k": 64}
        )  # 64 lanes, T spans 3 blocks
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert _resolve_impl("auto") == "pallas_tpu"
