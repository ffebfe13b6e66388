"""lard_jax.layer_scan: a layer scan whose backward emits per-layer weight gradients in the compute
dtype (issue 22 part 3), against JAX's own scan transpose.

* the generic function: value and gradients equal to lax.scan differentiated by JAX, for float32
  and bfloat16 views, the stacks' gradient zero above `length`; the forward keeps no parameter
  slice and no loop constant per layer (the residuals it stacks are activations only); perturbed
  `consts` or `plain` are refused;
* paired_decoder (the fused relation loss) with a bfloat16 compute dtype and float32 trainable
  projections: loss and gradients bit-equal between scan_grads "compute_dtype" and "jax", with
  remat dots_no_batch / full / none, LoRA merged and with dropout, a layer subset.
(The memory this saves on Llama-2-7B: experiments/compile_offline.py, docs/bench_restore_step.md.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lard_jax import trainer
from lard_jax.layer_scan import layer_scan
from lard_jax.model import LlamaConfig, LlamaForCausalLM
from tests.fused_setup import loss_and_grads, setup

L, D, B, N = 5, 16, 8, 3  # stacked layers, width, batch, layers run

KEYS = jax.random.split(jax.random.PRNGKey(11), 6)
W = jax.random.normal(KEYS[0], (L, D, D)) * 0.3  # trained, float32
F = jax.random.normal(KEYS[1], (L, D, D)) * 0.3  # frozen
T = jax.random.normal(KEYS[2], (L, D, D)) * 0.3  # the never-differentiated stream's
X0 = jax.random.normal(KEYS[3], (B, D))
C = jax.random.normal(KEYS[4], (D,))
COUNTS = jnp.array([1.0, 2.0, 0.5])


def _layer(w, f, t, c, plain, diff, x, dtype):
    """A layer shaped like paired_decoder's: a plain stream, a differentiated stream under a
    checkpoint policy, and a running loss sum in the differentiated carry."""
    tx = jnp.tanh(plain @ t.astype(dtype)).astype(jnp.float32)
    sx, acc = diff

    def block(w, f, sx):
        h = jnp.tanh((sx * c).astype(dtype) @ w.astype(dtype)).astype(jnp.float32)
        return jnp.sin(h) @ f

    h = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)(w, f, sx)
    return tx, (h, acc + x * jnp.sum((h - tx) ** 2))


def _reference(w_stack, dtype):
    def body(carry, ix):
        i, x = ix
        return _layer(w_stack[i], F[i], T[i], C, *carry, x, dtype), None

    (_, (h, acc)), _ = jax.lax.scan(body, (X0, (X0, jnp.float32(0))), (jnp.arange(N), COUNTS))
    return acc + jnp.sum(h)


def _layer_scan(w_stack, dtype, c=C, x0=X0, t_stack=T, f_stack=F, scale=None):
    def step(layer, c, plain, diff, x):
        (t,), trained = layer
        if scale is not None:  # a traced value the step closes over (as the model's layer_fn does)
            x = x * scale
        return _layer(trained["w"], trained["f"], t, c, plain, diff, x, dtype)

    _, (h, acc) = layer_scan(
        step,
        ((t_stack,), {"w": w_stack, "f": f_stack}),  # (plain_stacks, diff_stacks)
        c,
        x0,
        (X0, jnp.float32(0)),
        COUNTS,
        length=N,
        view=lambda path, a: a if getattr(path[-1], "key", "") == "f" else a.astype(dtype),  # the layer's casts
    )
    return acc + jnp.sum(h)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_equals_jax_scan_transpose(dtype):
    ref, ref_g = jax.jit(jax.value_and_grad(_reference), static_argnums=1)(W, dtype)
    val, g = jax.jit(jax.value_and_grad(_layer_scan), static_argnums=1)(W, dtype)
    assert float(np.abs(np.asarray(ref_g)).max()) > 1e-2
    np.testing.assert_array_equal(np.asarray(val), np.asarray(ref))
    assert g.dtype == W.dtype and g.shape == W.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(ref_g))
    assert not np.asarray(g[N:]).any()  # layers above `length` get no gradient


def _scans(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _scans(inner)


def test_forward_keeps_activations_only_and_backward_emits_compute_dtype():
    jaxpr = jax.make_jaxpr(jax.grad(_layer_scan), static_argnums=1)(W, jnp.bfloat16).jaxpr
    fwd, bwd = list(_scans(jaxpr))
    stacked = [v.aval for v in fwd.outvars if v.aval.ndim >= 2 and v.aval.shape[0] == N]
    assert stacked, "the forward stacks the residuals of its layers"
    # per layer: the block's input, its saved matmul output, the plain stream's output; no [D, D]
    # parameter slice (trained, frozen or plain) and no [D] constant
    assert all(a.shape[1:] == (B, D) for a in stacked), stacked
    # the backward scan's per-layer weight gradients are bfloat16 [N, D, D]
    grads = [v.aval for v in bwd.outvars if v.aval.shape == (N, D, D)]
    assert [str(a.dtype) for a in grads] == ["bfloat16"]


def test_refuses_gradients_it_does_not_compute():
    with pytest.raises(NotImplementedError, match="consts"):
        jax.grad(lambda c: _layer_scan(W, jnp.float32, c=c))(C)
    with pytest.raises(NotImplementedError, match="plain` carry"):
        jax.grad(lambda x0: _layer_scan(W, jnp.float32, x0=x0))(X0)
    with pytest.raises(NotImplementedError, match="plain_stacks"):  # its gradient would be lost
        jax.grad(lambda t: _layer_scan(W, jnp.float32, t_stack=t))(T)
    with pytest.raises(NotImplementedError, match="closes over"):
        jax.grad(lambda s: _layer_scan(W, jnp.float32, scale=s))(jnp.float32(2.0))


def _micro_batches(loss):
    """Micro-batch losses summed by a lax.scan, the gradient taken outside it."""

    def total(w):
        return jax.lax.scan(lambda acc, s: (acc + loss(w, s), None), 0.0, jnp.array([1.0, 0.5]))[0]

    return total


@pytest.mark.parametrize("transform", ["jit_grad_checkpoint", "grad_jit", "grad_outside_scan"])
def test_under_enclosing_traces(transform):
    """Values the step closes over that are tracers of an enclosing trace (here a scale computed
    under jit / inside a scan) are hoisted, not leaked: the same gradients as JAX's transpose."""
    dtype = jnp.bfloat16

    def make(fn):
        def loss(w, s=jnp.float32(1.0)):
            return fn(w, dtype, scale=s * 1.5) if fn is _layer_scan else fn(w, dtype, s * 1.5)

        return loss

    def ref_with_scale(w, dtype, scale):
        def body(carry, ix):
            i, x = ix
            return _layer(w[i], F[i], T[i], C, *carry, x * scale, dtype), None

        (_, (h, acc)), _ = jax.lax.scan(body, (X0, (X0, jnp.float32(0))), (jnp.arange(N), COUNTS))
        return acc + jnp.sum(h)

    outs = []
    for fn in (ref_with_scale, _layer_scan):
        loss = make(fn)
        if transform == "jit_grad_checkpoint":
            g = jax.jit(jax.grad(jax.checkpoint(lambda w, loss=loss: loss(w, jnp.float32(1.0)))))(W)
        elif transform == "grad_jit":
            g = jax.grad(jax.jit(lambda w, loss=loss: loss(w, jnp.float32(1.0))))(W)
        else:
            g = jax.jit(jax.grad(_micro_batches(loss)))(W)
        outs.append(np.asarray(g))
    assert np.abs(outs[0]).max() > 1e-2
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())


