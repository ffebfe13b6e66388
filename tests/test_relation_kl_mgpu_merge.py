"""BlockSizes.merge_d_left (the Mosaic one-kernel backward sums its two compute warpgroups' d_left
parts of a query tile, [dS₀ | dS₁] · [s_right₀ ; s_right₁], before one TMA reduce-add instead of
two; the warpgroups take turns), on CPU: it lowers for "cuda" on every path of the backward
(causal or not, with or without ids, head dims 64 and 128, the d_left ablation), it changes the
kernel, it reaches the one-kernel backward only through relation_kl's block sizes, it is refused
where it has no meaning, and the check script carries it. Its values need a GPU
(experiments/check_relation_kl_mgpu.py's `fused_64x64_merge` and API cases 22-24)."""

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import relation_kl_mgpu
from pallas_kernels.blocks import BlockSizes
from tests.kernel_cases import cuda_text

T = 256


def _backward_args(D, has_ids, heads=4, right_heads=2):
    x = jax.ShapeDtypeStruct((1, T, heads, D), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, T, right_heads, D), jnp.bfloat16)
    row = jax.ShapeDtypeStruct((1, heads, T), jnp.float32)
    ids = (jax.ShapeDtypeStruct((1, T), jnp.int32),) * 2 if has_ids else ()
    return (x, r, x, r, row, row, row, *ids)


def _fused(**kw):
    return functools.partial(relation_kl_mgpu.mosaic_backward_fused, scale=0.125, **kw)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal,has_ids", [(True, False), (True, True), (False, True)])
def test_merge_d_left_lowers_to_another_kernel(D, causal, has_ids):
    args = _backward_args(D, has_ids)
    on = cuda_text(_fused(causal=causal, merge_d_left=True), *args)
    off = cuda_text(_fused(causal=causal), *args)
    assert "mosaic_gpu" in on and on != off


def test_merge_d_left_takes_the_d_left_ablation():
    """ablate=("d_left",) still removes d_left's wgmmas and reduce-adds from the merged kernel."""
    args = _backward_args(64, False)
    merged = cuda_text(_fused(causal=True, merge_d_left=True, ablate=("d_left",)), *args)
    assert "mosaic_gpu" in merged
    assert merged != cuda_text(_fused(causal=True, merge_d_left=True), *args)


@pytest.mark.parametrize("other", [{"schedule_barrier": True}, {"pair_wgmmas": True}, {"overlap_softmax": True}])
def test_merge_d_left_is_refused_beside_another_schedule(other):
    with pytest.raises(ValueError, match="merge_d_left: not with schedule_barrier, pair_wgmmas or overlap_softmax"):
        jax.eval_shape(_fused(causal=True, merge_d_left=True, **other), *_backward_args(64, False))


def test_merge_d_left_is_refused_by_the_two_kernel_backward():
    x, r, _, _, row, _, _ = _backward_args(64, False)
    with pytest.raises(ValueError, match="merge_d_left: the one-kernel"):
        relation_kl_mgpu._key_block_backward(
            x,
            r,
            x,
            r,
            row,
            row,
            row,
            (),
            scale=0.125,
            causal=True,
            block_q=64,
            block_kv=64,
            steps=2,
            fused=False,
            merge_d_left=True,
        )


def test_block_sizes_field_reaches_the_one_kernel_backward_only():
    args = _backward_args(64, False)

    def bwd(merge, fused, *a):
        cfg = SimpleNamespace(
            blocks=BlockSizes(block_q=64, block_k=64, merge_d_left=merge, fused_bwd=fused), scale=0.125, causal=True
        )
        return relation_kl_mgpu.backward(*a[:4], None, None, *a[4:], cfg=cfg)

    assert cuda_text(functools.partial(bwd, True, True), *args) != cuda_text(functools.partial(bwd, False, True), *args)
    # the two-kernel backward has no merged d_left: the flag leaves it as it is
    assert cuda_text(functools.partial(bwd, True, False), *args) == cuda_text(
        functools.partial(bwd, False, False), *args
    )


