"""The restoration step: frozen native teacher, scaled student, masked update of the attention projections.

Parameters live in two trees (lard_jax.trainable, re-exported here):
  frozen_params    the checkpoint's weights, shared by teacher and student (one copy on device);
  trainable        only the student's trainable attention projections (or their LoRA factors);
                   every parameter under the projection set "all" (pretraining, method `lm`,
                   whose frozen tree is then `frozen_part(...)` = {}).
The student's tree is `student_params(frozen_params, trainable, lora)` inside the jitted step, so
the frozen weights are never duplicated and never enter the optimizer: they carry no optimizer state
and stay bitwise unchanged. `trainable_mask` is the optax-style boolean mask that selects them.

On a mesh (lard_jax.sharding), what the pipeline and the experiments run:
    trainable = init_trainable_sharded(frozen, mask, lora, rng, mesh, dtype)
    state = init_state(trainable, optimizer, rng, mesh)      # (restore a checkpoint into it here)
    step = jit_train_step(teacher, student, spec, lora, optimizer, schedule, state)
    state, metrics = step(state, frozen, batch)              # batch leaves [accum, micro, T]
`jit_step` jits any step(state, ...) -> (state, metrics) the same way (e.g. several train steps
scanned in one call).

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

from lard_jax import methods
from lard_jax import sharding as sharding_lib
from lard_jax.methods import longred_simplified
from lard_jax.model import LlamaForCausalLM, is_stacked, stack_layers, unstack_layers
from lard_jax.trainable import (  # noqa: F401  (re-exported: existing imports use trainer.X)
    ALL,
    PROJECTION_SETS,
    LoraSpec,
    frozen_part,
    init_trainable,
    merge_student,
    select,
    student_params,
    trainable_mask,
)

METHODS = methods.names()  # the registry (lard_jax.methods): one module per method
RENAMED_METHODS = methods.RENAMED


def check_method(method: str) -> None:
    methods.get(method)  # ValueError naming the known methods (or the rename)


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


def make_optimizer(
    *, lr, warmup_steps, total_steps, min_lr_ratio=0.9, clip=5.0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8
):
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
    skipped: Any = None  # int32: steps whose update was skipped (non-finite loss or gradient norm); None: not counted


# ----------------------------------------------------------------------------------------------
# losses per method
@dataclasses.dataclass(frozen=True, init=False)
class LossSpec:
    """A loss method (a name in the lard_jax.methods registry) and its own options: the fields of
    that method's Config, given as keywords (`LossSpec(kernel_impl="xla", layers=(0, 3))` for
    linearard, `LossSpec(method="logit_kd", temperature=2.0)`); an option the method does not have
    is a ValueError. The options read as attributes (`spec.relations`)."""

    method: str
    options: Any

    def __init__(self, method: str = "linearard", options=None, **kwargs):
        m = methods.get(method)
        if options is None:
            unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(m.config)})
            if unknown:
                raise ValueError(
                    f"loss method {method!r} has no option(s) {unknown}; its options are "
                    f"{[f.name for f in dataclasses.fields(m.config)]}"
                )
            options = m.config(**kwargs)
        elif kwargs:
            raise ValueError("pass either options or keyword options, not both")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "options", options)

    def __getattr__(self, name):
        if name in ("method", "options") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.options, name)

    def replace(self, **changes) -> LossSpec:
        return LossSpec(self.method, dataclasses.replace(self.options, **changes))

    @classmethod
    def from_config(cls, block, **extra) -> LossSpec:
        """From a config block (config.loss): `block.method` and, of its other keys, those the
        method has (`extra` overrides); keys of other methods are ignored."""
        method = block["method"]
        return cls(method, **methods.options_from_block(methods.get(method).config, block, **extra))


skipped_positions = longred_simplified.skipped_positions  # re-exported


def make_loss_fn(teacher: LlamaForCausalLM, student: LlamaForCausalLM, spec: LossSpec, lora: LoraSpec):
    """loss_fn(trainable, frozen, batch, rng) -> (loss, metrics), built by the method's module in
    lard_jax.methods. With LoRA dropout the student runs the unmerged LoRA path and draws its
    dropout masks from `rng`."""
    return methods.get(spec.method).build(methods.Context.create(teacher, student, lora), spec.options)


# ----------------------------------------------------------------------------------------------
# parameter layouts at the run's boundaries (lard_jax.model.stack_layers / unstack_layers)
def to_layout(params, scan_layers: bool, *, delete_source: bool = False):
    """`params` (any tree of them) in the stacked layout if `scan_layers`, else per layer."""
    return stack_layers(params, delete_source=delete_source) if scan_layers else unstack_layers(params)


def per_layer_for_export(student_tree, mask, num_layers: int, *, full: bool = False):
    """(params, mask) in the per-layer layout that lard_jax.hf and pipeline.export_student read. Only
    the trained tensors (mask True) are sliced out of a stacked tree unless `full` (a whole
    save_pretrained), so exporting never holds a second copy of the frozen weights."""
    params = student_tree if full else select(student_tree, mask)
    return unstack_layers(params), unstack_layers(mask, num_layers)


def restore_any_layout(restore, state):
    """`restore(abstract_tree) -> tree` (e.g. an orbax manager's restore) for a TrainState-like dict
    `state`: first in `state`'s own layout; if that fails, in the other one (a checkpoint written
    with the other scan_layers setting), converted to `state`'s layout and shardings."""

    def abstract(tree):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )

    try:
        return restore(abstract(state))
    except Exception as first:  # orbax: the saved tree does not have this structure
        stacked = is_stacked(state)
        try:
            restored = restore(to_layout(abstract(state), not stacked))
        except Exception:
            raise first from None
        restored = to_layout(restored, stacked)
        return jax.device_put(restored, jax.tree_util.tree_map(lambda x: x.sharding, state))