# ------------------------------------------------------------------ the fused loss (paired_decoder)
@pytest.mark.parametrize(
    "lora_kind,remat,layers",
    [("none", "dots_no_batch", None), ("merged", "full", (0, 2)), ("dropout", "none", None)],
)
def test_fused_loss_bf16_gradients_equal_jax_transpose(lora_kind, remat, layers):
    teacher, student, params, lora, t, batch = setup("scan", lora_kind, True, remat)
    out = {}
    for scan_grads in ("jax", "compute_dtype"):
        te = LlamaForCausalLM(teacher.config.replace(dtype="bfloat16", scan_grads=scan_grads))
        st = LlamaForCausalLM(student.config.replace(dtype="bfloat16", scan_grads=scan_grads))
        spec = trainer.LossSpec(fused=True, kernel_impl="xla", layers=layers)
        out[scan_grads] = loss_and_grads(te, st, spec, lora, t, params, batch)
    (ref_loss, _, ref_g), (loss, _, g) = out["jax"], out["compute_dtype"]
    assert float(ref_loss) > 1e-3
    assert float(loss) == float(ref_loss)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(ref_g)):
        assert a.dtype == b.dtype == jnp.float32, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert any(np.abs(np.asarray(b)).max() > 1e-4 for b in jax.tree_util.tree_leaves(ref_g))


def test_fused_loss_under_checkpoint():
    """The relation loss closes over values derived from the batch (its mask): under jit of grad of
    checkpoint they are hoisted, and the gradients equal JAX's transpose's (grad of jit and a
    gradient outside a micro-batch scan: test_under_enclosing_traces)."""
    teacher, student, params, lora, t, batch = setup("scan", "none", True, "dots_no_batch")
    grads = {}
    for scan_grads in ("jax", "compute_dtype"):
        te = LlamaForCausalLM(teacher.config.replace(dtype="bfloat16", scan_grads=scan_grads))
        st = LlamaForCausalLM(student.config.replace(dtype="bfloat16", scan_grads=scan_grads))
        fn = trainer.make_loss_fn(te, st, trainer.LossSpec(fused=True, kernel_impl="xla"), lora)
        loss = lambda t, b, fn=fn: fn(t, params, b, jax.random.PRNGKey(9))[0]  # noqa: E731
        grads[scan_grads] = jax.jit(jax.grad(jax.checkpoint(loss)))(t, batch)
    for a, b in zip(jax.tree_util.tree_leaves(grads["compute_dtype"]), jax.tree_util.tree_leaves(grads["jax"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(np.asarray(b)).max()) for b in jax.tree_util.tree_leaves(grads["jax"])) > 1e-4


def test_unknown_scan_grads_is_refused():
    with pytest.raises(ValueError, match="scan_grads"):
        LlamaConfig(scan_grads="bf16")
