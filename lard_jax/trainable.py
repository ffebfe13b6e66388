"""Which of the student's parameters train, and how the student's full tree is built from them.

Bottom layer (jax/flax and lard_jax.model's layout helpers): the trainer, the pipeline and the
benchmarks import it. Every function works on both parameter layouts (per layer, `layers_i`, and
stacked, `layers` with a leading layer axis: lard_jax.model.stack_layers); LoRA factors of stacked
kernels [L, in, out] are [L, in, r] / [L, r, out] and merge as a batched product.

Two trees:
  frozen_params    the checkpoint's weights, shared by teacher and student (one copy on device);
  trainable        only the student's trainable attention projections, either full copies of
                   their kernels/biases or LoRA factors `lora_a` [in, r] / `lora_b` [r, out].

The projection set "all" (`ALL`) trains every parameter (pretraining, method `lm`). A run without
a teacher then passes `frozen_part(params, mask, lora)` as the frozen tree ({} when everything
trains), so no weight is held twice; `student_params` fills every leaf from `trainable`.

LoRA follows PEFT (what the authors train: r 1024, alpha 2048, dropout 0.05, bias "none", on
q/k/v): y = x W + b + (dropout(x) A B) * alpha / r, A kaiming-uniform(a=sqrt(5)) i.e.
U(-1/sqrt(in), 1/sqrt(in)), B = 0 (the student starts exactly at the scaled, unrestored model).
Without dropout the LoRA product is merged into the kernel (one matmul per projection, same
function); with dropout it cannot be merged, so `student_params` leaves `lora_a`/`lora_b` next to
the kernel and `lard_jax.model.LoraDense` applies the unmerged path. Export always merges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lard_jax import model as model_lib

ALL = "*"  # in a projection tuple: every parameter of the model trains (embeddings, norms, MLP, head)
PROJECTION_SETS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": (ALL,),
}


def trainable_mask(params, projections: Sequence[str] = PROJECTION_SETS["qkv"]):
    """Boolean tree: True for the kernels and biases of the given attention projections, or for
    every leaf when `projections` holds `ALL` (PROJECTION_SETS["all"])."""
    if isinstance(projections, str):
        raise TypeError(f"projections must be a sequence of names, got the string {projections!r}")
    if ALL in projections:
        return jax.tree_util.tree_map(lambda _: True, params)

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
    """rank 0 = train full copies of the selected projections; rank > 0 = PEFT-style LoRA."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the LoRA input only, as PEFT's lora_dropout

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and not self.enabled:
            raise ValueError("LoRA dropout needs LoRA (rank > 0)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def merged(self) -> bool:
        """Whether training may merge A B into the kernel (only without dropout)."""
        return self.dropout == 0.0


def init_trainable(frozen_params, mask, lora: LoraSpec, rng):
    """Student's trainable tree: copies of the selected weights, or LoRA factors (PEFT init:
    A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0)."""
    selected = select(frozen_params, mask)
    if not lora.enabled:
        return jax.tree_util.tree_map(jnp.copy, selected)
    # Stacked (scan_layers) trees get exactly the factors of the per-layer layout, stacked: the
    # random streams are numbered over the per-layer paths in both layouts.
    stacked = model_lib.is_stacked(selected)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), selected)
    flat = flax.traverse_util.flatten_dict(model_lib.unstack_layers(shapes) if stacked else shapes)
    out = {}
    for i, (path, w) in enumerate(sorted(flat.items())):
        if path[-1] != "kernel":
            continue  # LoRA adapts the matrices; biases stay frozen (PEFT bias="none")
        bound = 1.0 / np.sqrt(w.shape[0])
        a = jax.random.uniform(jax.random.fold_in(rng, i), (w.shape[0], lora.rank), jnp.float32, -bound, bound)
        out[path[:-1] + ("lora_a",)] = a  # float32, as PEFT's autocast_adapter_dtype keeps adapters
        out[path[:-1] + ("lora_b",)] = jnp.zeros((lora.rank, w.shape[1]), jnp.float32)
    out = flax.traverse_util.unflatten_dict(out)
    return model_lib.stack_layers(out) if stacked else out


def frozen_part(params, mask, lora: LoraSpec | None = None):
    """The part of `params` the student still reads from the frozen tree: everything under LoRA
    (the factors adapt frozen kernels), else the leaves outside `mask` ({} for the "all" set).
    For runs without a teacher (method `lm`): pass it as the step's frozen tree instead of
    `params`, so the trained weights are not held on device twice. Methods with a teacher need
    the whole checkpoint as the frozen tree (the teacher runs on it)."""
    if lora is not None and lora.enabled:
        return params
    return select(params, jax.tree_util.tree_map(lambda m: not m, mask))


def merge_student(frozen_params, trainable, lora: LoraSpec):
    """The student's full parameter tree with LoRA merged into the kernels (export, evaluation,
    and training without dropout). Frozen leaves are the same arrays as the teacher's."""
    flat = dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen_params)))
    tflat = flax.traverse_util.flatten_dict(trainable)
    if not lora.enabled:
        flat.update(tflat)
    else:
        for path, a in tflat.items():
            if path[-1] != "lora_a":
                continue
            base = path[:-1]
            b = tflat[base + ("lora_b",)]
            w = flat[base + ("kernel",)]
            # [in, r] @ [r, out], or batched over the layer axis of stacked factors
            flat[base + ("kernel",)] = w + (lora.scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))).astype(
                w.dtype
            )
    return flax.traverse_util.unflatten_dict(flat)


def student_params(frozen_params, trainable, lora: LoraSpec):
    """The tree the student trains through: merged when that is exact (no LoRA dropout); with LoRA
    dropout the kernels stay frozen and `lora_a` / `lora_b * alpha / r` sit next to them for
    `lard_jax.model.LoraDense` (build the student with `LlamaConfig.lora_dropout = lora.dropout`)."""
    if not lora.enabled or lora.merged:
        return merge_student(frozen_params, trainable, lora)
    flat = dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen_params)))
    for path, x in flax.traverse_util.flatten_dict(trainable).items():
        flat[path] = x * lora.scale if path[-1] == "lora_b" else x  # LoraDense expects B * alpha / r
    return flax.traverse_util.unflatten_dict(flat)
