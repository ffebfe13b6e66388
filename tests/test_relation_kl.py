"""pallas_kernels.relation_kl against an independent float64 dense reference.

The Pallas kernels run in interpret mode on CPU (impl="pallas_gpu",
interpret=True); "xla" is the linear-memory JAX version. Shapes and blocks are
small (non-square blocks, T not a multiple of them) so the interpreter is quick.
Tolerances: f32 forward 1e-5 and gradients 1e-4 in relative norm (f32 rounding
over at most a few hundred terms); bf16 1e-2 (8-bit mantissa inputs, dS cast to
bf16 before the gradient matmuls).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import BlockSizes, cost, relation_kl, self_relation_kl
from tests.kernel_cases import (
    assert_matches_reference,
    case_kwargs,
    cuda_text,
    make_inputs,
    pallas_call_costs,
    reference64,
    rel_err,
    rng_fixture,  # noqa: F401 (the "rng" fixture)
)
from tests.kernel_cases import kl_and_grads as _kl_and_grads

# Mixed tile shapes; T is padded to 32 inside the wrapper.
SMALL_BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dk=32, block_k_dk=16)
IMPLS = ["xla", "pallas_gpu"]


def _kw(impl):
    return dict(impl=impl, interpret=True, block_sizes=SMALL_BLOCKS)


def kl_and_grads(impl, sl, sr, tl, tr, w, **kw):
    return _kl_and_grads(sl, sr, tl, tr, w, **_kw(impl), **kw)


# -------------------------------------------------------------- correctness ---

CASES = {
    # name: (B, T, H, Hr, D, options)
    "odd_T": (2, 37, 2, 2, 16, {}),
    "gqa2_T100": (1, 100, 4, 2, 32, {}),
    "gqa1_noncausal": (2, 48, 4, 1, 64, {"causal": False}),
    "padding_mask_D80": (3, 37, 2, 2, 80, {"mask": True}),
    "segments_and_mask": (2, 100, 2, 1, 32, {"mask": True, "segments": True}),
    "noncausal_segments": (1, 64, 2, 2, 16, {"causal": False, "segments": True, "scale": 0.3}),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(rng, impl, case):
    B, T, H, Hr, D, opts = CASES[case]
    sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D)
    kw = case_kwargs(rng, B, T, opts)
    kl, (d_sl, d_sr) = kl_and_grads(impl, sl, sr, tl, tr, w, **kw)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w, **kw)
    assert kl.shape == (B, H, T)
    assert_matches_reference(kl, (d_sl, d_sr), ref, (r_sl, r_sr), kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_self_relation_sums_both_gradients(rng, impl):
    B, T, H, D = 1, 130, 2, 64
    x, _, t, _, w = make_inputs(rng, B, T, H, H, D)

    def loss(s):
        kl = self_relation_kl(s, t, **_kw(impl))
        return jnp.sum(w * kl), kl

    (_, kl), d_x = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    ref, (r_l, r_r) = reference64(x, x, t, t, w)
    assert rel_err(kl, ref) <= 1e-5
    assert rel_err(d_x, r_l + r_r) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(rng, impl):
    B, T, H, Hr, D = 1, 100, 4, 2, 64
    sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D, dtype=jnp.bfloat16)
    kl, (d_sl, d_sr) = kl_and_grads(impl, sl, sr, tl, tr, w)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w)
    assert d_sl.dtype == jnp.bfloat16 and d_sr.dtype == jnp.bfloat16
    assert rel_err(kl, ref) <= 1e-2
    assert rel_err(d_sl, r_sl) <= 1e-2
    assert rel_err(d_sr, r_sr) <= 1e-2


def test_jit_and_vmap(rng):
    """vmap over an outer axis (e.g. layers), the whole loss and gradient jitted."""
    L, B, T, H, D = 2, 1, 40, 2, 16
    sl, sr, tl, tr, w = make_inputs(rng, L * B, T, H, H, D)
    split = lambda x: x.reshape((L, B) + x.shape[1:])
    sl, sr, tl, tr, w = map(split, (sl, sr, tl, tr, w))

    @jax.jit
    def loss_and_grad(sl, sr):
        def loss(sl, sr):
            kl = jax.vmap(lambda a, b, c, d: relation_kl(a, b, c, d, **_kw("pallas_gpu")))(sl, sr, tl, tr)
            return jnp.sum(w * kl), kl

        return jax.value_and_grad(loss, (0, 1), has_aux=True)(sl, sr)

    (_, kl), (d_sl, d_sr) = loss_and_grad(sl, sr)
    for l in range(L):
        ref, (r_sl, r_sr) = reference64(sl[l], sr[l], tl[l], tr[l], w[l])
        assert rel_err(kl[l], ref) <= 1e-5
        assert rel_err(d_sl[l], r_sl) <= 1e-4
        assert rel_err(d_sr[l], r_sr) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_do_not_overflow(rng, impl):
    # scale * |x|^2 ~ 1e4: exp would overflow without the running max.
    B, T, H, D = 1, 48, 2, 64
    sl, sr, tl, tr, w = make_inputs(rng, B, T, H, H, D, std=35.0)
    kl, (d_sl, d_sr) = kl_and_grads(impl, sl, sr, tl, tr, w)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w)
    assert np.abs(np.asarray(ref)).max() > 1e3
    # f32 logits of size 1e4 carry ~1e-3 absolute rounding, which p = exp(u - lse)
    # turns into ~1e-3 relative error of the probabilities: the gradients are as
    # good as f32 logits allow, not 1e-4.
    assert rel_err(kl, ref) <= 1e-4
    assert rel_err(d_sl, r_sl) <= 3e-3
    assert rel_err(d_sr, r_sr) <= 3e-3


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_teacher_gets_no_gradient(rng, impl):
    sl, sr, tl, tr, _ = make_inputs(rng, 1, 20, 2, 2, 16)
    kw = _kw(impl) if impl != "reference" else {"impl": impl}
    d_tl, d_tr = jax.jit(jax.grad(lambda c, d: relation_kl(sl, sr, c, d, **kw).sum(), (0, 1)))(tl, tr)
    assert not np.any(np.asarray(d_tl)) and not np.any(np.asarray(d_tr))


def test_reference_impl_and_export(rng):
    B, T, H, Hr, D = 2, 30, 4, 2, 16
    sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D)
    mask = jnp.asarray(np.arange(T)[None] < np.array([[30], [11]]))
    ref, (r_sl, _) = reference64(sl, sr, tl, tr, w, mask=mask)
    out = jax.jit(pallas_kernels.relation_kl_reference)(sl, sr, tl, tr, mask=mask)
    assert rel_err(out, ref) <= 1e-5
    loss = lambda a: jnp.sum(w * relation_kl(a, sr, tl, tr, mask=mask, impl="reference"))
    d_sl = jax.jit(jax.grad(loss))(sl)
    assert rel_err(d_sl, r_sl) <= 1e-4


def test_auto_is_xla_on_cpu(rng, monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU dispatch")
    from pallas_kernels import relation_kl_gpu

    monkeypatch.setattr(relation_kl_gpu, "forward", lambda *a, **k: pytest.fail("used pallas"))
    sl, sr, tl, tr, w = make_inputs(rng, 1, 20, 2, 2, 16)
    ref, _ = reference64(sl, sr, tl, tr, w)
    assert rel_err(relation_kl(sl, sr, tl, tr), ref) <= 1e-5


@pytest.mark.parametrize("dtype,mask", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_lowers_to_triton(dtype, mask):
    """Forward and both backward kernels lower through Pallas -> Triton IR for
    "cuda" (the GPU's Triton compiler and ptxas are not run here)."""
    B, T, H, Hr, D = 1, 200, 4, 2, 128
    x = jax.ShapeDtypeStruct((B, T, H, D), dtype)
    r = jax.ShapeDtypeStruct((B, T, Hr, D), dtype)
    m = jax.ShapeDtypeStruct((B, T), jnp.bool_)

    def fwd_bwd(a, b, c, d, valid):
        loss = lambda a, b: relation_kl(a, b, c, d, mask=valid if mask else None, impl="pallas_gpu").sum()
        return jax.value_and_grad(loss, (0, 1))(a, b)

    lowered = jax.jit(fwd_bwd).trace(x, r, x, r, m).lower(lowering_platforms=("cuda",))
    calls = re.findall(r"custom_call @([\w$.]+)", lowered.as_text())
    assert len(calls) == 3 and all("triton" in c for c in calls), calls


# ------------------------------------------------------------ cost estimate ---


@pytest.mark.parametrize("causal", [True, False])
def test_cost_estimate_is_the_documented_formula(causal):
    """docs/kernel_notes.md: forward 2*T^2*D*H flops (two matmuls over the causal
    half square), backward 6*T^2*D*H split 3 + 3 between d_left and d_right, 2 exp2
    per (row, key) pair per kernel; non-causal doubles. T and D are the padded sizes
    the kernels see; bytes = operands read once + results written once."""
    B, T, H, Hr, D = 2, 37, 4, 2, 24
    Tp, Dp, item = 64, 32, 2  # T to a multiple of the largest block (32), D to 2^k
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((B, T, Hr, D), jnp.bfloat16)

    def fwd_bwd(a, b, c, d):
        loss = lambda a, b: relation_kl(a, b, c, d, causal=causal, **_kw("pallas_gpu")).sum()
        return jax.value_and_grad(loss, (0, 1))(a, b)

    costs = pallas_call_costs(fwd_bwd, x, r, x, r)
    half = 1 if causal else 2  # T^2 / 2 pairs causal, T^2 otherwise
    assert costs["relation_kl_fwd"].flops == 2 * Tp**2 * Dp * H * B * half
    assert costs["relation_kl_dleft"].flops + costs["relation_kl_dright"].flops == 6 * Tp**2 * Dp * H * B * half
    assert costs["relation_kl_dleft"].flops == costs["relation_kl_dright"].flops
    for c in costs.values():
        assert c.transcendentals == 2 * (Tp**2 // 2) * H * B * half
    inputs = 2 * B * Tp * (H + Hr) * Dp * item + 2 * B * Tp * 4  # + q/k ids (T padded)
    rows = B * H * Tp * 4  # one f32 row statistic
    assert costs["relation_kl_fwd"].bytes_accessed == inputs + 3 * rows
    assert costs["relation_kl_dleft"].bytes_accessed == inputs + 3 * rows + B * Tp * H * Dp * item
    # GQA: d_right writes one f32 gradient per query head, summed outside.
    assert costs["relation_kl_dright"].bytes_accessed == inputs + 3 * rows + B * Tp * H * Dp * 4
    assert cost.flops("fwd", B=B, H=H, T=Tp, D=Dp, causal=causal) == (costs["relation_kl_fwd"].flops)


def test_block_policy():
    """blocks.py: defaults per impl, GPU shrink for wide rows, clamp to T, padding."""
    from pallas_kernels import blocks

    assert blocks.pick_blocks(None, "pallas_gpu", 4096, 128 * 2) == blocks.GPU_TILE_TABLE[(128, "many")]
    wide = blocks.pick_blocks(None, "pallas_gpu", 4096, 128 * 4)  # f32 rows: half tiles
    base = blocks.GPU_TILE_TABLE[(128, "many")]
    assert (wide.block_q, wide.block_k, wide.num_stages_fwd) == (base.block_q // 2, base.block_k // 2, 2)
    assert set(blocks.pick_blocks(None, "xla", 4096, 256).all_blocks()) == {512}
    assert set(blocks.pick_blocks(None, "pallas_tpu", 4096, 256).all_blocks()) == {128}
    short = blocks.pick_blocks({"block_q": 256}, "xla", 37, 256)
    assert set(short.all_blocks()) == {64} and blocks.padded_length(37, short) == 64
    assert [blocks.padded_head_dim(d) for d in (8, 24, 64, 80)] == [16, 32, 64, 128]
    assert [blocks.lane_dim(d) for d in (16, 128, 256)] == [128, 128, 256]
    with pytest.raises(ValueError, match="block_sizes"):
        blocks.pick_blocks({"block_k": 64}, "pallas_tpu", 300, 256)
    with pytest.raises(ValueError, match="block_sizes"):
        blocks.pick_blocks({"block_kk": 64}, "xla", 300, 256)


def test_gpu_tile_table_keys(monkeypatch):
    """GPU defaults come from GPU_TILE_TABLE by head-dim class (16-bit row width) and
    grid size (B x H <= FEW_BATCH_HEADS: "few"); relation_kl passes B x H of the call."""
    from pallas_kernels import blocks, relation_kl_gpu

    assert set(blocks.GPU_TILE_TABLE) == {(64, "few"), (64, "many"), (128, "few"), (128, "many")}
    assert set(blocks.GPU_MERGE_RELATIONS) == {64, 128}
    marks = {key: BlockSizes(block_q=16 << i, block_k=16) for i, key in enumerate(sorted(blocks.GPU_TILE_TABLE))}
    monkeypatch.setattr(blocks, "GPU_TILE_TABLE", marks)
    few = blocks.FEW_BATCH_HEADS
    for D, bh, key in [
        (64, few, (64, "few")),
        (32, few + 1, (64, "many")),
        (128, 1, (128, "few")),
        (80, 64, (128, "many")),
    ]:
        row_bytes = blocks.padded_head_dim(D) * 2
        assert blocks.pick_blocks(None, "pallas_gpu", 4096, row_bytes, batch_heads=bh) == marks[key], (D, bh)
    assert blocks.pick_blocks(None, "pallas_gpu", 4096, 128) == marks[(64, "many")]  # B x H unknown
    # A dict overrides fields of the table entry.
    assert blocks.pick_blocks({"block_k": 32}, "pallas_gpu", 4096, 128, 4).block_q == marks[(64, "few")].block_q
    # relation_kl looks the entry up with its own B x H (the forward grid shows block_q).
    seen = []
    real = relation_kl_gpu.forward
    monkeypatch.setattr(relation_kl_gpu, "forward", lambda *a, cfg: seen.append(cfg.blocks) or real(*a, cfg=cfg))
    x = jnp.zeros((2, 256, 3, 64), jnp.bfloat16)
    jax.eval_shape(lambda x: relation_kl(x, x, x, x, impl="pallas_gpu", interpret=True), x)
    y = jnp.zeros((2, 256, 9, 64), jnp.bfloat16)
    jax.eval_shape(lambda y: relation_kl(y, y, y, y, impl="pallas_gpu", interpret=True), y)
    assert [b.block_q for b in seen] == [marks[(64, "few")].block_q, marks[(64, "many")].block_q]
    monkeypatch.setattr(blocks, "GPU_MERGE_RELATIONS", {64: False, 128: True})
    assert not blocks.merge_relations("pallas_gpu", 128) and blocks.merge_relations("pallas_gpu", 256)
    assert blocks.merge_relations("xla", 128)


# ------------------------------------------------------- several relations ---

# heads of the three relations of a layer (SmolLM2: 9 query heads, 3 KV heads)
QKV_HEADS = (6, 2, 2)
MULTI_CASES = {
    # name: (B, T, D, options)
    "causal": (2, 40, 16, {}),
    "noncausal_scale": (1, 33, 24, {"causal": False, "scale": 0.3}),
    "padding_mask": (3, 37, 16, {"mask": True}),
    "segments_and_mask": (2, 50, 32, {"mask": True, "segments": True}),
}


def _qkv(rng, B, T, D, heads=QKV_HEADS, dtype=jnp.float32):
    draw = lambda h: jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32).astype(dtype)
    students = [draw(h) for h in heads]
    teachers = [draw(h) for h in heads]
    weights = [jnp.asarray(rng.standard_normal((B, h, T)), jnp.float32) for h in heads]
    return students, teachers, weights


def _multi_kl_and_grads(students, teachers, weights, **kw):
    def loss(s):
        kls = pallas_kernels.self_relation_kl_multi(list(zip(s, teachers)), **kw)
        return sum(jnp.sum(w * kl) for w, kl in zip(weights, kls)), kls

    (_, kls), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(students)
    return kls, grads


@pytest.mark.parametrize(
    "impl,case", [("pallas_gpu", c) for c in MULTI_CASES] + [("xla", "segments_and_mask")]
)  # the merge is impl-agnostic (concatenate, one relation_kl, split): one "xla" case
def test_multi_one_launch_equals_separate_launches(rng, impl, case):
    """A layer's q/k/v self-relations in one call (heads concatenated) give the KL rows
    and gradients of three calls, and of the float64 reference."""
    B, T, D, opts = MULTI_CASES[case]
    students, teachers, weights = _qkv(rng, B, T, D)
    kw = dict(case_kwargs(rng, B, T, opts), **_kw(impl))
    one, g_one = _multi_kl_and_grads(students, teachers, weights, merge=True, **kw)
    three, g_three = _multi_kl_and_grads(students, teachers, weights, merge=False, **kw)
    for r in range(3):
        assert one[r].shape == (B, QKV_HEADS[r], T)
        # Same per-head arithmetic; XLA may block the "xla" impl's sums differently.
        assert rel_err(one[r], three[r]) <= 1e-5
        assert rel_err(g_one[r], g_three[r]) <= 1e-5
        ref, (r_l, r_r) = reference64(
            students[r], students[r], teachers[r], teachers[r], weights[r], **case_kwargs_only(kw)
        )
        assert rel_err(one[r], ref) <= 1e-5
        assert rel_err(g_one[r], r_l + r_r) <= 1e-4


def case_kwargs_only(kw):
    return {k: v for k, v in kw.items() if k in ("mask", "segment_ids", "causal", "scale")}


def _count_kernels(fn, *args):
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                meta = eqn.params.get("name_and_src_info")
                names.append(getattr(meta, "name", None) or eqn.params.get("name"))
                continue
            for v in eqn.params.values():
                for sub in v if isinstance(v, (list, tuple)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return {n: names.count(n) for n in set(names)}


@pytest.mark.parametrize("merge,launches", [(True, 1), (False, 3), (None, 1)])
def test_multi_launch_count(rng, merge, launches, monkeypatch):
    from pallas_kernels import blocks

    monkeypatch.setattr(blocks, "GPU_MERGE_RELATIONS", {64: True, 128: True})
    students, teachers, weights = _qkv(rng, 2, 64, 64, heads=(9, 3, 3), dtype=jnp.bfloat16)

    def fwd_bwd(s):
        loss = lambda s: sum(
            kl.sum()
            for kl in pallas_kernels.self_relation_kl_multi(
                list(zip(s, teachers)), impl="pallas_gpu", interpret=True, merge=merge
            )
        )
        return jax.value_and_grad(loss)(s)

    counts = _count_kernels(fwd_bwd, students)
    assert counts == {"relation_kl_fwd": launches, "relation_kl_dleft": launches, "relation_kl_dright": launches}


def test_multi_general_groups(rng):
    """Cross relations with GQA ratios 1, 2 and 4 (right sides repeated to the gcd inside)
    and two head dims (one launch per head dim) match separate relation_kl calls."""
    B, T = 2, 33
    spec = [(4, 4, 16), (4, 2, 16), (8, 2, 16), (2, 1, 32), (2, 2, 32)]  # (H, Hr, D)
    groups, weights = [], []
    for H, Hr, D in spec:
        sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D)
        groups.append((sl, sr, tl, tr))
        weights.append(w)
    kw = dict(case_kwargs(rng, B, T, {"mask": True, "segments": True}), **_kw("pallas_gpu"))

    def loss(lefts, rights, merge):
        gs = [(a, b, g[2], g[3]) for a, b, g in zip(lefts, rights, groups)]
        kls = pallas_kernels.relation_kl_multi(gs, merge=merge, **kw)
        return sum(jnp.sum(w * kl) for w, kl in zip(weights, kls)), kls

    lefts, rights = [g[0] for g in groups], [g[1] for g in groups]
    vg = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
    (_, one), (dl1, dr1) = vg(lefts, rights, True)
    (_, sep), (dl3, dr3) = vg(lefts, rights, False)
    for i, (H, _, _) in enumerate(spec):
        assert one[i].shape == (B, H, T)
        assert rel_err(one[i], sep[i]) <= 1e-6
        assert rel_err(dl1[i], dl3[i]) <= 1e-5
        assert rel_err(dr1[i], dr3[i]) <= 1e-5
    counts = _count_kernels(lambda l, r: loss(l, r, True)[0], lefts, rights)
    assert counts == {"relation_kl_fwd": 2}  # D = 16 and D = 32


def test_multi_under_vmap_over_layers(rng):
    L, B, T, D = 2, 1, 24, 16
    students, teachers, weights = _qkv(rng, L * B, T, D)
    split = lambda x: x.reshape((L, B) + x.shape[1:])
    students, teachers, weights = [list(map(split, xs)) for xs in (students, teachers, weights)]

    def loss(s, merge):
        kls = jax.vmap(
            lambda s, t: pallas_kernels.self_relation_kl_multi(list(zip(s, t)), merge=merge, **_kw("pallas_gpu"))
        )(s, teachers)
        return sum(jnp.sum(w * kl) for w, kl in zip(weights, kls))

    g1 = jax.jit(jax.grad(lambda s: loss(s, True)))(students)
    g3 = jax.jit(jax.grad(lambda s: loss(s, False)))(students)
    for r in range(3):
        assert rel_err(g1[r], g3[r]) <= 1e-5
        for l in range(L):
            _, (r_l, r_r) = reference64(students[r][l], students[r][l], teachers[r][l], teachers[r][l], weights[r][l])
            assert rel_err(g1[r][l], r_l + r_r) <= 1e-4


def test_multi_bad_groups_raise():
    x = jnp.ones((2, 8, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match="groups"):
        pallas_kernels.relation_kl_multi([])
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        pallas_kernels.relation_kl_multi([(x, x, x, x), (x, x, x)])
    with pytest.raises(ValueError, match=r"groups\[1\].*batch or length"):
        y = jnp.ones((2, 9, 4, 16), jnp.float32)
        pallas_kernels.relation_kl_multi([(x, x, x, x), (y, y, y, y)])
    with pytest.raises(ValueError, match=r"groups\[0\].*t_left"):
        pallas_kernels.relation_kl_multi([(x, x, x[:, :, :2], x)])


# ------------------------------------------------------------------- remat ---


@pytest.mark.parametrize("impl", IMPLS)
def test_remat_policy_can_save_the_residuals(rng, impl):
    """Under jax.checkpoint, saving RESIDUALS_NAME (the two LSEs) leaves the backward's
    recomputed forward kernel without users (XLA drops it); saving nothing needs it.
    Gradients are those without remat."""
    from pallas_kernels.relation_kl import RESIDUALS_NAME

    sl, _, tl, _, w = make_inputs(rng, 1, 40, 2, 2, 16)
    layer = lambda x: jnp.sum(w * self_relation_kl(jnp.sin(x), tl, **_kw(impl)))
    save = jax.checkpoint_policies.save_only_these_names(RESIDUALS_NAME)

    def recomputed_forward_used(policy):
        jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(layer, policy=policy)))(sl).jaxpr
        (remat,) = [e for e in jaxpr.eqns if e.primitive.name in ("remat2", "checkpoint")]
        body = remat.params["jaxpr"]
        used = {id(v) for e in body.eqns for v in e.invars} | {id(v) for v in body.outvars}
        fwd = [e for e in body.eqns if e.primitive.name == "pallas_call" and "relation_kl_fwd" in str(e.params)]
        assert len(fwd) == 1
        return any(id(v) in used for v in fwd[0].outvars)

    if impl == "pallas_gpu":
        assert recomputed_forward_used(None)
        assert not recomputed_forward_used(save)
    g_save = jax.jit(jax.grad(jax.checkpoint(layer, policy=save)))(sl)
    g_plain = jax.jit(jax.grad(layer))(sl)
    assert rel_err(g_save, np.asarray(g_plain, np.float64)) <= 1e-6


# ------------------------------------------------------------ tuner configs ---


def _tuner_configs():
    from experiments.tune_relation_kl import all_tunable_configs

    return all_tunable_configs()


@pytest.mark.parametrize(
    "dclass,blocks_", _tuner_configs(), ids=[f"D{d}-{i}" for i, (d, _) in enumerate(_tuner_configs())]
)
def test_every_tuner_config_is_exact(rng, dclass, blocks_):
    """Every config experiments/tune_relation_kl.py may choose, in interpret mode, on a
    T that is a multiple of every block (the GPU's no-ids path: unmasked tiles, then the
    diagonal) and on a padded T with segments (every tile masked)."""
    for T, H, opts in ((256, 2, {}), (200, 1, {"segments": True})):
        sl, sr, tl, tr, w = make_inputs(rng, 1, T, H, 1, dclass)
        kw = case_kwargs(rng, 1, T, opts)
        kl, (d_sl, d_sr) = _kl_and_grads(
            sl, sr, tl, tr, w, impl="pallas_gpu", interpret=True, block_sizes=blocks_, **kw
        )
        ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w, **kw)
        assert_matches_reference(kl, (d_sl, d_sr), ref, (r_sl, r_sr), kw)


