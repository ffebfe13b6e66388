"""Scanned decoder (stacked parameters) and the fused relation loss (paired teacher/student pass).

* scan_layers=True computes the same function as the Python loop, with the same parameters stacked
  (model.stack_layers / unstack_layers convert; LoRA, masks, optimizer states, sharding too);
* losses.fused_relation_loss (trainer LossSpec(fused=True), the default) equals the unfused
  relation_loss on the same batch, value and gradients w.r.t. the trainable tree, float32: with and
  without LoRA (merged, and unmerged with dropout: the same per-layer dropout keys in both paths),
  GQA, a layer subset, remat (none, full, dots), both layouts. (What the fused scan computes and
  holds against the loop: tests/test_scan_cost.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lard_jax import generate, losses, sharding, trainer
from lard_jax.model import (
    LlamaForCausalLM,
    is_stacked,
    param_logical_axes,
    relation_inputs,
    stack_layers,
    unstack_layers,
)
from tests.fused_setup import CFG
from tests.fused_setup import loss_and_grads as _loss_and_grads
from tests.fused_setup import scaled_params as _params
from tests.fused_setup import setup as _setup


def _close(a, b, rtol=1e-5, atol=1e-6, what=""):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}"
        )


# ------------------------------------------------------------------------------------ layouts
def test_stack_unstack_roundtrip_and_init_layout():
    params = _params()
    stacked = stack_layers(params)
    assert is_stacked(stacked) and not is_stacked(params)
    assert "layers_0" not in stacked["model"] and stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (
        3,
        32,
        32,
    )
    scan_model = LlamaForCausalLM(CFG.replace(scan_layers=True))
    shapes = jax.eval_shape(lambda: scan_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(stacked)
    for a, b in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(stacked)):
        assert a.shape == b.shape
    back = unstack_layers(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    _close(back, params, rtol=0, atol=0)
    assert stack_layers(stacked) is not None and unstack_layers(params)["model"].keys() == params["model"].keys()
    # masks (Python bools) and optimizer states (namedtuples of dicts) convert too
    mask = trainer.trainable_mask(stacked)
    assert mask["model"]["layers"]["self_attn"]["q_proj"]["kernel"] is True
    assert unstack_layers(mask, num_layers=3) == trainer.trainable_mask(params)
    opt = optax.adamw(1e-3).init(trainer.select(params, trainer.trainable_mask(params)))
    opt_stacked = stack_layers(opt)
    assert opt_stacked[0].mu["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 32, 16)


def test_logical_axes_and_shardings_of_stacked_params():
    stacked = stack_layers(_params())
    axes = param_logical_axes(stacked)
    assert axes["model"]["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "q_heads")
    assert axes["model"]["layers"]["input_layernorm"]["weight"] == ("layers", "norm")
    assert axes["model"]["embed_tokens"]["embedding"] == ("vocab", "embed")
    mesh = sharding.make_mesh(2, 2, 2)
    shard = sharding.param_shardings(stacked, mesh)
    spec = shard["model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec
    assert spec[0] is None and tuple(spec[1:]) == ("fsdp", "tensor")
    # stacking per-layer arrays already on the mesh gives the same shardings
    flat = jax.device_put(unstack_layers(stacked), sharding.param_shardings(unstack_layers(stacked), mesh))
    restacked = stack_layers(flat)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(restacked), jax.tree_util.tree_leaves(shard)):
        assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
    _close(restacked, stacked, rtol=0, atol=0)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_loop_forward_and_generation(remat):
    params = _params()
    loop = LlamaForCausalLM(CFG.replace(remat=remat))
    scan = LlamaForCausalLM(CFG.replace(remat=remat, scan_layers=True))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
    mask = jnp.ones((2, 12), bool).at[1, 9:].set(False)
    a, la = relation_inputs(loop, params, ids, attention_mask=mask)
    b, lb = relation_inputs(scan, stack_layers(params), ids, attention_mask=mask)
    _close(a, b, rtol=1e-5, atol=1e-5, what="logits")
    _close(la, lb, rtol=1e-5, atol=1e-5, what="qkv")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    assert generate.greedy_generate(loop, params, prompts, 5, bucket=8) == generate.greedy_generate(
        scan, stack_layers(params), prompts, 5, bucket=8
    )


def test_lora_trainable_tree_in_both_layouts():
    params = _params()
    stacked = stack_layers(params)
    lora = trainer.LoraSpec(rank=4, alpha=8.0)
    per = trainer.init_trainable(params, trainer.trainable_mask(params), lora, jax.random.PRNGKey(3))
    stk = trainer.init_trainable(stacked, trainer.trainable_mask(stacked), lora, jax.random.PRNGKey(3))
    assert stk["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (3, 32, 4)
    _close(stk, stack_layers(per), rtol=0, atol=0, what="LoRA init")  # the same factors, stacked
    per = jax.tree_util.tree_map(lambda x: x + 0.01, per)  # nonzero B
    merged = trainer.merge_student(params, per, lora)
    merged_stk = trainer.merge_student(stacked, stack_layers(per), lora)
    _close(merged_stk, stack_layers(merged), rtol=1e-6, atol=1e-6, what="merge")
    full = trainer.init_trainable(
        stacked, trainer.trainable_mask(stacked, ("q_proj", "o_proj")), trainer.LoraSpec(), jax.random.PRNGKey(0)
    )
    assert set(full["model"]["layers"]["self_attn"]) == {"q_proj", "o_proj"}


# ------------------------------------------------------------------------------------ fused loss
@pytest.mark.parametrize(
    "layout,lora_kind,gqa,layers,remat",
    [
        ("scan", "none", True, None, "none"),
        ("scan", "merged", True, (0, 2), "full"),
        ("scan", "dropout", False, None, "full"),
        ("scan", "none", True, (1,), "none"),
        ("scan", "dropout", True, (0, 2), "dots"),
        ("loop", "dropout", True, (0, 2), "none"),
        ("loop", "merged", False, None, "full"),
    ],
)
def test_fused_equals_unfused(layout, lora_kind, gqa, layers, remat):
    teacher, student, params, lora, t, batch = _setup(layout, lora_kind, gqa, remat)
    spec = dict(kernel_impl="xla", layers=layers)
    ref_loss, ref_m, ref_g = _loss_and_grads(
        teacher, student, trainer.LossSpec(fused=False, **spec), lora, t, params, batch
    )
    loss, m, g = _loss_and_grads(teacher, student, trainer.LossSpec(fused=True, **spec), lora, t, params, batch)
    assert float(ref_loss) > 1e-3
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for k in ("relation_q", "relation_k", "relation_v"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-6, err_msg=k)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(t)
    gnorm = float(optax.global_norm(ref_g))
    assert gnorm > 1e-3
    _close(g, ref_g, rtol=1e-5, atol=1e-6 * gnorm, what="grad")


def test_fused_per_relation_heads_logit_term_and_repeated_layers():
    teacher, student, params, lora, t, batch = _setup("scan", "none")
    spec = dict(
        kernel_impl="xla", normalize="per_relation_heads", lambda_logit=0.5, layers=(2, 0, 2), relations=("k", "v")
    )
    ref, ref_m, ref_g = _loss_and_grads(teacher, student, trainer.LossSpec(fused=False, **spec), lora, t, params, batch)
    got, m, g = _loss_and_grads(teacher, student, trainer.LossSpec(fused=True, **spec), lora, t, params, batch)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    np.testing.assert_allclose(float(m["logit_kd"]), float(ref_m["logit_kd"]), rtol=1e-6)
    _close(g, ref_g, rtol=1e-5, atol=1e-6 * float(optax.global_norm(ref_g)), what="grad")


def test_scan_train_step_equals_loop_train_step():
    """One AdamW step in each layout (LoRA with dropout, fused loss): same loss, same update."""
    outs = {}
    for layout in ("loop", "scan"):
        teacher, student, params, lora, t, batch = _setup(layout, "dropout", remat="full")
        opt, sched = trainer.make_optimizer(lr=1e-2, warmup_steps=1, total_steps=4)
        state = trainer.TrainState(jnp.ones((), jnp.int32), t, opt.init(t), jax.random.PRNGKey(2))
        step = jax.jit(trainer.make_train_step(teacher, student, trainer.LossSpec(kernel_impl="xla"), lora, opt, sched))
        state, m = step(state, params, jax.tree_util.tree_map(lambda x: x[None], batch))
        outs[layout] = (float(m["loss"]), unstack_layers(state.trainable), state.opt_state)
    np.testing.assert_allclose(outs["scan"][0], outs["loop"][0], rtol=1e-6)
    _close(outs["scan"][1], outs["loop"][1], rtol=1e-5, atol=1e-7, what="trainable")
    _close(unstack_layers(outs["scan"][2]), outs["loop"][2], rtol=1e-4, atol=1e-9, what="opt_state")


def test_fused_loss_errors():
    teacher, student, params, lora, t, batch = _setup("scan", "none")
    s_params = trainer.student_params(params, t, lora)
    with pytest.raises(ValueError, match="relation"):
        losses.fused_relation_loss(
            teacher.config, student.config, params, s_params, batch["input_ids"], relations=("x",)
        )
    with pytest.raises(IndexError, match="layer 5"):
        losses.fused_relation_loss(teacher.config, student.config, params, s_params, batch["input_ids"], layers=(5,))


def test_checkpoint_of_either_layout_restores_and_export_is_per_layer(tmp_path):
    """An orbax checkpoint written in the per-layer layout resumes a stacked run (and back);
    export slices only the trained tensors out of the stacked tree."""
    import orbax.checkpoint as ocp

    teacher, student, params, lora, t, batch = _setup("loop", "merged")
    opt = optax.adamw(1e-3)
    per = {"step": jnp.ones((), jnp.int32), "trainable": t, "opt_state": opt.init(t), "rng": jax.random.PRNGKey(0)}
    per = jax.tree_util.tree_map(lambda x: x + 1 if x.dtype == jnp.float32 else x, per)  # nonzero moments
    stacked = stack_layers(per)
    for saved, target in ((per, stacked), (stacked, per)):
        d = tmp_path / ("a" if saved is per else "b")
        with ocp.CheckpointManager(str(d)) as mgr:
            mgr.save(1, args=ocp.args.StandardSave(saved))
            mgr.wait_until_finished()
        with ocp.CheckpointManager(str(d)) as mgr:
            got = trainer.restore_any_layout(
                lambda a: mgr.restore(1, args=ocp.args.StandardRestore(a)),
                jax.tree_util.tree_map(jnp.zeros_like, target),
            )
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(target)
        _close(got, target, rtol=0, atol=0, what="restored")
    s_params = stack_layers(trainer.merge_student(params, t, lora))
    mask = trainer.trainable_mask(s_params)
    exp, exp_mask = trainer.per_layer_for_export(s_params, mask, CFG.num_hidden_layers)
    assert set(exp["model"]) == {"layers_0", "layers_1", "layers_2"} and "mlp" not in exp["model"]["layers_0"]
    assert exp_mask == trainer.trainable_mask(unstack_layers(s_params))
    _close(exp, trainer.select(unstack_layers(s_params), exp_mask), rtol=0, atol=0)
