"""Logit distillation: T² · KL(teacher ‖ student) of the temperature-softened next-token distributions."""

from __future__ import annotations

import dataclasses

import jax

from lard_jax import losses
from lard_jax.methods import Context, register


@dataclasses.dataclass(frozen=True)
class Config:
    temperature: float = 1.0


@register("logit_kd", Config)
def build(ctx: Context, cfg: Config):
    def loss_fn(trainable, frozen, batch, rng):
        t_logits, _ = ctx.apply(ctx.teacher, jax.lax.stop_gradient(frozen), batch)
        s_logits, _ = ctx.apply(ctx.student, ctx.student_params(frozen, trainable), batch, **ctx.dropout_kw(rng, 0x10))
        kd = losses.logit_kd_loss(s_logits, t_logits, batch.get("mask"), cfg.temperature)
        return kd, {"logit_kd": kd}

    return loss_fn