def test_tuner_dry_run(capsys):
    """The tuner imports without ml_collections and its plan validates every config."""
    from experiments import tune_relation_kl

    assert tune_relation_kl.main(["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "d64_b2_h3" in out and "key=(64, 'few')" in out and "d128_b1_h32" in out


# --------------------------------------------------------------- validation ---


def _bad_calls():
    f32 = lambda *s: jnp.ones(s, jnp.float32)
    x, r = f32(2, 8, 4, 16), f32(2, 8, 2, 16)
    ok = dict(s_left=x, s_right=r, t_left=x, t_right=r)
    return [
        ("s_left", dict(ok, s_left=f32(8, 4, 16))),
        ("s_right", dict(ok, s_right=f32(2, 8, 3, 16))),  # 4 % 3 != 0
        ("s_right", dict(ok, s_right=f32(2, 9, 2, 16))),  # T mismatch
        ("t_left", dict(ok, t_left=f32(2, 9, 4, 16))),  # teacher T
        ("t_right", dict(ok, t_right=r.astype(jnp.bfloat16))),  # teacher dtype
        ("t_left", dict(ok, t_left=f32(2, 8, 4, 32))),  # teacher D
        ("s_left", dict(ok, s_left=x.astype(jnp.int32))),  # dtype
        ("mask", dict(ok, mask=jnp.ones((2, 7), bool))),
        ("mask", dict(ok, mask=jnp.ones((2, 8), jnp.int32))),
        ("segment_ids", dict(ok, segment_ids=jnp.ones((2, 8), jnp.float32))),
        ("segment_ids", dict(ok, segment_ids=jnp.ones((8,), jnp.int32))),
        ("impl", dict(ok, impl="cuda")),
        ("scale", dict(ok, scale=-1.0)),
        ("block_sizes", dict(ok, block_sizes={"block_k": 12})),  # not a power of 2
        ("block_sizes", dict(ok, block_sizes={"block_q": 8})),  # < 16 on GPU
    ]


@pytest.mark.parametrize("arg,call", _bad_calls(), ids=[f"{a}{i}" for i, (a, _) in enumerate(_bad_calls())])
def test_bad_input_raises_before_tracing(arg, call, monkeypatch):
    from pallas_kernels import relation_kl_gpu, relation_kl_xla

    for mod in (relation_kl_gpu, relation_kl_xla):
        for fn in ("forward", "backward"):
            monkeypatch.setattr(mod, fn, lambda *a, **k: pytest.fail("kernel traced"))
    kw = dict(call)
    args = [kw.pop(k) for k in ("s_left", "s_right", "t_left", "t_right")]
    kw.setdefault("impl", "pallas_gpu")
    with pytest.raises(ValueError, match=arg):
        relation_kl(*args, interpret=True, **kw)


# ------------------------------------------------------- polynomial exp2 ---


def test_exp2_poly_matches_exp2_and_flushes_like_the_hardware():
    """_math.exp2_poly (FMA-only 2**x, BlockSizes.exp2_split) against float64 2**x: relative error
    about MUFU.EX2's on [-126, 8]; exactly 0 below -126 and at -inf (masked logits), never NaN."""
    from pallas_kernels import _math

    rng_ = np.random.default_rng(11)
    x = np.concatenate(
        [rng_.uniform(-126.0, 0.0, 100_000), rng_.uniform(-1.0, 8.0, 10_000), [0.0, -0.5, -1.5, -2.5, -125.5, -126.0]]
    )  # ties: round half even
    x = x.astype(np.float32)
    got = np.asarray(jax.jit(_math.exp2_poly)(jnp.asarray(x)), np.float64)
    want = np.exp2(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7
    low = jnp.asarray([-126.5, -200.0, -1e30, -np.inf], jnp.float32)
    assert np.all(np.asarray(_math.exp2_poly(low)) == 0.0)


def test_exp2_split_lowers_to_triton():
    """The polynomial exponentials use only what Pallas lowers to Triton IR (jnp.round and a
    bitcast of a constant do not lower; the interpreter would not notice)."""
    from pallas_kernels.blocks import BlockSizes

    x = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)

    def fwd_bwd(a, b):
        loss = lambda a: relation_kl(a, a, b, b, impl="pallas_gpu", block_sizes=BlockSizes(exp2_split=True)).sum()
        return jax.value_and_grad(loss)(a)

    lowered = jax.jit(fwd_bwd).trace(x, x).lower(lowering_platforms=("cuda",))
    calls = re.findall(r"custom_call @([\w$.]+)", lowered.as_text())
    assert len(calls) == 3 and all("triton" in c for c in calls), calls


@pytest.mark.parametrize("dclass", [64, 128])
def test_exp2_split_is_exact(rng, dclass):
    """The Triton kernels with the teacher's exponentials on the polynomial (interpret mode), as
    the tuner's configs are checked: values and gradients against the float64 reference, on the
    unmasked path and on a padded T with segments."""
    from pallas_kernels.blocks import BlockSizes

    for T, H, opts in ((256, 2, {}), (200, 1, {"segments": True})):
        sl, sr, tl, tr, w = make_inputs(rng, 1, T, H, 1, dclass)
        kw = case_kwargs(rng, 1, T, opts)
        kl, (d_sl, d_sr) = _kl_and_grads(
            sl, sr, tl, tr, w, impl="pallas_gpu", interpret=True, block_sizes=BlockSizes(exp2_split=True), **kw
        )
        ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w, **kw)
        assert_matches_reference(kl, (d_sl, d_sr), ref, (r_sl, r_sr), kw)


def test_fused_backward_lowers_to_triton():
    """The fused backward's atomic adds lower to Triton IR: a forward and one backward kernel."""
    from pallas_kernels.blocks import BlockSizes

    x = jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)

    def fwd_bwd(a, b, c, d):
        loss = lambda a, b: relation_kl(a, b, c, d, impl="pallas_gpu", block_sizes=BlockSizes(fused_bwd=True)).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(a, b)

    lowered = jax.jit(fwd_bwd).trace(x, r, x, r).lower(lowering_platforms=("cuda",))
    calls = re.findall(r"custom_call @([\w$.]+)", lowered.as_text())
    assert len(calls) == 2 and all("triton" in c for c in calls), calls


