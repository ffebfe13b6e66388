"""LinearARD's `kernel_blocks` (relation kernel BlockSizes overrides on top of the impl's defaults)
and bench_restore_step's `--kernel_impl impl:FIELD=VALUE,...`, which a step-level A/B of a kernel
option (e.g. the Mosaic backward's merge_d_left) runs through. On CPU the "xla" impl's chunk sizes
(block_q / block_k) stand in for any override: the loss and its gradients must not change, the
program must (so the overrides reached the kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_restore_step
from lard_jax import trainer
from lard_jax.methods import linearard
from lard_jax.model import LlamaConfig, LlamaForCausalLM, init_params
from pallas_kernels import blocks

T = 64
CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=T,
    scan_layers=False,
)


def test_config_takes_a_dict_or_pairs_and_names_unknown_fields():
    a = linearard.Config(kernel_blocks={"merge_d_left": False, "block_q": 64})
    b = linearard.Config(kernel_blocks=(("block_q", 64), ("merge_d_left", False)))
    assert a.kernel_blocks == b.kernel_blocks == (("block_q", 64), ("merge_d_left", False))
    assert linearard.Config().kernel_blocks == ()
    with pytest.raises(ValueError, match=r"kernel_blocks: unknown BlockSizes field\(s\) \['merge_dleft'\]"):
        linearard.Config(kernel_blocks={"merge_dleft": True})
    hash(a)  # a LossSpec's options stay hashable


@pytest.mark.parametrize("fused", [True, False])
def test_overrides_reach_the_kernel_and_leave_the_loss_as_it_is(fused):
    teacher = LlamaForCausalLM(CFG)
    student = LlamaForCausalLM(CFG.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    _, params = init_params(CFG, jax.random.PRNGKey(0))
    lora = trainer.LoraSpec()
    t = trainer.init_trainable(params, trainer.trainable_mask(params), lora, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, T), 0, CFG.vocab_size)
    batch = {"input_ids": ids, "mask": jnp.arange(T)[None] < jnp.array([[T], [T - 9]])}

    def value_and_grad(blocks):
        spec = trainer.LossSpec(kernel_impl="xla", fused=fused, kernel_blocks=blocks)
        loss = trainer.make_loss_fn(teacher, student, spec, lora)
        fn = jax.value_and_grad(lambda t: loss(t, params, batch, jax.random.PRNGKey(3))[0])
        return fn, jax.make_jaxpr(fn)(t)

    (base_fn, base_jaxpr), (small_fn, small_jaxpr) = value_and_grad(()), value_and_grad({"block_q": 32, "block_k": 32})
    assert str(base_jaxpr) != str(small_jaxpr)  # 32-row chunks instead of one 64-row chunk
    (v0, g0), (v1, g1) = base_fn(t), small_fn(t)
    np.testing.assert_allclose(v1, v0, rtol=1e-4)  # float32, another summation order
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_impl_specs_parse_to_overrides():
    """One syntax for every experiment's kernel argument (blocks.parse_impl_spec)."""
    parse = blocks.parse_impl_spec
    assert parse("auto") == ("auto", {})
    assert parse("pallas_mgpu:merge_d_left=0:block_q=64") == ("pallas_mgpu", {"merge_d_left": False, "block_q": 64})
    assert parse("pallas_mgpu:schedule_barrier") == parse("pallas_mgpu:schedule_barrier=true")
    spec = bench_restore_step.loss_spec("pallas_mgpu:merge_d_left=1", fused=True)
    assert spec.kernel_impl == "pallas_mgpu" and spec.kernel_blocks == (("merge_d_left", True),)
    for bad, match in [
        ("pallas_mgpu:merge=1", r"unknown BlockSizes field\(s\) \['merge'\]"),
        ("pallas_mgpu:merge", "not boolean BlockSizes fields"),
        ("pallas_mgpu:block_q", "not boolean BlockSizes fields"),
        ("pallas_mgpu:merge_d_left=yes", "takes 0/1/true/false"),
        ("pallas_mgpu:block_q=big", "takes an integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse(bad)
    with pytest.raises(SystemExit):
        bench_restore_step.main(["--kernel_impl", "pallas_mgpu:merge=1"])
    with pytest.raises(ValueError, match=r"block_sizes: unknown BlockSizes field\(s\) \['merge'\]"):
        blocks.pick_blocks({"merge": True}, "xla", 64, 128)
