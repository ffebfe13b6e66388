"""The restoration step: frozen native teacher, scaled student, masked update of the attention projections.

Parameters live in two trees:
  frozen_params    the checkpoint's weights, shared by teacher and student (one copy on device);
  trainable        only the student's trainable attention projections (or their LoRA factors).
The student's full tree is `merge_student(frozen_params, trainable)` inside the jitted step, so the
frozen weights are never duplicated and never enter the optimizer: they carry no optimizer state
and stay bitwise unchanged. `trainable_mask` is the optax-style boolean mask that selects them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lard_jax import losses
from lard_jax.model import LlamaForCausalLM, collect_hidden, collect_qkv

PROJECTION_SETS = {"qkv": ("q_proj", "k_proj", "v_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj")}
METHODS = ("linearard", "cpt", "logit_kd", "longred")


# ----------------------------------------------------------------------------------------------
# which parameters train
def trainable_mask(params, projections: Sequence[str] = PROJECTION_SETS["qkv"]):
    """Boolean tree: True for the kernels and biases of the given attention projections."""
    def is_trainable(path, _):
        names = [getattr(p, "key", str(p)) for p in path]
        return len(names) >= 3 and names[-3] == "self_attn" and names[-2] in projections
    return jax.tree_util.tree_map_with_path(is_trainable, params)


def select(params, mask):
    """The sub-tree of `params` where `mask` is True (a sparse nested dict)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_mask = flax.traverse_util.flatten_dict(flax.core.unfreeze(mask))
    return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if flat_mask[k]})


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 0
    alpha: float = 16.0

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def init_trainable(frozen_params, mask, lora: LoraSpec, rng):
    """Student's trainable tree: copies of the selected weights, or LoRA factors (B = 0, so the
    student starts exactly at the scaled-but-unrestored model)."""
    selected = select(frozen_params, mask)
    if not lora.enabled:
        return jax.tree_util.tree_map(jnp.copy, selected)
    flat = flax.traverse_util.flatten_dict(selected)
    out = {}
    for i, (path, w) in enumerate(sorted(flat.items())):
        if path[-1] != "kernel":
            continue  # LoRA adapts the matrices; biases stay frozen
        a = jax.random.normal(jax.random.fold_in(rng, i), (w.shape[0], lora.rank), jnp.float32) / np.sqrt(w.shape[0])
        out[path[:-1] + ("lora_a",)] = a.astype(w.dtype)
        out[path[:-1] + ("lora_b",)] = jnp.zeros((lora.rank, w.shape[1]), w.dtype)
    return flax.traverse_util.unflatten_dict(out)


def merge_student(frozen_params, trainable, lora: LoraSpec):
    """The student's full parameter tree (frozen leaves are the same arrays as the teacher's)."""
    flat = dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen_params)))
    tflat = flax.traverse_util.flatten_dict(trainable)
    if not lora.enabled:
        flat.update(tflat)
    else:
        scale = lora.alpha / lora.rank
        for path, a in tflat.items():
            if path[-1] != "lora_a":
                continue
            base = path[:-1]
            b = tflat[base + ("lora_b",)]
            w = flat[base + ("kernel",)]
            flat[base + ("kernel",)] = w + (scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# optimizer
def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step (paper recipe)."""
    warmup_steps = max(int(warmup_steps), 0)
    decay = max(int(total_steps) - warmup_steps, 1)
    return optax.join_schedules(
        [optax.linear_schedule(lr / max(warmup_steps, 1), lr, max(warmup_steps, 1)),
         optax.cosine_decay_schedule(lr, decay, alpha=min_lr_ratio)],
        [max(warmup_steps, 1)])


def make_optimizer(*, lr, warmup_steps, total_steps, min_lr_ratio=0.9, clip=5.0, weight_decay=0.0,
                   b1=0.9, b2=0.95, eps=1e-8):
    """AdamW with global-norm clipping; weight decay masked to matrices (kernels, LoRA factors)."""
    schedule = lr_schedule(lr, warmup_steps, total_steps, min_lr_ratio)
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: getattr(path[-1], "key", "") != "bias", tree)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
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
    hidden_layers: tuple | None = None  # LongReD: which layers' hidden states (None = all)
    lambda_hidden: float = 1.0
    lambda_short_to_long: float = 1.0
    long_factor: float = 8.0  # LongReD: span of the skipped position ids, in multiples of T

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")


def skipped_positions(rng, batch: int, seq_len: int, span: int):
    """LongReD's short-to-long positions: a sorted random subset of [0, span) of size seq_len
    that always starts at 0 (the model sees long-range position gaps on short text)."""
    def one(key):
        rest = jax.random.choice(key, jnp.arange(1, span), (seq_len - 1,), replace=False)
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.sort(rest).astype(jnp.int32)])
    return jax.vmap(one)(jax.random.split(rng, batch))


def make_loss_fn(teacher: LlamaForCausalLM, student: LlamaForCausalLM, spec: LossSpec, lora: LoraSpec):
    def apply(model, params, batch, **kw):
        out, state = model.apply({"params": params}, batch["input_ids"], segment_ids=batch.get("segment_ids"),
                                 attention_mask=batch.get("mask"), mutable=["intermediates"], **kw)
        return out, state["intermediates"]

    def loss_fn(trainable, frozen, batch, rng):
        student_params = merge_student(frozen, trainable, lora)
        mask, seg = batch.get("mask"), batch.get("segment_ids")
        metrics = {}
        if spec.method == "cpt":
            s_logits, _ = apply(student, student_params, batch)
            loss = losses.lm_loss(s_logits, batch["input_ids"], mask, seg)
            return loss, {"lm": loss}
        t_logits, t_inter = apply(teacher, jax.lax.stop_gradient(frozen), batch)
        s_logits, s_inter = apply(student, student_params, batch)
        loss = 0.0
        if spec.method == "linearard":
            attn, parts = losses.relation_loss(collect_qkv(s_inter), collect_qkv(t_inter), mask=mask,
                                               segment_ids=seg, relations=spec.relations, layers=spec.layers,
                                               impl=spec.kernel_impl)
            loss = spec.lambda_attn * attn
            metrics.update({f"relation_{r}": v for r, v in parts.items()}, relation=attn)
        if spec.method == "logit_kd" or (spec.method == "linearard" and spec.lambda_logit):
            kd = losses.logit_kd_loss(s_logits, t_logits, mask, spec.temperature)
            metrics["logit_kd"] = kd
            loss = loss + (spec.lambda_logit if spec.method == "linearard" else 1.0) * kd
        if spec.method == "longred":
            s_hidden, t_hidden = collect_hidden(s_inter), collect_hidden(t_inter)
            idx = range(len(s_hidden)) if spec.hidden_layers is None else spec.hidden_layers
            hid = losses.hidden_cosine_loss([s_hidden[i] for i in idx], [t_hidden[i] for i in idx], mask)
            b, t = batch["input_ids"].shape
            pos = skipped_positions(rng, b, t, int(spec.long_factor * t))
            s_long, _ = apply(student, student_params, {k: v for k, v in batch.items() if k != "segment_ids"},
                              positions=pos)
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