@pytest.mark.parametrize(
    "causal,H,Hr,T,opts",
    [(True, 2, 1, 256, {}), (True, 2, 2, 200, {"segments": True, "mask": True}), (False, 2, 1, 130, {})],
)
def test_fused_backward_is_exact(rng, causal, H, Hr, T, opts):
    """BlockSizes(fused_bwd=True): one backward kernel, d_left by atomic adds (interpret mode),
    against the float64 reference: causal and not, GQA and MHA, padded T with a mask and segments."""
    from pallas_kernels.blocks import BlockSizes

    sl, sr, tl, tr, w = make_inputs(rng, 2, T, H, Hr, 64)
    kw = {**case_kwargs(rng, 2, T, opts), "causal": causal}
    blocks = BlockSizes(fused_bwd=True, block_q_dk=32, block_k_dk=64)  # several programs add into each row
    kl, (d_sl, d_sr) = _kl_and_grads(sl, sr, tl, tr, w, impl="pallas_gpu", interpret=True, block_sizes=blocks, **kw)
    ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w, **kw)
    assert_matches_reference(kl, (d_sl, d_sr), ref, (r_sl, r_sr), kw)


# ------------------------------------------- Mosaic GPU forward (issue 24, in progress) ---


@pytest.mark.parametrize("causal,has_ids", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("H,Hr,D", [(4, 2, 64), (2, 2, 128)])
def test_mgpu_kernels_lower_to_mosaic_gpu(causal, has_ids, H, Hr, D):
    """The Mosaic GPU forward and backward lower for "cuda" here (TMA, barriers, wgmma,
    warpgroups), with and without ids. Pallas' interpreter cannot run their TMA copies, so their
    values are checked only on a GPU (experiments/check_relation_kl_mgpu.py)."""
    from pallas_kernels import relation_kl_mgpu

    x = jax.ShapeDtypeStruct((1, 256, H, D), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, 256, Hr, D), jnp.bfloat16)
    ids = (jax.ShapeDtypeStruct((1, 256), jnp.int32),) * 2 if has_ids else ()
    fwd = lambda a, b, c, d, *i: relation_kl_mgpu.mosaic_forward(a, b, c, d, *i, scale=D**-0.5, causal=causal)  # noqa: E731
    text = cuda_text(fwd, x, r, x, r, *ids)
    assert "mosaic_gpu" in text
    out = jax.eval_shape(fwd, x, r, x, r, *ids)
    assert [(o.shape, o.dtype) for o in out] == [((1, H, 256), jnp.float32)] * 3
    row = jax.ShapeDtypeStruct((1, H, 256), jnp.float32)
    bwd = lambda *a: relation_kl_mgpu.mosaic_backward(*a, scale=D**-0.5, causal=causal)  # noqa: E731
    text = cuda_text(bwd, x, r, x, r, row, row, row, *ids)
    assert text.count("mosaic_gpu") >= 2  # d_left and d_right
    d_sl, d_sr = jax.eval_shape(bwd, x, r, x, r, row, row, row, *ids)
    assert (d_sl.shape, d_sr.shape) == (x.shape, r.shape) and d_sl.dtype == d_sr.dtype == jnp.bfloat16
    # the one-kernel backward: d_left added by TMA reduce-adds into a float32 buffer aliased in and out
    fused = lambda *a: relation_kl_mgpu.mosaic_backward_fused(*a, scale=D**-0.5, causal=causal)  # noqa: E731
    text = cuda_text(fused, x, r, x, r, row, row, row, *ids)
    assert text.count("@mosaic_gpu") == 1 and "reduce.async.bulk" in text and "output_operand_alias" in text
    assert [(a.shape, a.dtype) for a in jax.eval_shape(fused, x, r, x, r, row, row, row, *ids)] == [
        (x.shape, jnp.bfloat16),
        (r.shape, jnp.bfloat16),
    ]


