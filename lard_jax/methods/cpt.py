"""Continued pre-training: next-token cross entropy of the student alone (no teacher)."""

from __future__ import annotations

import dataclasses

from lard_jax import losses
from lard_jax.methods import Context, register


@dataclasses.dataclass(frozen=True)
class Config:
    pass


@register("cpt", Config, teacher_forward=False)
def build(ctx: Context, cfg: Config):
    def loss_fn(trainable, frozen, batch, rng):
        s_logits, _ = ctx.apply(ctx.student, ctx.student_params(frozen, trainable), batch, **ctx.dropout_kw(rng, 0x10))
        loss = losses.lm_loss(s_logits, batch["input_ids"], batch.get("mask"), batch.get("segment_ids"))
        return loss, {"lm": loss}

    return loss_fn