def make_train_step(
    teacher,
    student,
    spec: LossSpec,
    lora: LoraSpec,
    optimizer,
    schedule,
    *,
    skip_nonfinite: bool = True,
    nan_at_steps: tuple[int, ...] = (),
):
    """step(state, frozen_params, batch) -> (state, metrics). `batch` leaves are
    [accum, micro_batch, T]; gradients are averaged over the accumulation axis in a scan.

    `skip_nonfinite`: an update whose loss or gradient norm (after accumulation: the whole
    step's) is not finite is not applied: parameters and optimizer state stay as they were (the
    optimizer's own step count too, so its schedule resumes where it was), `state.step` still
    advances (the next step reads the next batch), `state.skipped` (when not None) counts it and
    the metrics carry `skipped` (1.0 or 0.0) and `skipped_total`. A select on the device: no host
    synchronisation. `nan_at_steps`: a fault drill, the loss and gradients of these steps
    (1-based, state.step + 1) are replaced by NaN before that check."""
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
        _, metric_shapes = jax.eval_shape(
            loss_fn, state.trainable, frozen, jax.tree_util.tree_map(lambda x: x[0], batch), rng
        )
        zero_metrics = {k: jnp.zeros((), jnp.float32) for k in list(metric_shapes) + ["loss"]}
        (grads, metrics), _ = jax.lax.scan(micro, (zero_grads, zero_metrics), (jnp.arange(accum), batch))
        grads = jax.tree_util.tree_map(lambda g, p: (g / accum).astype(p.dtype), grads, state.trainable)
        metrics = {k: v / accum for k, v in metrics.items()}
        if nan_at_steps:
            drill = jnp.isin(state.step + 1, jnp.asarray(nan_at_steps, jnp.int32))
            grads = jax.tree_util.tree_map(lambda g: jnp.where(drill, jnp.nan, g).astype(g.dtype), grads)
            metrics["loss"] = jnp.where(drill, jnp.nan, metrics["loss"])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.global_norm(grads)
        metrics.update(grad_norm=grad_norm, lr=schedule(state.step))
        skipped = state.skipped
        if skip_nonfinite:
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)
            metrics["skipped"] = jnp.where(finite, 0.0, 1.0)
            if skipped is not None:
                skipped = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
                metrics["skipped_total"] = skipped.astype(jnp.float32)
        return TrainState(state.step + 1, trainable, opt_state, state.rng, skipped), metrics

    return step


# ----------------------------------------------------------------------------------------------
# the jitted step on a mesh
def init_trainable_sharded(frozen_params, mask, lora: LoraSpec, rng, mesh, dtype=None):
    """`init_trainable` on the device: full copies keep the shardings of the weights they copy;
    LoRA factors (small) are replicated over `mesh`. `dtype`: the trainable tree's dtype (None:
    the weights' own; LoRA factors are float32)."""
    selected_shardings = select(jax.tree_util.tree_map(lambda x: x.sharding, frozen_params), mask)

    def init(frozen, key):
        tree = init_trainable(frozen, mask, lora, key)
        return tree if dtype is None else jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)

    trainable = jax.jit(init, out_shardings=None if lora.enabled else selected_shardings)(frozen_params, rng)
    return jax.device_put(trainable, sharding_lib.replicated(mesh)) if lora.enabled else trainable


def place_state(state: TrainState, mesh) -> TrainState:
    """`state` with fixed shardings: leaves sharded over several devices (trainable weights, Adam
    moments) keep their sharding; scalars and leaves on one device (step, rng, Adam count) are
    replicated over `mesh`. The jitted step then returns the state in the same shardings."""
    return jax.device_put(
        state,
        jax.tree_util.tree_map(
            lambda x: (
                x.sharding
                if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
                else sharding_lib.replicated(mesh)
            ),
            state,
        ),
    )


def initial_state(trainable, optimizer, rng) -> TrainState:
    """Step 0 as a pure function: `trainable`, the optimizer's fresh state, the step's base key
    `rng` and a count of skipped (non-finite) steps at 0 (`jax.eval_shape` of it gives the state's
    shapes without making one)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, trainable=trainable, opt_state=optimizer.init(trainable), rng=rng, skipped=zero)


def init_state(trainable, optimizer, rng, mesh) -> TrainState:
    """`initial_state` on the device: the optimizer's state initialised next to `trainable`
    (placed, e.g. by `init_trainable_sharded`); see `place_state`."""
    state = jax.jit(initial_state, static_argnums=1)(trainable, optimizer, rng)
    return place_state(state, mesh)


def state_shardings(state: TrainState):
    """The sharding of every leaf of `state` (what the jitted step returns it in)."""
    return jax.tree_util.tree_map(lambda x: x.sharding, state)


def jit_step(step_fn, state: TrainState):
    """`jax.jit` of step_fn(state, *args) -> (state, metrics) that donates the state (updated in
    place) and returns it in the shardings `state` has now (placed by `init_state`, or restored)."""
    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings(state), None))


def jit_train_step(
    teacher, student, spec: LossSpec, lora: LoraSpec, optimizer, schedule, state: TrainState, **step_options
):
    """The jitted `make_train_step`: step(state, frozen_params, batch) -> (state, metrics), the
    state donated and kept in its shardings (`jit_step`). `step_options`: make_train_step's
    keywords (skip_nonfinite, nan_at_steps)."""
    return jit_step(make_train_step(teacher, student, spec, lora, optimizer, schedule, **step_options), state)


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