@pytest.mark.parametrize("causal,has_ids,D", [(True, True, 64), (False, False, 128)])
def test_mgpu_schedule_barrier_lowers(causal, has_ids, D):
    """BlockSizes.schedule_barrier (the compute warpgroups' ping-pong, FlashAttention-3's schedule
    barrier): the forward and the fused backward lower with it, to modules other than without it.
    Whether every warpgroup meets equally often (else the kernel hangs) is checked on a GPU
    (experiments/check_relation_kl_mgpu.py's *_sched variants)."""
    from pallas_kernels import relation_kl_mgpu

    x = jax.ShapeDtypeStruct((1, 256, 4, D), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, 256, 2, D), jnp.bfloat16)
    row = jax.ShapeDtypeStruct((1, 4, 256), jnp.float32)
    ids = (jax.ShapeDtypeStruct((1, 256), jnp.int32),) * 2 if has_ids else ()
    kw = dict(scale=D**-0.5, causal=causal)
    text = {}
    for sched in (True, False):
        fwd = functools.partial(relation_kl_mgpu.mosaic_forward, schedule_barrier=sched, **kw)
        bwd = functools.partial(relation_kl_mgpu.mosaic_backward_fused, schedule_barrier=sched, **kw)
        text[sched] = (cuda_text(fwd, x, r, x, r, *ids), cuda_text(bwd, x, r, x, r, row, row, row, *ids))
        assert all("mosaic_gpu" in t for t in text[sched])
    assert text[True][0] != text[False][0] and text[True][1] != text[False][1]


