"""The tiny models, trainable trees and batch of the fused-loss tests (tests/test_scan.py,
tests/test_layer_scan.py): a 3-layer LLaMA with weights 8x the init's (relation maps far from
uniform), its linear x4 student, LoRA none / merged / with dropout, either layout."""

import jax
import jax.numpy as jnp

from lard_jax import trainer
from lard_jax.model import LlamaConfig, LlamaForCausalLM, init_params, stack_layers

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
)
ROPE = {"rope_type": "linear", "factor": 4.0}


def scaled_params(cfg=CFG, seed=0):
    _, params = init_params(cfg, jax.random.PRNGKey(seed))
    # larger weights: relation maps far from uniform, so the loss and its gradients are not tiny
    return jax.tree_util.tree_map(lambda x: x * 8 if x.ndim == 2 else x, params)


def setup(layout, lora_kind, gqa=True, remat="none"):
    cfg = CFG.replace(remat=remat, num_key_value_heads=2 if gqa else 4, scan_layers=layout == "scan")
    params = scaled_params(cfg.replace(scan_layers=False))
    teacher = LlamaForCausalLM(cfg)
    student = LlamaForCausalLM(cfg.replace(rope_scaling=ROPE))
    lora = {
        "none": trainer.LoraSpec(),
        "merged": trainer.LoraSpec(rank=4, alpha=8.0),
        "dropout": trainer.LoraSpec(rank=4, alpha=8.0, dropout=0.3),
    }[lora_kind]
    t = trainer.init_trainable(params, trainer.trainable_mask(params), lora, jax.random.PRNGKey(5))
    if lora.enabled:  # a nonzero B, as after some training
        t = jax.tree_util.tree_map_with_path(
            lambda p, x: (
                0.05 * jax.random.normal(jax.random.PRNGKey(6), x.shape) if getattr(p[-1], "key", "") == "lora_b" else x
            ),
            t,
        )
    if layout == "scan":  # the same weights and factors, stacked
        params, t = stack_layers(params), stack_layers(t)
    ids = jax.random.randint(jax.random.PRNGKey(7), (2, 12), 0, 64)
    mask = jnp.ones((2, 12), bool).at[1, 8:].set(False)
    return teacher, student, params, lora, t, {"input_ids": ids, "mask": mask}


def loss_and_grads(teacher, student, spec, lora, t, params, batch):
    fn = trainer.make_loss_fn(teacher, student, spec, lora)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(t, params, batch, jax.random.PRNGKey(9))
    return loss, metrics, grads