def test_the_check_variant_and_api_cases_carry_it():
    from experiments import check_relation_kl_mgpu as check

    (variant,) = [v for v in check.VARIANTS if v[0] == "fused_64x64_merge"]
    fwd, bwd = check.variant_kernels(variant, scale=0.125, causal=True)
    args = _backward_args(64, False)
    # the forward is the plain one; the backward is the merged one
    assert cuda_text(fwd, *args[:4]) == cuda_text(
        functools.partial(relation_kl_mgpu.mosaic_forward, scale=0.125, causal=True), *args[:4]
    )
    assert cuda_text(bwd, *args) == cuda_text(_fused(causal=True, merge_d_left=True), *args)
    cases = [c for c in check.API_CASES if c[-1] and c[-1].get("merge_d_left")]
    assert all(c[-1].get("fused_bwd") for c in cases)
    assert {(c[5], c[6]) for c in cases} == {(True, "packed"), (True, "padded"), (False, "padded")}


def test_default_blocks_merge_at_head_dim_128_only():
    """The measured default: merged at bf16 D 128 (rows of 256 bytes), not at D 64 (128 bytes)."""
    from pallas_kernels import blocks

    wide, narrow = blocks.default_blocks("pallas_mgpu", 256), blocks.default_blocks("pallas_mgpu", 128)
    assert wide.merge_d_left and wide.fused_bwd and not narrow.merge_d_left and narrow.fused_bwd
    assert dataclasses.replace(wide, merge_d_left=False) == blocks.MGPU_BLOCKS
    # D 64: 128-row query blocks for all three kernels (measured, tenth session), 64-row key blocks
    assert narrow == dataclasses.replace(blocks.MGPU_BLOCKS, block_q=128, block_q_dq=128, block_q_dk=128)


def test_the_ablation_script_takes_the_merged_backward(tmp_path, capsys):
    """Ablating d_left from the merged backward must not leave its final barrier wait behind (that
    kernel would hang: nobody arrives on "dS read"); here: every ablated variant lowers."""
    from experiments import ablate_relation_kl_mgpu as ablate_mod

    out = str(tmp_path / "a.json")
    result = ablate_mod.main(["--dry_run", "--merge_d_left", "--cases", "1,256,2,64", "--out", out])
    assert result["merge_d_left"] and all(r["lowered"] for r in result["rows"])
    with pytest.raises(SystemExit):
        ablate_mod.main(["--dry_run", "--merge_d_left", "--overlap_softmax"])
    assert "one schedule at a time" in capsys.readouterr().err


def test_merge_d_left_without_d_left_waits_on_no_merge_barrier():
    """With d_left ablated the merged kernel is the unmerged ablated one but for the two unused
    barrier arrays: no barrier wait of the merge is left in it (it would hang)."""
    args = _backward_args(64, False)

    def waits(fn):  # barrier waits in the kernel body's jaxpr (the lowered text holds MLIR bytecode)
        return str(jax.make_jaxpr(fn)(*args)).count("barrier_wait")

    assert waits(_fused(causal=True, merge_d_left=True, ablate=("d_left",))) == waits(
        _fused(causal=True, ablate=("d_left",))
    )
    assert waits(_fused(causal=True, merge_d_left=True)) > waits(_fused(causal=True))  # the count sees them


@pytest.mark.parametrize("name", ["fused_64x128_merge", "fused_128x64_merge"])
def test_merge_d_left_lowers_with_unequal_blocks(name):
    """Unequal blocks (D 64): the second warpgroup starts with fully masked steps (64 x 128), or the
    last pair of key blocks has a single query step (128 x 64)."""
    from experiments import check_relation_kl_mgpu as check

    (variant,) = [v for v in check.VARIANTS if v[0] == name]
    _, bwd = check.variant_kernels(variant, scale=0.125, causal=True)
    assert "mosaic_gpu" in cuda_text(bwd, *_backward_args(64, False))
