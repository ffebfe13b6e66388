"""A simplified LongReD: short-text hidden-state cosine distillation plus short-to-long logit
distillation (the student at skipped position ids spanning long_factor x T, against the teacher's
short-text logits). Not the full LongReD recipe (no long-text LM term, CREAM positions or layer
selection)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lard_jax import losses
from lard_jax.methods import Context, register
from lard_jax.model import collect_hidden


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_layers: tuple | None = None  # which layers' hidden states (None = all)
    lambda_hidden: float = 1.0
    lambda_short_to_long: float = 1.0
    long_factor: float = 8.0  # span of the skipped position ids, in multiples of T


def skipped_positions(rng, batch: int, seq_len: int, span: int):
    """Short-to-long positions: a sorted random subset of [0, span) of size seq_len that always
    starts at 0 (the model sees long-range position gaps on short text)."""

    def one(key):
        rest = jax.random.choice(key, jnp.arange(1, span), (seq_len - 1,), replace=False)
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.sort(rest).astype(jnp.int32)])

    return jax.vmap(one)(jax.random.split(rng, batch))


@register("longred_simplified", Config)
def build(ctx: Context, cfg: Config):
    def loss_fn(trainable, frozen, batch, rng):
        s_params = ctx.student_params(frozen, trainable)
        mask = batch.get("mask")
        t_logits, t_inter = ctx.apply(ctx.teacher, jax.lax.stop_gradient(frozen), batch)
        _, s_inter = ctx.apply(ctx.student, s_params, batch, **ctx.dropout_kw(rng, 0x10))
        s_hidden, t_hidden = collect_hidden(s_inter), collect_hidden(t_inter)
        idx = range(len(s_hidden)) if cfg.hidden_layers is None else cfg.hidden_layers
        hid = losses.hidden_cosine_loss([s_hidden[i] for i in idx], [t_hidden[i] for i in idx], mask)
        b, t = batch["input_ids"].shape
        pos = skipped_positions(rng, b, t, int(cfg.long_factor * t))
        s_long, _ = ctx.apply(
            ctx.student,
            s_params,
            {k: v for k, v in batch.items() if k != "segment_ids"},
            positions=pos,
            **ctx.dropout_kw(rng, 0x11),
        )
        s2l = losses.logit_kd_loss(s_long, t_logits, mask, 1.0)
        loss = cfg.lambda_hidden * hid + cfg.lambda_short_to_long * s2l
        return loss, {"hidden": hid, "short_to_long": s2l}

    return loss_fn
