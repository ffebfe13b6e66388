"""What the scanned, fused step computes and holds, against the loop (issue 22, part 3).

Matmul FLOPs are counted in the jaxpr of the loss's value_and_grad (JAX's own program before XLA:
every dot_general, scan bodies times their length, the larger branch of a cond, while bodies
once), so no XLA CSE or CPU-specific rewrite enters. Per added layer the scanned fused step runs
exactly what the Python loop's unfused step runs: the teacher's block once, the relation kernel's
forward once (its LSEs are saved by name, pallas_kernels.relation_kl.RESIDUALS_NAME). Until issue 22
the fused scan put the whole pair step (teacher block, student block, relation loss) under one
jax.checkpoint and reran the teacher's q/k/v and the relation forward in the backward (+10% per
layer at these shapes). The whole step adds only layer 0's q/k/v input gradients (a scan body
cannot drop them for its first iteration). Memory: XLA's compiled temp buffer on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from lard_jax import losses, trainer
from lard_jax.model import (
    LlamaConfig,
    LlamaForCausalLM,
    collect_qkv,
    init_params,
    stack_layers,
    stacked_qkv,
    unstack_layers,
)

T = 64
CFG = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=T,
    remat="full",
)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _dot_flops(jaxpr) -> int:
    total = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2 * int(np.prod(e.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
        elif e.primitive.name == "cond":
            total += max(_dot_flops(b.jaxpr) for b in e.params["branches"])
        else:
            times = e.params["length"] if e.primitive.name == "scan" else 1
            total += times * sum(_dot_flops(j) for j in _sub_jaxprs(e))
    return total


def _step(layers: int, layout: str, fused: bool, remat: str = "full"):
    """(value_and_grad of the linearard loss, its arguments) for a model of `layers` layers."""
    cfg = CFG.replace(num_hidden_layers=layers, remat=remat, scan_layers=layout == "scan")
    teacher = LlamaForCausalLM(cfg)
    student = LlamaForCausalLM(cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    _, params = init_params(cfg.replace(scan_layers=False), jax.random.PRNGKey(0))
    t = trainer.init_trainable(params, trainer.trainable_mask(params), trainer.LoraSpec(), jax.random.PRNGKey(1))
    if layout == "scan":
        params, t = stack_layers(params), stack_layers(t)
    loss = trainer.make_loss_fn(teacher, student, trainer.LossSpec(kernel_impl="xla", fused=fused), trainer.LoraSpec())
    ids = jax.random.randint(jax.random.PRNGKey(2), (1, T), 0, CFG.vocab_size)
    batch = {"input_ids": ids, "mask": jnp.arange(T)[None] < T - 5}  # padded, as the pipeline's batches
    fn = jax.value_and_grad(lambda t, p, b: loss(t, p, b, jax.random.PRNGKey(3)), has_aux=True)
    return fn, (t, params, batch)


def _flops(layers, layout, fused, remat="full"):
    fn, args = _step(layers, layout, fused, remat)
    return _dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("remat", ["full", "none"])
def test_fused_scan_runs_the_loops_matmuls(remat):
    qkv_dx = 2 * T * CFG.hidden_size * (CFG.num_attention_heads + 2 * CFG.num_key_value_heads) * CFG.head_dim
    loop = {n: _flops(n, "loop", False, remat) for n in (2, 3)}
    scan = {n: _flops(n, "scan", True, remat) for n in (2, 3)}
    assert scan[3] - scan[2] == loop[3] - loop[2]  # one more layer: the same matmuls
    for n in (2, 3):  # and at most layer 0's q/k/v input gradients more
        assert scan[n] <= loop[n] + qkv_dx, (n, scan[n] - loop[n], qkv_dx)
    assert _flops(3, "loop", True, remat) - _flops(2, "loop", True, remat) == loop[3] - loop[2]


def test_teacher_and_relation_forward_are_not_rerun():
    """The relation kernel's forward saves its LSEs under a name the fused step's policy keeps:
    the backward scan holds relation backward kernels only (no second forward, no teacher matmul)."""
    names = losses.kernel_residual_names("xla")
    fn, args = _step(3, "scan", True)
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    layer_scans = [e for e in jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == 2]
    scans = layer_scans[0], layer_scans[-1]  # layers 0-1 (the top one runs after): forward, transpose

    def named(j):
        return sum(
            (q.primitive.name == "name" and q.params.get("name") in names) + sum(named(s) for s in _sub_jaxprs(q))
            for q in j.eqns
        )

    forward, backward = (named(e.params["jaxpr"].jaxpr) for e in scans)
    if names:  # the forward kernel (which names its LSEs) runs in the forward scan only
        assert forward > 0 and backward == 0, (forward, backward)


def _temp_bytes(layers, layout, fused):
    fn, args = _step(layers, layout, fused)
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_scanned_steps_hold_no_more_than_the_loop():
    """XLA's temp buffer (CPU): the scanned steps, fused and unfused, hold less than the loop's
    unfused step (the unfused scan used to build the stacked q/k/v cotangents from L zero-padded
    full-size stacks: 2.2x the loop's)."""
    loop = _temp_bytes(6, "loop", False)
    assert _temp_bytes(6, "scan", True) <= loop
    assert _temp_bytes(6, "scan", False) <= loop


@pytest.mark.parametrize("layers", [None, (2, 0, 2)])
def test_stacked_relation_loss_equals_per_layer(layers):
    cfg = CFG.replace(scan_layers=True)
    _, params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim == 3 else x, params)  # relations far from uniform
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, CFG.vocab_size)
    mask = jnp.ones((2, 16), bool).at[1, 11:].set(False)

    def inter(model, p):
        return model.apply({"params": p}, ids, attention_mask=mask, mutable=["intermediates"])[1]["intermediates"]

    teacher = LlamaForCausalLM(cfg)
    student = LlamaForCausalLM(cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    kw = dict(mask=mask, layers=layers, impl="xla", normalize="per_relation_heads", relations=("q", "k"))

    def loss(p, frozen, stacked):
        s_inter, t_inter = inter(student, p), inter(teacher, frozen)
        if stacked:
            return losses.relation_loss(stacked_qkv(s_inter), stacked_qkv(t_inter), **kw)[0]
        return losses.relation_loss(collect_qkv(s_inter), collect_qkv(t_inter), **kw)[0]

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    ref, ref_g = grad(params, params, False)
    got, got_g = grad(params, params, True)
    assert float(ref) > 1e-3
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_g))
    for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale)
    loop_inter = jax.eval_shape(lambda: inter(LlamaForCausalLM(CFG), unstack_layers(params)))
    assert stacked_qkv(loop_inter) is None


def _barriers(fn, args) -> int:
    """optimization_barrier ops in the program XLA receives (JAX adds them when lowering a remat
    with prevent_cse=True; the jaxpr only carries the flag)."""
    return jax.jit(fn).lower(*args).as_text().count("optimization_barrier")


@pytest.mark.parametrize("fused", [False, True])
def test_the_loops_remat_keeps_its_cse_barrier_and_the_scans_drops_it(fused):
    """Outside a scan, remat needs JAX's CSE barrier (prevent_cse=True): without it XLA merged the
    backward's recomputation into the forward on an H200 (the loop layout ran 2 attention forwards
    per layer with remat "full", the scan 3; docs/bench_restore_step.md). Inside a scan it is not
    needed and only costs, so the scanned block goes without; the fused scan's top layer, which
    runs after the scan, keeps it."""
    for layers in (3, 4):
        assert _barriers(*_step(layers, "loop", fused)) == layers  # one per remat'd block
        assert _barriers(*_step(layers, "scan", fused)) == (1 if fused else 0)  # whatever the depth
    assert _barriers(*_step(3, "loop", fused, remat="none")) == 0
