"""The Mosaic GPU kernels' blocks, on CPU: D 64's default (128 x 64, measured on an H200 in the
tenth session) and the one-kernel backward on blocks of its own (BlockSizes.block_q_dk / block_k_dk,
= *_dq), so the forward can keep its own fastest tiles. What is checked here: the blocks reach the
kernels they name and no other, `pick_blocks` and `unsupported_reason` accept exactly the
combinations the kernels can run and name the rest, and the check script's new variant and API case
lower. Their values need a GPU (experiments/check_relation_kl_mgpu.py: `fused_64x128_bwd128x64`,
API case 25)."""

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import blocks, relation_kl_mgpu
from pallas_kernels.blocks import BlockSizes
from tests.kernel_cases import cuda_text

T = 256
SPLIT = dict(block_q=64, block_k=128, block_q_dq=128, block_q_dk=128, block_k_dq=64, block_k_dk=64)


def _args(D=64, heads=4, right_heads=2):
    x = jax.ShapeDtypeStruct((1, T, heads, D), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, T, right_heads, D), jnp.bfloat16)
    row = jax.ShapeDtypeStruct((1, heads, T), jnp.float32)
    return (x, r, x, r), (row, row, row)


def _kernels(fn, *args):
    """cuda_text without its first line (the module's name is the jitted function's)."""
    return cuda_text(fn, *args).split("\n", 1)[1]


def _cfg(**fields):
    return SimpleNamespace(blocks=BlockSizes(**fields), scale=0.125, causal=True)


def test_the_one_kernel_backward_runs_on_its_own_blocks():
    """Forward on 64 x 128 and backward on 128 x 64: each kernel is the one the coupled blocks of its
    own size build (the same wrappers, so the texts compare exactly)."""
    (x, r, tx, tr), rows = _args()

    def kernels(**fields):
        cfg = _cfg(**fields, fused_bwd=True)
        fwd = functools.partial(relation_kl_mgpu.forward, q_ids=None, k_ids=None, cfg=cfg)
        bwd = lambda *a: relation_kl_mgpu.backward(*a[:4], None, None, *a[4:], cfg=cfg)  # noqa: E731
        return _kernels(fwd, x, r, tx, tr), _kernels(bwd, x, r, tx, tr, *rows)

    split_fwd, split_bwd = kernels(**SPLIT)
    wide_fwd, wide_bwd = kernels(**{f: 64 if "_q" in f else 128 for f in blocks.BLOCK_FIELDS})  # 64 x 128
    tall_fwd, tall_bwd = kernels(**{f: 128 if "_q" in f else 64 for f in blocks.BLOCK_FIELDS})  # 128 x 64
    assert split_fwd == wide_fwd != tall_fwd
    assert split_bwd == tall_bwd != wide_bwd


def test_pick_blocks_takes_a_backward_of_its_own_only_where_it_runs_one():
    pick = functools.partial(blocks.pick_blocks, impl="pallas_mgpu", T=4096, row_bytes=128, batch_heads=36)
    b = pick(dict(SPLIT))
    assert (b.block_q, b.block_k, b.block_q_dk, b.block_k_dk, b.fused_bwd) == (64, 128, 128, 64, True)
    # *_dq name the same backward as *_dk: both or neither
    with pytest.raises(ValueError, match="block_q_dk x block_k_dk"):
        pick(dict(SPLIT, block_q_dq=64))
    # the two-kernel backward runs on the forward's blocks
    with pytest.raises(ValueError, match="two-kernel backward"):
        pick(dict(SPLIT, fused_bwd=False))
    # the backward's fields follow the forward's unless set (D 64's default is 128 x 64) ...
    assert pick(None) == blocks.MGPU_BLOCKS_NARROW
    b = pick({"block_q": 64})
    assert (b.block_q, b.block_q_dq, b.block_q_dk, b.block_k_dk) == (64, 64, 64, 64)
    # ... and *_dq / *_dk follow each other when one of them is set
    b = pick({"block_q_dk": 64})
    assert (b.block_q, b.block_k, b.block_q_dq, b.block_q_dk, b.block_k_dq, b.block_k_dk) == (128, 64, 64, 64, 64, 64)
    # a BlockSizes object is taken as it is, so a split backward there is refused, not run on field defaults
    assert pick(blocks.MGPU_BLOCKS_NARROW) == blocks.MGPU_BLOCKS_NARROW
    with pytest.raises(ValueError, match="as dict overrides"):
        pick(dataclasses.replace(blocks.MGPU_BLOCKS, block_q=128))