def test_check_script_variants_lower():
    """experiments/check_relation_kl_mgpu.py's ping-pong variants (both halves of the change, the
    backward alone, a 3-slot ring) build and lower for "cuda": the next GPU call times them."""
    from experiments import check_relation_kl_mgpu as check

    x = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    row = jax.ShapeDtypeStruct((1, 4, 256), jnp.float32)
    new = [
        v for v in check.VARIANTS if v[0] in ("fused_64x64_pair", "fused_64x64_sched_bwd", "fused_64x64_sched_ring3")
    ]
    assert len(new) == 3
    for variant in new:
        fwd, bwd = check.variant_kernels(variant, scale=0.125, causal=True)
        for fn, args in ((fwd, (x, r, x, r)), (bwd, (x, r, x, r, row, row, row))):
            assert "mosaic_gpu" in cuda_text(fn, *args)


def test_pallas_mgpu_impl_lowers_through_relation_kl():
    """impl "pallas_mgpu" behind relation_kl's custom_vjp: the merged Q/K/V call of one layer and its
    gradient lower for "cuda" to Mosaic GPU kernels (forward, d_left, d_right), none of them Triton."""
    x = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)

    def loss(q, k, v, tq, tk, tv):
        kls = pallas_kernels.self_relation_kl_multi([(q, tq), (k, tk), (v, tv)], impl="pallas_mgpu")
        return sum(kl.sum() for kl in kls)

    args = (x, kv, kv, x, kv, kv)
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3 and "triton" not in text.lower()
    # the default Mosaic blocks take the one-kernel backward (d_left by TMA reduce-add)
    assert pallas_kernels.blocks.MGPU_BLOCKS.fused_bwd and "reduce.async.bulk" in text


