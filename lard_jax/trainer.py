"""The restoration step: frozen native teacher, scaled student, masked update of the attention projections.

Parameters live in two trees (lard_jax.trainable, re-exported here):
  frozen_params    the checkpoint's weights, shared by teacher and student (one copy on device);
  trainable        only the student's trainable attention projections (or their LoRA factors).
The student's tree is `student_params(frozen_params, trainable, lora)` inside the jitted step, so
the frozen weights are never duplicated and never enter the optimizer: they carry no optimizer state
and stay bitwise unchanged. `trainable_mask` is the optax-style boolean mask that selects them.

Optimizer and schedule follow the authors' train.py (github.com/gracefulning/LinearARD, 23866f6):
torch.optim.AdamW defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every trainable
tensor), global-norm clipping, lr = base * step / warmup for step < warmup (0 at step 0), then
cosine from base to min_lr_ratio * base at the last step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lard_jax import losses
from lard_jax.model import LlamaForCausalLM, collect_hidden, collect_qkv
from lard_jax.trainable import (  # noqa: F401  (re-exported: existing imports use trainer.X)
    PROJECTION_SETS,
    LoraSpec,
    init_trainable,
    merge_student,
    select,
    student_params,
    trainable_mask,
)

METHODS = ("linearard", "cpt", "logit_kd", "longred_simplified")
RENAMED_METHODS = {"longred": "longred_simplified"}


def check_method(method: str) -> None:
    if method in RENAMED_METHODS:
        raise ValueError(
            f"method {method!r} was renamed to {RENAMED_METHODS[method]!r}: it is a simplified LongReD "
            "(short-text hidden-state cosine + short-to-long logit distillation with skipped position ids; "
            "no long-text LM term, CREAM positions or layer selection of the LongReD paper), not LongReD itself")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# ----------------------------------------------------------------------------------------------
# optimizer
def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """The authors' schedule (train.py): lr * step / warmup for step < warmup (0 at step 0), then
    lr * (m + (1 - m) * 0.5 * (1 + cos(pi * min(1, (step - warmup) / max(1, total - warmup)))))."""
    warmup = max(int(warmup_steps), 0)
    span = max(1, int(total_steps) - warmup)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
        decayed = lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def make_optimizer(*, lr, warmup_steps, total_steps, min_lr_ratio=0.9, clip=5.0, weight_decay=0.01,
                   b1=0.9, b2=0.999, eps=1e-8):
    """Global-norm clipping, then AdamW with torch.optim.AdamW's defaults. Weight decay is decoupled
    (p -= lr * wd * p) and applies to every trainable tensor, as torch does for all the parameters it
    is given (the authors pass all trainable ones: LoRA factors, or full q/k/v weights and biases)."""
    schedule = lr_schedule(lr, warmup_steps, total_steps, min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    ), schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


# ----------------------------------------------------------------------------------------------
# losses per method
@dataclasses.dataclass(frozen=True)
class LossSpec:
    method: str = "linearard"
    relations: tuple = ("q", "k", "v")
    layers: tuple | None = None  # None = all
    lambda_attn: float = 1.0
    lambda_logit: float = 0.0
    temperature: float = 1.0
    kernel_impl: str = "auto"
    normalize: str = "query_heads"  # losses.NORMALIZATIONS: "query_heads" (authors) | "per_relation_heads"
    hidden_layers: tuple | None = None  # longred_simplified: which layers' hidden states (None = all)
    lambda_hidden: float = 1.0
    lambda_short_to_long: float = 1.0
    long_factor: float = 8.0  # longred_simplified: span of the skipped position ids, in multiples of T

    def __post_init__(self):
        check_method(self.method)
        if self.normalize not in losses.NORMALIZATIONS:
            raise ValueError(f"unknown normalize {self.normalize!r}; expected one of {losses.NORMALIZATIONS}")


def skipped_positions(rng, batch: int, seq_len: int, span: int):
    """longred_simplified's short-to-long positions: a sorted random subset of [0, span) of size seq_len
    that always starts at 0 (the model sees long-range position gaps on short text)."""
    def one(key):
        rest = jax.random.choice(key, jnp.arange(1, span), (seq_len - 1,), replace=False)
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.sort(rest).astype(jnp.int32)])
    return jax.vmap(one)(jax.random.split(rng, batch))


def make_loss_fn(teacher: LlamaForCausalLM, student: LlamaForCausalLM, spec: LossSpec, lora: LoraSpec):
    """loss_fn(trainable, frozen, batch, rng) -> (loss, metrics). With LoRA dropout the student runs
    the unmerged LoRA path and draws its dropout masks from `rng`."""
    dropout = lora.enabled and not lora.merged
    if dropout:
        student = type(student)(student.config.replace(lora_dropout=lora.dropout))

    def apply(model, params, batch, **kw):
        out, state = model.apply({"params": params}, batch["input_ids"], segment_ids=batch.get("segment_ids"),
                                 attention_mask=batch.get("mask"), mutable=["intermediates"], **kw)
        return out, state["intermediates"]

    def loss_fn(trainable, frozen, batch, rng):
        s_params = student_params(frozen, trainable, lora)
        drop = {"rngs": {"dropout": jax.random.fold_in(rng, 0x10)}} if dropout else {}
        mask, seg = batch.get("mask"), batch.get("segment_ids")
        metrics = {}
        if spec.method == "cpt":
            s_logits, _ = apply(student, s_params, batch, **drop)
            loss = losses.lm_loss(s_logits, batch["input_ids"], mask, seg)
            return loss, {"lm": loss}
        t_logits, t_inter = apply(teacher, jax.lax.stop_gradient(frozen), batch)
        s_logits, s_inter = apply(student, s_params, batch, **drop)
        loss = 0.0
        if spec.method == "linearard":
            attn, parts = losses.relation_loss(collect_qkv(s_inter), collect_qkv(t_inter), mask=mask,
                                               segment_ids=seg, relations=spec.relations, layers=spec.layers,
                                               impl=spec.kernel_impl, normalize=spec.normalize,
                                               num_query_heads=student.config.num_attention_heads)
            loss = spec.lambda_attn * attn
            metrics.update({f"relation_{r}": v for r, v in parts.items()}, relation=attn)
        if spec.method == "logit_kd" or (spec.method == "linearard" and spec.lambda_logit):
            kd = losses.logit_kd_loss(s_logits, t_logits, mask, spec.temperature)
            metrics["logit_kd"] = kd
            loss = loss + (spec.lambda_logit if spec.method == "linearard" else 1.0) * kd
        if spec.method == "longred_simplified":
            s_hidden, t_hidden = collect_hidden(s_inter), collect_hidden(t_inter)
            idx = range(len(s_hidden)) if spec.hidden_layers is None else spec.hidden_layers
            hid = losses.hidden_cosine_loss([s_hidden[i] for i in idx], [t_hidden[i] for i in idx], mask)
            b, t = batch["input_ids"].shape
            pos = skipped_positions(rng, b, t, int(spec.long_factor * t))
            long_drop = {"rngs": {"dropout": jax.random.fold_in(rng, 0x11)}} if dropout else {}
            s_long, _ = apply(student, s_params, {k: v for k, v in batch.items() if k != "segment_ids"},
                              positions=pos, **long_drop)
            s2l = losses.logit_kd_loss(s_long, t_logits, mask, 1.0)
            metrics.update(hidden=hid, short_to_long=s2l)
            loss = spec.lambda_hidden * hid + spec.lambda_short_to_long * s2l
        return loss, metrics

    return loss_fn


def make_train_step(teacher, student, spec: LossSpec, lora: LoraSpec, optimizer, schedule):
    """step(state, frozen_params, batch) -> (state, metrics). `batch` leaves are
    [accum, micro_batch, T]; gradients are averaged over the accumulation axis in a scan."""
    loss_fn = make_loss_fn(teacher, student, spec, lora)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        accum = jax.tree_util.tree_leaves(batch)[0].shape[0]

        def micro(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(rng, i))
            carry = jax.tree_util.tree_map(jnp.add, carry, (grads, dict(metrics, loss=loss)))
            return carry, None

        zero_grads = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
        _, metric_shapes = jax.eval_shape(loss_fn, state.trainable, frozen,
                                          jax.tree_util.tree_map(lambda x: x[0], batch), rng)
        zero_metrics = {k: jnp.zeros((), jnp.float32) for k in list(metric_shapes) + ["loss"]}
        (grads, metrics), _ = jax.lax.scan(micro, (zero_grads, zero_metrics), (jnp.arange(accum), batch))
        grads = jax.tree_util.tree_map(lambda g, p: (g / accum).astype(p.dtype), grads, state.trainable)
        metrics = {k: v / accum for k, v in metrics.items()}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, trainable, opt_state, state.rng), metrics

    return step


def model_flops_per_token(cfg, seq_len: int, *, teacher_forward: bool = True) -> float:
    """Model FLOPs per token: student forward+backward (6N + attention) plus teacher forward (2N + attention).
    N excludes the embedding lookup; causal attention adds 2 * 2 * T/2 * H * D per layer forward."""
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    attn = 2 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim  # fwd, causal
    student = 6 * n + 3 * attn
    return student + (2 * n + attn if teacher_forward else 0)


PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5e": 197e12, "v5p": 459e12, "v4": 275e12}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind.replace(" ", ""):
            return value
    return None
