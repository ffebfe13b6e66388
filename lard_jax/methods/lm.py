"""Language modelling: next-token cross entropy of the student alone (no teacher forward).

For pretraining a model from scratch (experiments/pretrain_teacher.py), with the projection set
"all" (lard_jax.trainable: every parameter trains; pass `trainable.frozen_part(...)`, i.e. {}, as
the frozen tree so no weight is held twice). The loss is `cpt`'s when the batch has input_ids
only (predict token i + 1 from position i, within a segment, real tokens only). A batch may also
carry `targets` [B, T], the token to predict at every position: packed windows of T + 1 tokens
then train at exactly T positions (input_ids = window[:, :-1], targets = window[:, 1:]) instead of
running the model on T + 1. Targets < 0 are ignored, and so are positions where `mask` is 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lard_jax import losses
from lard_jax.methods import Context, register


@dataclasses.dataclass(frozen=True)
class Config:
    pass


def target_loss(logits, targets, mask=None):
    """Mean cross entropy (float32) of logits [B, T, V] against targets [B, T]; targets < 0 and
    positions where `mask` is 0 do not count."""
    weights = targets >= 0
    if mask is not None:
        weights &= mask.astype(bool)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1)


@register("lm", Config, teacher_forward=False)
def build(ctx: Context, cfg: Config):
    def loss_fn(trainable, frozen, batch, rng):
        logits, _ = ctx.apply(ctx.student, ctx.student_params(frozen, trainable), batch, **ctx.dropout_kw(rng, 0x10))
        if "targets" in batch:
            loss = target_loss(logits, batch["targets"], batch.get("mask"))
        else:
            loss = losses.lm_loss(logits, batch["input_ids"], batch.get("mask"), batch.get("segment_ids"))
        return loss, {"lm": loss}

    return loss_fn