@pytest.mark.parametrize("T,masked", [(256, True), (200, False), (20, False)])  # packed + padding; padded lengths
def test_pallas_mgpu_impl_lowers_with_ids(T, masked):
    """Mask, segment ids and padding reach the Mosaic GPU kernels as relation_kl's ids (key j valid
    for row i iff the ids match); T is padded to a multiple of 2 x the blocks."""
    x = jax.ShapeDtypeStruct((2, T, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, T, 2, 64), jnp.bfloat16)
    kw = {}
    if masked:
        kw = dict(
            mask=jnp.arange(T)[None, :] < jnp.array([[T], [T - 37]]),
            segment_ids=(jnp.arange(T) // 90)[None].repeat(2, 0),
        )

    def loss(sl, sr, tl, tr):
        return relation_kl(sl, sr, tl, tr, impl="pallas_mgpu", **kw).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, kv, x, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3 and "triton" not in text.lower()


def test_pallas_mgpu_impl_names_what_it_cannot_take():
    def bad(T=256, dtype=jnp.bfloat16, D=64, **kw):
        a, b = jnp.ones((1, T, 4, D), dtype), jnp.ones((1, T, 2, D), dtype)
        with pytest.raises(ValueError) as e:
            relation_kl(a, b, a, b, impl="pallas_mgpu", **kw)
        return str(e.value)

    assert "bfloat16 or float16" in bad(dtype=jnp.float32)
    assert "interpret" in bad(interpret=True)
    assert "multiple of 64" in bad(D=32)
    assert "shared memory" in bad(D=256)
    assert "shared memory" in bad(D=128, block_sizes={"block_q": 128, "block_k": 128})
    # the one-kernel backward (the default) also stages dSᵀ and d_left: 64 x 128 at D 128 does not fit
    assert "fused_bwd=False" in bad(D=128, block_sizes={"block_k": 128})
    assert "block_q_dk x block_k_dk" in bad(block_sizes={"block_k_dq": 128, "block_k_dk": 64})
    # a backward of its own that does not fit is named as such (block_k_dk follows block_k_dq)
    assert "smaller block_q_dk / block_k_dk" in bad(block_sizes={"block_k_dq": 128})
    assert "pallas_gpu" in bad(interpret=True)  # names the kernel that can
    b = pallas_kernels.blocks.pick_blocks(
        {"block_k": 128}, "pallas_mgpu", 4096, 256, 32
    )  # the backward follows the forward's blocks
    assert (b.block_q, b.block_k, b.block_q_dq, b.block_k_dq, b.block_q_dk, b.block_k_dk) == (64, 128) * 3


def test_auto_picks_the_mosaic_kernel_only_on_hopper_at_head_dims_64_and_128_once_enabled(monkeypatch):
    import importlib
    from types import SimpleNamespace

    rkl = importlib.import_module("pallas_kernels.relation_kl")  # the module (the package exports the function)

    h200 = SimpleNamespace(platform="gpu", compute_capability="9.0")
    a100 = SimpleNamespace(platform="gpu", compute_capability="8.0")
    pick = lambda dtype=jnp.bfloat16, D=128, device=h200: rkl._resolve_impl("auto", dtype, D, device)  # noqa: E731
    assert pick() == "pallas_mgpu"  # on since the H200 ran relation_kl and a 7B step with it
    monkeypatch.setattr(rkl, "AUTO_PICKS_MGPU", False)
    assert pick() == "pallas_gpu"
    monkeypatch.setattr(rkl, "AUTO_PICKS_MGPU", True)
    assert pick(D=64) == "pallas_mgpu"  # since the H100 ran SmolLM2's step with it (ninth session)
    assert pick(D=32) == pick(dtype=jnp.float32) == pick(device=a100) == "pallas_gpu"
    assert pick(device=SimpleNamespace(platform="cpu")) == "xla"
    assert pick(D=96) == "pallas_gpu"  # padded to 128, but measured only at 128
    assert rkl._resolve_impl("auto", jnp.bfloat16, 128, h200, interpret=True) == "pallas_gpu"
    assert rkl._resolve_impl("auto", jnp.bfloat16, 128, h200, block_sizes={"block_q": 64}) == "pallas_gpu"
    assert rkl._resolve_impl("auto", jnp.bfloat16, 128, h200, block_sizes={}) == "pallas_mgpu"  # no overrides
    assert rkl._resolve_impl("pallas_gpu", jnp.bfloat16, 128, h200) == "pallas_gpu"  # explicit stays


def test_unscanned_layers_keep_the_triton_kernel_on_gpus(monkeypatch):
    """A per-layer step would compile one Mosaic GPU kernel per layer: "auto" there means Triton."""
    from lard_jax.methods import linearard

    assert linearard.kernel_impl_for("auto", scan_layers=False) == "auto"  # this CPU: auto picks xla
    monkeypatch.setattr(linearard.jax, "default_backend", lambda: "gpu")
    assert linearard.kernel_impl_for("auto", scan_layers=False) == "pallas_gpu"
    assert linearard.kernel_impl_for("auto", scan_layers=True) == "auto"
    assert linearard.kernel_impl_for("pallas_mgpu", scan_layers=False) == "pallas_mgpu"  # asked for


def test_mgpu_forward_names_what_it_cannot_take():
    from pallas_kernels import relation_kl_mgpu

    def bad(shape_l, shape_r, dtype=jnp.bfloat16, **kw):
        with pytest.raises(ValueError) as e:
            relation_kl_mgpu.check_shapes(jnp.zeros(shape_l, dtype), jnp.zeros(shape_r, dtype), **kw)
        return str(e.value)

    assert "bfloat16 or float16" in bad((1, 256, 2, 64), (1, 256, 2, 64), jnp.float32, block_q=64, block_kv=64)
    assert "head dim 96" in bad((1, 256, 2, 96), (1, 256, 2, 96), block_q=64, block_kv=64)
    assert "multiple of 2 * block_q" in bad((1, 192, 2, 64), (1, 192, 2, 64), block_q=64, block_kv=64)
    assert "2 * block_kv = 256" in bad((1, 384, 2, 64), (1, 384, 2, 64), block_q=64, block_kv=128)  # d_right's pairs
    assert "does not fit" in bad((1, 256, 4, 64), (1, 256, 3, 64), block_q=64, block_kv=64)
    assert "multiples of 64" in bad((1, 256, 2, 64), (1, 256, 2, 64), block_q=32, block_kv=64)
    relation_kl_mgpu.check_shapes(
        jnp.zeros((1, 256, 4, 64), jnp.bfloat16), jnp.zeros((1, 256, 2, 64), jnp.bfloat16), 64, 64
    )


def test_mgpu_check_summary_picks_the_fastest_exact_variant(capsys):
    """The device check's summary (experiments/check_relation_kl_mgpu.py): per case the fastest
    Mosaic variant that passed, as a ratio of the Triton and cuDNN times; failed variants and
    failed cases are left out of the ratios, not hidden."""
    from experiments import check_relation_kl_mgpu as check

    rows = [
        {
            "case": {"B": 1, "T": 4096, "H": 32, "H_right": 8, "D": 128, "causal": True},
            "ok": False,
            "ms": {"triton_fwd_bwd": 1.5, "cudnn_attention_fwd_bwd": 1.2},
            "variants": {
                "a": {"ok": True, "ms": {"fwd_bwd": 1.35}},
                "b": {"ok": False, "ms": {"fwd_bwd": 0.5}},  # faster but wrong: not counted
            },
        },
        {"case": [2, 1000, 4, 2, 64, True, "padded", None], "returncode": 1},
    ]
    lines = check.summarize(rows)
    assert lines[0]["best"] == "a" and lines[0]["vs_triton"] == pytest.approx(0.9)
    assert lines[0]["vs_cudnn"] == pytest.approx(1.125) and lines[0]["ok"] is False
    assert "best" not in lines[1] and lines[1]["ok"] is False
    check.print_summary(lines)
    printed = capsys.readouterr().out
    assert "B1 T4096 H32/8 D128 causal" in printed and "B2 T1000 H4/2 D64 causal padded" in printed