def test_unsupported_reason_sizes_each_kernel_on_its_own_blocks():
    reason = functools.partial(relation_kl_mgpu.unsupported_reason, dtype=jnp.bfloat16, interpret=False)
    shape = (1, 4096, 32, 128)
    # D 128: 64 x 128 with the one-kernel backward on it does not fit; the forward alone on it does
    assert "shared memory" in reason(shape, block_q=64, block_kv=128, fused_bwd=True)
    assert reason(shape, block_q=64, block_kv=128, fused_bwd=True, bwd_blocks=(64, 64)) is None
    too_big = reason(shape, block_q=64, block_kv=64, fused_bwd=True, bwd_blocks=(128, 128))
    assert "backward blocks (128, 128)" in too_big and "shared memory" in too_big and "block_q_dk" in too_big
    assert "only the one-kernel backward" in reason(shape, block_q=64, block_kv=128, bwd_blocks=(64, 64))
    # T must hold pairs of both kernels' blocks
    assert "2 * block_q = 256" in reason((1, 384, 4, 64), block_q=64, block_kv=64, fused_bwd=True, bwd_blocks=(128, 64))


def test_relation_kl_lowers_with_split_blocks_and_the_d64_default():
    """Through relation_kl's custom_vjp (padding: T 200 -> 256), the check script's API case 25
    blocks and D 64's default both lower to Mosaic GPU kernels, and differ."""
    from experiments import check_relation_kl_mgpu as check

    x = jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16)
    (case,) = [c for c in check.API_CASES if c[-1] and c[-1].get("block_q_dk") == 128]
    assert case[4] == 64 and case[-1]["fused_bwd"] and case[-1]["block_k"] == 128

    def lowered(block_sizes):
        def loss(q, k, tq, tk):
            kls = pallas_kernels.self_relation_kl_multi([(q, tq), (k, tk)], impl="pallas_mgpu", block_sizes=block_sizes)
            return sum(kl.sum() for kl in kls)

        text = cuda_text(jax.grad(loss, argnums=(0, 1)), x, kv, x, kv)
        assert text.count("mosaic_gpu") >= 2 and "triton" not in text.lower()
        return text

    assert lowered(case[-1]) != lowered(None)


def test_the_check_variant_runs_each_kernel_on_its_blocks():
    from experiments import check_relation_kl_mgpu as check

    (variant,) = [v for v in check.VARIANTS if v[0] == "fused_64x128_bwd128x64"]
    fwd, bwd = check.variant_kernels(variant, scale=0.125, causal=True)
    (x, r, tx, tr), rows = _args()
    plain_bwd = functools.partial(relation_kl_mgpu.mosaic_backward_fused, scale=0.125, causal=True)
    assert fwd.keywords["block_q"] == 64 and fwd.keywords["block_kv"] == 128
    assert _kernels(bwd, x, r, tx, tr, *rows) == _kernels(
        functools.partial(plain_bwd, block_q=128, block_kv=64), x, r, tx, tr, *rows
    )


def test_d64_default_is_the_measured_128x64_and_d128_keeps_64x64_merged():
    narrow, wide = blocks.default_blocks("pallas_mgpu", 128), blocks.default_blocks("pallas_mgpu", 256)
    assert (narrow.block_q, narrow.block_k, narrow.block_q_dk, narrow.block_k_dk) == (128, 64, 128, 64)
    assert narrow.fused_bwd and not narrow.merge_d_left
    assert dataclasses.replace(wide, merge_d_left=False) == blocks.MGPU_BLOCKS
