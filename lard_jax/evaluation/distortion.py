"""Relation-distortion probe: how far each layer and head of a student drifts from the teacher.

For every layer and head, the per-row KL(teacher || student) of the causal self-relation
softmax(X Xᵀ / sqrt(D)) for X in {Q, K, V} (Q, K after RoPE), averaged over valid rows of the
given text. This is the quantity the LinearARD loss drives down, resolved per layer/head, so a
heat map of it shows where RoPE scaling hurts most and where distillation repaired it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

__all__ = ["RELATIONS", "QKVFn", "dense_self_relation_kl", "relation_distortion"]

RELATIONS = ("q", "k", "v")

# int32 [B, T] -> one dict per layer: q [B, T, H, D], k and v [B, T, Hkv, D] (q and k after RoPE).
QKVFn = Callable[[np.ndarray], Sequence[dict]]

_MASKED = -1e30  # finite stand-in for -inf, so a fully masked row gives 0 instead of NaN


def _head_relation_kl(student: jax.Array, teacher: jax.Array, allowed: jax.Array) -> jax.Array:
    """Per-row KL(teacher || student) of one head's relation rows: [B, T, D] x 2 -> [B, T]."""
    scale = 1.0 / math.sqrt(student.shape[-1])

    def log_relation(x):
        x = x.astype(jnp.float32)
        scores = jnp.einsum("btd,bsd->bts", x, x) * scale
        return jax.nn.log_softmax(jnp.where(allowed, scores, _MASKED), axis=-1)

    log_p_teacher, log_p_student = log_relation(teacher), log_relation(student)
    terms = jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student)
    return jnp.sum(jnp.where(allowed, terms, 0.0), axis=-1)


_head_relation_kl_jit = jax.jit(_head_relation_kl)


def dense_self_relation_kl(student, teacher, *, mask=None, causal: bool = True) -> jax.Array:
    """Dense reference of `pallas_kernels.self_relation_kl`: [B, T, H, D] x 2 -> [B, H, T] float32.

    Rows and keys where `mask` [B, T] is False are excluded; masked rows report 0.
    Materialises a [B, T, T] matrix per head, so it is for probes, not training lengths.
    """
    student, teacher = jnp.asarray(student), jnp.asarray(teacher)
    batch, length = student.shape[:2]
    mask = jnp.ones((batch, length), bool) if mask is None else jnp.asarray(mask, bool)
    allowed = mask[:, None, :] & mask[:, :, None]
    if causal:
        allowed &= jnp.tril(jnp.ones((length, length), bool))[None]
    rows = [_head_relation_kl_jit(student[:, :, h], teacher[:, :, h], allowed) for h in range(student.shape[2])]
    return jnp.where(mask[:, None, :], jnp.stack(rows, axis=1), 0.0)


try:
    from pallas_kernels import self_relation_kl as _self_relation_kl
except ImportError:
    # pallas_kernels was written in parallel with this module; this dense fallback only keeps the
    # probe usable without it and can go once that package is always present.
    _self_relation_kl = dense_self_relation_kl


@jax.jit
def _row_kl(student, teacher, mask):
    # One compile per shape; eager dispatch of the kernel's tile loops costs seconds per call.
    return _self_relation_kl(student, teacher, mask=mask, causal=True)


def relation_distortion(
    qkv_fn_teacher: QKVFn,
    qkv_fn_student: QKVFn,
    input_ids: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """{"q": [layers, heads], "k": [layers, kv_heads], "v": [layers, kv_heads]} mean row KL.

    `input_ids` [B, T] (and `mask` [B, T], True = real token) are fed `batch_size` rows at a time.
    """
    input_ids = np.asarray(input_ids, np.int32)
    mask = np.ones(input_ids.shape, bool) if mask is None else np.asarray(mask, bool)
    batch_size = batch_size or input_ids.shape[0]
    kl_sums: dict[str, np.ndarray] | None = None
    valid_rows = 0
    for first in tqdm(range(0, input_ids.shape[0], batch_size), desc="relation distortion", disable=not progress):
        ids, rows_mask = input_ids[first : first + batch_size], mask[first : first + batch_size]
        teacher_layers, student_layers = qkv_fn_teacher(ids), qkv_fn_student(ids)
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f"teacher has {len(teacher_layers)} layers, student {len(student_layers)}")
        per_relation = {r: [] for r in RELATIONS}
        for teacher, student in zip(teacher_layers, student_layers):
            for r in RELATIONS:
                # float32 for both: the kernel wants matching float dtypes, and a probe wants accuracy.
                student_x, teacher_x = (jnp.asarray(x, jnp.float32) for x in (student[r], teacher[r]))
                kl = _row_kl(student_x, teacher_x, jnp.asarray(rows_mask))
                kl = np.where(rows_mask[:, None, :], np.asarray(kl, np.float64), 0.0)
                per_relation[r].append(kl.sum(axis=(0, 2)))  # [heads]
        batch_sums = {r: np.stack(v) for r, v in per_relation.items()}
        kl_sums = batch_sums if kl_sums is None else {r: kl_sums[r] + batch_sums[r] for r in RELATIONS}
        valid_rows += int(rows_mask.sum())
    if kl_sums is None or valid_rows == 0:
        raise ValueError("relation_distortion needs at least one unmasked token")
    return {r: (kl_sums[r] / valid_rows).astype(np.float32) for r in RELATIONS}
