"""Sharding declared with the parameters, rules from the config, activation constraints.

* param_logical_axes, now read off the axes each parameter declares where lard_jax.model creates
  it, gives every parameter the axes the old name table gave (hard-coded below): per-layer and
  stacked layouts, all optional biases, tied embeddings, LoRA factors, ShapeDtypeStructs, sub-trees;
  `init` still returns plain arrays;
* sharding.rules_from_config: DEFAULT_RULES by default, single entries replaced, clear errors;
* inside sharding.use_mesh on 8 fake CPU devices (data / fsdp / tensor / mixed meshes, and rules
  that shard the sequence and the hidden features) the hidden states carry the constraints, and the
  forward (jitted and eager), the fused paired decoder (value and gradients) and KV-cache generation
  equal the single-device results; outside use_mesh no constraint is emitted.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from lard_jax import generate, losses, sharding
from lard_jax import trainable as trainable_lib
from lard_jax.model import (
    HIDDEN_AXES,
    LlamaConfig,
    LlamaForCausalLM,
    collect_hidden,
    declared_axes,
    init_params,
    param_logical_axes,
    stack_layers,
)

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
VARIANTS = {
    "plain": {},
    "all_biases": {"attention_bias": True, "mlp_bias": True},
    "qkv_bias_tied": {"qkv_bias": True, "tie_word_embeddings": True},
}
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]

# lard_jax.model.PARAM_LOGICAL_AXES as it was before the axes moved to where parameters are created
OLD_TABLE = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("q_proj", "kernel"): ("embed", "q_heads"),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("o_proj", "kernel"): ("q_heads", "embed"),
    ("q_proj", "bias"): ("q_heads",),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "bias"): ("embed",),
    ("input_layernorm", "weight"): ("norm",),
    ("post_attention_layernorm", "weight"): ("norm",),
    ("norm", "weight"): ("norm",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


def old_logical_axes(params):
    """The old lookup, as it was: by the last two path names, "layers" in front of stacked leaves."""

    def axes(path, leaf):
        names = tuple(getattr(p, "key", str(p)) for p in path)
        if names[-2:] in OLD_TABLE:
            out = OLD_TABLE[names[-2:]]
            return ("layers",) + out if "layers" in names and np.ndim(leaf) == len(out) + 1 else out
        if names[-1] in ("lora_a", "lora_b"):
            return (None,) * np.ndim(leaf)
        raise KeyError("/".join(names))

    return jax.tree_util.tree_map_with_path(axes, params)


def _params(cfg=CFG, seed=0, stacked=False):
    _, params = init_params(cfg, jax.random.PRNGKey(seed))
    return stack_layers(params) if stacked else params


def _lora_student(params, rank=2):
    """The student tree with unmerged LoRA factors next to q/k/v/o kernels (LoRA dropout > 0)."""
    lora = trainable_lib.LoraSpec(rank=rank, alpha=4.0, dropout=0.1)
    mask = trainable_lib.trainable_mask(params, trainable_lib.PROJECTION_SETS["qkvo"])
    trainable = trainable_lib.init_trainable(params, mask, lora, jax.random.PRNGKey(7))
    return trainable, trainable_lib.student_params(params, trainable, lora)


# ------------------------------------------------------------------------------ parameter axes
@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer", "stacked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_axes_equal_the_old_table(variant, stacked):
    cfg = CFG.replace(**VARIANTS[variant])
    params = _params(cfg, stacked=stacked)
    assert param_logical_axes(params) == old_logical_axes(params)
    shapes = jax.eval_shape(
        lambda: LlamaForCausalLM(cfg.replace(scan_layers=stacked)).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), int))
    )["params"]
    assert param_logical_axes(shapes) == old_logical_axes(params)
    trainable, student = _lora_student(params)
    assert param_logical_axes(student) == old_logical_axes(student)
    assert param_logical_axes(trainable) == old_logical_axes(trainable)
    mask = trainable_lib.trainable_mask(params)
    selected = trainable_lib.select(params, mask)  # a sparse sub-tree: the trainable projections
    assert param_logical_axes(selected) == old_logical_axes(selected)
    layer = "layers" if stacked else "layers_2"
    sub = params["model"][layer]["self_attn"]  # a sub-tree below the model's root
    want = ("layers",) * stacked + ("embed", "kv_heads")
    assert param_logical_axes(sub)["k_proj"]["kernel"] == want


def test_explicit_axes_and_unknown_parameters():
    stacked = _params(CFG.replace(attention_bias=True), stacked=True)
    axes = param_logical_axes(stacked)
    assert axes["model"]["layers"]["self_attn"]["o_proj"]["kernel"] == ("layers", "q_heads", "embed")
    assert axes["model"]["layers"]["self_attn"]["o_proj"]["bias"] == ("layers", "embed")
    assert axes["model"]["layers"]["post_attention_layernorm"]["weight"] == ("layers", "norm")
    assert axes["model"]["norm"]["weight"] == ("norm",) and axes["lm_head"]["kernel"] == ("embed", "vocab")
    per_layer = param_logical_axes(_params())
    assert per_layer["model"]["layers_1"]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
    with pytest.raises(KeyError, match="model/layers_0/self_attn/rotary/kernel"):
        param_logical_axes({"model": {"layers_0": {"self_attn": {"rotary": {"kernel": jnp.ones((2, 2))}}}}})


def test_init_returns_plain_arrays_and_every_axis_has_a_rule():
    for scan in (False, True):
        variables = LlamaForCausalLM(CFG.replace(scan_layers=scan)).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), int))
        leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
        assert all(isinstance(x, jax.Array) for x in leaves)
    names = {a for axes in declared_axes().values() for a in axes} | set(HIDDEN_AXES)
    assert names <= {name for name, _ in sharding.DEFAULT_RULES}


def test_param_shardings_follow_the_rules():
    params = _params(stacked=True)
    mesh = sharding.make_mesh(2, 2, 2)
    default = sharding.param_shardings(params, mesh)
    assert default["model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    rules = sharding.rules_from_config({"rules": (("embed", None), ("mlp", ("fsdp", "tensor")))})
    custom = sharding.param_shardings(params, mesh, rules)
    assert custom["model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, None, "tensor")
    assert custom["model"]["layers"]["mlp"]["up_proj"]["kernel"].spec == P(None, None, ("fsdp", "tensor"))


# ------------------------------------------------------------------------------ rules from the config
def test_rules_from_config_defaults_and_overrides():
    assert sharding.rules_from_config(base.get_config().mesh) == sharding.DEFAULT_RULES
    assert sharding.rules_from_config({}) == sharding.DEFAULT_RULES
    rules = dict(
        sharding.rules_from_config({"rules": (("embed", None), ("length", ["fsdp"]), ("mlp", ["data", "tensor"]))})
    )
    assert rules["embed"] is None and rules["length"] == "fsdp" and rules["mlp"] == ("data", "tensor")
    assert rules["vocab"] == "tensor"  # untouched names keep their default
    assert dict(sharding.rules_from_config({"rules": {"q_heads": None}}))["q_heads"] is None


@pytest.mark.parametrize(
    "rules, match",
    [
        ((("heads", "tensor"),), r"unknown logical axis 'heads'; known: batch, vocab, embed, q_heads"),
        (
            (("embed", "model"),),
            r"config.mesh.rules\['embed'\]: unknown mesh axis 'model'; mesh axes: data, fsdp, tensor",
        ),
        ((("mlp", ("tensor", "expert")),), r"unknown mesh axis 'expert'"),
        ((("mlp", ("tensor", "tensor")),), r"each mesh axis once"),
        ((("embed", None), ("embed", "fsdp")), r"'embed' is given twice"),
        (("embed",), r"not a \(logical axis, mesh axes\) pair.*logical axes: batch.*activation_embed"),
    ],
)
def test_rules_from_config_errors(rules, match):
    with pytest.raises(ValueError, match=match):
        sharding.rules_from_config({"rules": rules})


# ------------------------------------------------------------------------------ activation constraints
def _ids(seed, shape=(8, 12)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, CFG.vocab_size)


def _forward(model):
    return jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask, mutable=["intermediates"]))


@functools.cache
def _one_device_forward(stacked):
    """The model, parameters, batch and single-device logits of test_forward_on_a_mesh_equals_one_device:
    the same for every mesh, so compiled once per layout (and checked to carry no constraint)."""
    cfg = CFG.replace(scan_layers=stacked, remat="full" if stacked else "none")
    params, model = _params(stacked=stacked), LlamaForCausalLM(cfg)
    ids, mask = _ids(1), jnp.ones((8, 12), bool).at[3, 9:].set(False)
    fn = _forward(model)
    assert "sharding_constraint" not in fn.lower(params, ids, mask).as_text()
    want, _ = fn(params, ids, mask)
    return model, params, ids, mask, np.asarray(want)


@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer", "stacked"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_forward_on_a_mesh_equals_one_device(mesh_shape, stacked):
    model, params, ids, mask, want = _one_device_forward(stacked)
    mesh = sharding.make_mesh(*mesh_shape)
    placed = jax.device_put(params, sharding.param_shardings(params, mesh))
    with sharding.use_mesh(mesh):
        fn = _forward(model)
        assert "sharding_constraint" in fn.lower(placed, ids, mask).as_text()
        got, state = fn(placed, jax.device_put(ids, sharding.batch_sharding(mesh)), mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # the hidden states between blocks come out with the constrained sharding (stacked: layers in front)
    spec = sharding.logical_to_spec(HIDDEN_AXES, (8, 12, CFG.hidden_size), mesh)
    inter = state["intermediates"]
    hidden, spec = (
        (inter["model"]["layers"]["hidden"][0], P(None, *spec)) if stacked else (collect_hidden(inter)[1], spec)
    )
    assert hidden.sharding.is_equivalent_to(NamedSharding(mesh, spec), hidden.ndim), (hidden.sharding, spec)


def test_rules_that_shard_sequence_and_features():
    """Sequence over fsdp, hidden features over tensor: real resharding between blocks, same numbers."""
    params, model = _params(stacked=True), LlamaForCausalLM(CFG.replace(scan_layers=True))
    ids, mask = _ids(2), jnp.ones((8, 12), bool)
    want, _ = _forward(model)(params, ids, mask)
    mesh = sharding.make_mesh(2, 2, 2)
    rules = sharding.rules_from_config(
        {"rules": (("batch", "data"), ("length", "fsdp"), ("activation_embed", "tensor"))}
    )
    placed = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
    with sharding.use_mesh(mesh, rules):
        got, state = _forward(model)(placed, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert state["intermediates"]["model"]["layers"]["hidden"][0].sharding.spec == P(None, "data", "fsdp", "tensor")


def test_eager_apply_inside_use_mesh():
    """Concrete values pass the constraints untouched: eager code may run inside use_mesh."""
    params, model = _params(seed=8), LlamaForCausalLM(CFG)
    ids = _ids(9, (3, 5))
    want = model.apply({"params": params}, ids)
    mesh = sharding.make_mesh(2, 2, 2)
    with sharding.use_mesh(mesh):
        on_one = model.apply({"params": params}, ids)
        on_mesh = model.apply({"params": jax.device_put(params, sharding.param_shardings(params, mesh))}, ids)
    np.testing.assert_allclose(np.asarray(on_one), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(on_mesh), np.asarray(want), rtol=1e-5, atol=1e-6)


def _fused(teacher_cfg, student_cfg):
    def loss(student, teacher, ids, mask):
        return losses.fused_relation_loss(teacher_cfg, student_cfg, teacher, student, ids, mask=mask, impl="xla")[0]

    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer", "stacked"])
def test_fused_paired_decoder_on_a_mesh_equals_one_device(stacked):
    teacher_cfg = CFG.replace(scan_layers=stacked)
    student_cfg = teacher_cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}, remat="full")
    teacher = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim >= 2 else x, _params(stacked=stacked))
    student = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim >= 2 else x, _params(seed=3, stacked=stacked))
    ids, mask = _ids(4), jnp.ones((8, 12), bool).at[5, 7:].set(False)
    want_loss, want_grad = _fused(teacher_cfg, student_cfg)(student, teacher, ids, mask)
    mesh = sharding.make_mesh(2, 2, 2)
    place = lambda tree: jax.device_put(tree, sharding.param_shardings(tree, mesh))
    with sharding.use_mesh(mesh):
        fn, args = _fused(teacher_cfg, student_cfg), (place(student), place(teacher), ids, mask)
        assert "sharding_constraint" in fn.lower(*args).as_text()
        got_loss, got_grad = fn(*args)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=5e-5)
    # float32 sums reordered by the sharded scan (constraints or not): within 3e-4 of each tensor's scale
    flat_want = flax.traverse_util.flatten_dict(want_grad)
    for path, g in flax.traverse_util.flatten_dict(got_grad).items():
        want = np.asarray(flat_want[path])
        np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=3e-4 * np.abs(want).max(), err_msg=str(path))


@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer", "stacked"])
def test_kv_cache_generation_on_a_mesh_equals_one_device(stacked):
    """Three prompts: a batch the data axis does not divide stays unsharded instead of failing."""
    params, model = _params(seed=5, stacked=stacked), LlamaForCausalLM(CFG.replace(scan_layers=stacked))
    rng = np.random.default_rng(6)
    prompts = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (5, 9, 3)]
    want = generate.greedy_generate(model, params, prompts, 6, bucket=8)
    mesh = sharding.make_mesh(2, 2, 2)
    with sharding.use_mesh(mesh):
        got = generate.greedy_generate(
            model, jax.device_put(params, sharding.param_shardings(params, mesh)), prompts, 6, bucket=8
        )
    assert got == want
