"""experiments/hlo_cost.py: matmul FLOPs and data movement of compiled programs of known cost,
loops counted by their trip counts (XLA's cost_analysis counts a while body once)."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import hlo_cost


def _scan_matmuls(w, x):
    def body(h, wl):
        return jnp.tanh(h @ wl), None

    h, _ = jax.lax.scan(body, x, w)
    return h.sum()


def _loop_matmuls(w, x):
    for i in range(w.shape[0]):
        x = jnp.tanh(x @ w[i])
    return x.sum()


def test_scan_and_loop_count_the_same_matmuls_forward_and_backward():
    rng = np.random.default_rng(0)
    layers, n, d, e = 5, 32, 48, 48
    w = jnp.asarray(rng.normal(size=(layers, d, e)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    one = 2 * n * d * e
    for fn in (_scan_matmuls, _loop_matmuls):
        assert hlo_cost.of_compiled(jax.jit(fn).lower(w, x).compile()).dot_flops == layers * one
        # backward: the input gradient of every layer but the first, the weight gradient of every layer
        cost = hlo_cost.of_compiled(jax.jit(jax.grad(fn)).lower(w, x).compile())
        # forward, weight gradients, input gradients: the loop skips layer 0's (x is not differentiated),
        # the scan's uniform body computes it anyway -- the boundary cost of a scanned model
        want = 3 * layers if fn is _scan_matmuls else 3 * layers - 1
        assert cost.dot_flops == want * one
        assert cost.unknown_trip_counts == 0


def test_dot_flops_of_a_batched_contraction_and_bytes_of_a_transpose():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(3, 16, 24)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 24, 40)), jnp.float32)
    cost = hlo_cost.of_compiled(jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)).lower(a, b).compile())
    assert cost.dot_flops == 2 * 3 * 16 * 40 * 24
    assert sum(cost.by_op_name.values()) == cost.dot_flops
    moved = hlo_cost.analyze(
        """HloModule m

ENTRY %main (p: f32[64,32]) -> f32[32,64] {
  %p = f32[64,32]{1,0} parameter(0)
  ROOT %t = f32[32,64]{1,0} transpose(%p), dimensions={1,0}
}
"""
    )
    assert moved.moved_bytes["transpose"] == 32 * 64 * 4 and moved.dot_flops == 0


def test_a_move_inside_a_fusion_is_not_counted_unless_it_is_the_root():
    hlo = """HloModule m

%fused_add (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %t = f32[8,16]{0,1} copy(%a)
  ROOT %s = f32[8,16]{1,0} add(%t, %t)
}

%fused_copy (b: f32[8,16]) -> f32[16,8] {
  %b = f32[8,16]{1,0} parameter(0)
  ROOT %c = f32[16,8]{1,0} transpose(%b), dimensions={1,0}
}

ENTRY %main (p: f32[8,16]) -> f32[16,8] {
  %p = f32[8,16]{1,0} parameter(0)
  %f = f32[8,16]{1,0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %g = f32[16,8]{1,0} fusion(%f), kind=kLoop, calls=%fused_copy
}
"""
    cost = hlo_cost.analyze(hlo)
    assert dict(cost.moved_bytes) == {"transpose": 8 * 16 * 4}


def test_a_dynamic_update_slice_moves_its_update_not_the_buffer():
    hlo = """HloModule m

ENTRY %main (buf: f32[32,64,64], upd: f32[1,64,64], i: s32[]) -> f32[32,64,64] {
  %buf = f32[32,64,64]{2,1,0} parameter(0)
  %upd = f32[1,64,64]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = f32[32,64,64]{2,1,0} dynamic-update-slice(%buf, %upd, %i, %z, %z)
}
"""
    assert dict(hlo_cost.analyze(hlo).moved_bytes) == {"dynamic-update-slice": 64 * 64 * 4}


def test_gpu_forms_tuple_fusions_cublas_gemms_inline_operand_types_and_conditionals():
    hlo = """HloModule m

%fused_pair (a: f32[8,16]) -> (f32[16,8], f32[8,16]) {
  %a = f32[8,16]{1,0} parameter(0)
  %t = f32[16,8]{1,0} transpose(f32[8,16]{1,0} %a), dimensions={1,0}
  %n = f32[8,16]{1,0} negate(%a)
  ROOT %tup = (f32[16,8]{1,0}, f32[8,16]{1,0}) tuple(%t, %n)
}

%yes (y: f32[8,16]) -> f32[8,8] {
  %y = f32[8,16]{1,0} parameter(0)
  ROOT %d = f32[8,8]{1,0} dot(f32[8,16]{1,0} %y, f32[8,16]{1,0} %y), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%no (z: f32[8,16]) -> f32[8,8] {
  %z = f32[8,16]{1,0} parameter(0)
  ROOT %c = f32[8,8]{1,0} constant(0)
}

ENTRY %main (p: f32[8,16], w: f32[16,32], b: pred[]) -> f32[8,32] {
  %p = f32[8,16]{1,0} parameter(0)
  %w = f32[16,32]{1,0} parameter(1)
  %b = pred[] parameter(2)
  %f = (f32[16,8]{1,0}, f32[8,16]{1,0}) fusion(%p), kind=kLoop, calls=%fused_pair
  %g = (f32[8,32]{1,0}, s8[1024]{0}) custom-call(%p, %w), custom_call_target="__cublas$gemm", GEMM_CONFIG
  %k = f32[8,32]{1,0} custom-call(%p, %w), custom_call_target="__cudnn$fmhaSoftmax"
  %c = f32[8,8]{1,0} conditional(%b, %p, %p), true_computation=%yes, false_computation=%no
  ROOT %r = f32[8,32]{1,0} get-tuple-element(%g), index=0
}
"""
    dims = '"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
    dims += '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]'
    cost = hlo_cost.analyze(
        hlo.replace("GEMM_CONFIG", 'backend_config={"gemm_backend_config":{"dot_dimension_numbers":{' + dims + "}}}")
    )
    assert cost.dot_flops == 2 * 8 * 32 * 16 + 2 * 8 * 8 * 16  # the cuBLAS gemm and the true branch's dot
    assert not cost.moved_bytes  # the transpose inside a multi-output fusion is fused
    assert dict(cost.opaque_custom_calls) == {"__cudnn$fmhaSoftmax": 1}
