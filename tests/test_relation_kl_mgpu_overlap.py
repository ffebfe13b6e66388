"""BlockSizes.overlap_softmax (the Mosaic forward issues the next step's logit wgmmas before its own
softmax, `relation_kl_mgpu._OverlappedLogits`), on CPU: it lowers for "cuda" on every path the
forward has (causal or not, with or without ids, head dims 64 and 128, the teacher-logits
ablation), it changes the kernel, it reaches the forward through relation_kl's block sizes and the
check script's variant, and it is refused beside the ping-pong. Its values need a GPU
(experiments/check_relation_kl_mgpu.py's `fused_64x64_overlap` and API cases 19-21); its SASS
(the softmax under the next step's wgmmas, no serialized wgmma) is in docs/kernel_notes.md."""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import relation_kl_mgpu
from tests.kernel_cases import cuda_text

T = 256


def _shapes(D, has_ids):
    x = jax.ShapeDtypeStruct((1, T, 4, D), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, T, 2, D), jnp.bfloat16)
    ids = (jax.ShapeDtypeStruct((1, T), jnp.int32),) * 2 if has_ids else ()
    return (x, r, x, r, *ids)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal,has_ids", [(True, False), (True, True), (False, True)])
def test_overlap_softmax_lowers_to_another_kernel(D, causal, has_ids):
    args = _shapes(D, has_ids)
    kw = dict(scale=D**-0.5, causal=causal)
    on = cuda_text(functools.partial(relation_kl_mgpu.mosaic_forward, overlap_softmax=True, **kw), *args)
    off = cuda_text(functools.partial(relation_kl_mgpu.mosaic_forward, **kw), *args)
    assert "mosaic_gpu" in on and on != off


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal,has_ids", [(True, False), (True, True), (False, True)])
def test_backward_overlap_lowers_to_another_kernel(D, causal, has_ids):
    x, r, _, _, *ids = _shapes(D, has_ids)
    row = jax.ShapeDtypeStruct((1, 4, T), jnp.float32)
    args = (x, r, x, r, row, row, row, *ids)
    kw = dict(scale=D**-0.5, causal=causal)
    on = cuda_text(functools.partial(relation_kl_mgpu.mosaic_backward_fused, overlap_softmax=True, **kw), *args)
    off = cuda_text(functools.partial(relation_kl_mgpu.mosaic_backward_fused, **kw), *args)
    assert "mosaic_gpu" in on and on != off
    with pytest.raises(ValueError, match="overlap_softmax: not with schedule_barrier"):
        jax.eval_shape(
            functools.partial(
                relation_kl_mgpu.mosaic_backward_fused, overlap_softmax=True, schedule_barrier=True, **kw
            ),
            *args,
        )


def test_overlap_softmax_takes_the_teacher_logits_ablation():
    args = _shapes(64, False)
    kw = dict(scale=0.125, causal=True, overlap_softmax=True)
    plain = cuda_text(functools.partial(relation_kl_mgpu.mosaic_forward, **kw), *args)
    ablated = cuda_text(functools.partial(relation_kl_mgpu.mosaic_forward, ablate=("teacher_logits",), **kw), *args)
    assert "mosaic_gpu" in ablated and ablated != plain


@pytest.mark.parametrize("other", [{"schedule_barrier": True}, {"pair_wgmmas": True}])
def test_overlap_softmax_is_refused_beside_the_ping_pong(other):
    with pytest.raises(ValueError, match="overlap_softmax: not with schedule_barrier or pair_wgmmas"):
        relation_kl_mgpu.mosaic_forward(*_shapes(64, False), scale=0.125, causal=True, overlap_softmax=True, **other)


def test_block_sizes_field_reaches_the_forward():
    """relation_kl's kernel contract passes BlockSizes.overlap_softmax to the forward only."""
    from types import SimpleNamespace

    from pallas_kernels.blocks import BlockSizes

    args = _shapes(64, False)

    def fwd(overlap, *a):
        cfg = SimpleNamespace(
            blocks=BlockSizes(block_q=64, block_k=64, overlap_softmax=overlap), scale=0.125, causal=True
        )
        return relation_kl_mgpu.forward(*a[:4], None, None, cfg=cfg)

    on = cuda_text(functools.partial(fwd, True), *args)
    assert "mosaic_gpu" in on and on != cuda_text(functools.partial(fwd, False), *args)

    row = jax.ShapeDtypeStruct((1, 4, T), jnp.float32)

    def bwd(overlap, fused, *a):
        blocks = BlockSizes(block_q=64, block_k=64, overlap_softmax=overlap, fused_bwd=fused)
        cfg = SimpleNamespace(blocks=blocks, scale=0.125, causal=True)
        return relation_kl_mgpu.backward(*a[:4], None, None, *a[4:], cfg=cfg)

    bwd_args = (*args, row, row, row)
    assert cuda_text(functools.partial(bwd, True, True), *bwd_args) != cuda_text(
        functools.partial(bwd, False, True), *bwd_args
    )
    # the two-kernel backward has no such schedule: the flag leaves it as it is
    assert cuda_text(functools.partial(bwd, True, False), *bwd_args) == cuda_text(
        functools.partial(bwd, False, False), *bwd_args
    )


def test_the_check_variant_and_api_cases_carry_it():
    from experiments import check_relation_kl_mgpu as check

    names = {v[0] for v in check.VARIANTS}
    assert {"fused_64x64_overlap_fwd", "fused_64x64_overlap_ring3", "fused_64x64_overlap_ring3_bwd"} <= names
    (variant,) = [v for v in check.VARIANTS if v[0] == "fused_64x64_overlap"]
    fwd, bwd = check.variant_kernels(variant, scale=0.125, causal=True)
    args = _shapes(64, False)
    row = jax.ShapeDtypeStruct((1, 4, T), jnp.float32)
    assert cuda_text(fwd, *args) != cuda_text(
        functools.partial(relation_kl_mgpu.mosaic_forward, scale=0.125, causal=True), *args
    )
    assert cuda_text(bwd, *args[:4], row, row, row) != cuda_text(
        functools.partial(relation_kl_mgpu.mosaic_backward_fused, scale=0.125, causal=True), *args[:4], row, row, row
    )
    cases = [c for c in check.API_CASES if c[-1] and c[-1].get("overlap_softmax")]
    assert {(c[5], c[6]) for c in cases} == {(True, "packed"), (True, "padded"), (False, "padded")}


def test_the_ablation_script_takes_the_overlapped_kernels(tmp_path, capsys):
    from experiments import ablate_relation_kl_mgpu as ablate_mod

    result = ablate_mod.main(
        ["--dry_run", "--overlap_softmax", "--cases", "1,256,2,64", "--out", str(tmp_path / "a.json")]
    )
    rows = result["rows"]
    assert len(rows) == len(ablate_mod.FWD_VARIANTS) + len(ablate_mod.BWD_VARIANTS)
    assert all(r["lowered"] for r in rows) and result["overlap_softmax"]
    with pytest.raises(SystemExit):
        ablate_mod.main(["--dry_run", "--overlap_softmax", "--schedule_barrier"])
    assert "one schedule at a time" in capsys.readouterr().err
