"""Training objectives: the LinearARD relation loss and the baselines' losses.

LinearARD (paper sec. 3): for each aligned layer l and relation r in {Q, K, V},

    L_r^l = sum_{b,h,i valid} KL( softmax_j(r_t r_t^T / sqrt(d))_i || softmax_j(r_s r_s^T / sqrt(d))_i )
            / (valid tokens x heads)

with q, k taken after RoPE (teacher: native RoPE, student: scaled), causal. The attention loss is
the mean over layers of sum_r L_r^l.

"heads" in the denominator (`normalize`):
  "query_heads" (default, the authors' train.py): the number of QUERY heads for Q, K and V alike.
      Under GQA K and V have only the KV heads, so their terms weigh H_kv / H_q as much per head
      as Q's; this is what the published code optimises.
  "per_relation_heads": each relation's own head count (H_q for Q, H_kv for K and V), so each
      relation is a per-head mean. Identical to "query_heads" for MHA models (Llama-2-7B).

The per-row KL comes from `pallas_kernels.self_relation_kl_multi` (a layer's relations of one head dim
in one kernel launch), which never builds the T x T relation maps.
`relation_loss` takes every layer's q/k/v after both forwards (all layers' inputs alive at once);
`fused_relation_loss` computes the same value inside one paired teacher/student pass, layer by layer.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels

RELATIONS = ("q", "k", "v")
NORMALIZATIONS = ("query_heads", "per_relation_heads")


def _valid(mask, shape):
    return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


def relation_loss(
    student_layers,
    teacher_layers,
    *,
    mask=None,
    segment_ids=None,
    relations: Sequence[str] = RELATIONS,
    layers: Sequence[int] | None = None,
    impl: str = "auto",
    block_sizes=None,
    normalize: str = "query_heads",
    num_query_heads: int | None = None,
):
    """(loss, {"q": ..., "k": ..., "v": ...}); parts are layer means of each relation's summed row KL
    over (valid tokens x heads), heads as `normalize` says (module docstring). `num_query_heads`
    defaults to the head count of the layers' "q" tensors ([B, T, H, D]).

    The layers come as a list of per-layer {q, k, v} (model.collect_qkv), or stacked: one dict of
    [L, B, T, H, D] arrays, as a scanned model sows them (model.stacked_qkv). Stacked layers run
    under one lax.map, whose backward writes the stack's cotangent layer by layer; slicing the
    stack per layer instead would build it from L zero-padded full-size stacks (for Llama-2-7B at
    T = 4096: 32 x 1 GiB per relation, summed), which is what the unfused scanned step used to do."""
    if isinstance(student_layers, Mapping) or isinstance(teacher_layers, Mapping):
        return _stacked_relation_loss(
            student_layers,
            teacher_layers,
            mask=mask,
            segment_ids=segment_ids,
            relations=relations,
            layers=layers,
            impl=impl,
            block_sizes=block_sizes,
            normalize=normalize,
            num_query_heads=num_query_heads,
        )
    if len(student_layers) != len(teacher_layers):
        raise ValueError(f"student has {len(student_layers)} layers, teacher {len(teacher_layers)}")
    layers = _check_relation_args(relations, normalize, layers, len(student_layers))
    if num_query_heads is None:
        num_query_heads = student_layers[0]["q"].shape[2]
    b, t = student_layers[0]["q"].shape[:2]
    layer_kl = _layer_relation_kl(relations, mask, segment_ids, impl, block_sizes, normalize, num_query_heads, (b, t))
    per_layer = [layer_kl(teacher_layers[l], student_layers[l]) for l in layers]  # a layer's relations in one call
    parts = {r: jnp.mean(jnp.stack([p[r] for p in per_layer])) for r in relations}
    return sum(parts.values()), parts


def _stacked_relation_loss(
    student, teacher, *, mask, segment_ids, relations, layers, impl, block_sizes, normalize, num_query_heads
):
    """relation_loss on stacked {r: [L, B, T, H, D]} inputs: one lax.map over the selected layers."""
    if not (isinstance(student, Mapping) and isinstance(teacher, Mapping)):
        raise ValueError("relation_loss: pass both models' layers stacked (dicts of [L, ...]) or both as lists")
    n = student[next(iter(student))].shape[0]
    if teacher[next(iter(teacher))].shape[0] != n:
        raise ValueError(f"student has {n} layers, teacher {teacher[next(iter(teacher))].shape[0]}")
    layers = _check_relation_args(relations, normalize, layers, n)
    idx = [int(l) % n for l in layers]
    if num_query_heads is None:
        num_query_heads = student["q"].shape[3]
    b, t = student[relations[0]].shape[1:3]
    rels = tuple(relations)
    layer_kl = _layer_relation_kl(rels, mask, segment_ids, impl, block_sizes, normalize, num_query_heads, (b, t))

    def pick(tree):  # the selected layers in order (a gather only for a subset or repeats)
        return {r: tree[r] if idx == list(range(n)) else tree[r][np.asarray(idx)] for r in rels}

    per_layer = jax.lax.map(lambda ts: layer_kl(*ts), (pick(teacher), pick(student)))  # {r: [len(idx)]}
    parts = {r: jnp.mean(per_layer[r]) for r in rels}
    return sum(parts.values()), parts


def _check_relation_args(relations, normalize, layers, num_layers: int) -> list[int]:
    bad = [r for r in relations if r not in RELATIONS]
    if bad:
        raise ValueError(f"unknown relation(s) {bad}; expected a subset of {RELATIONS}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZATIONS}")
    layers = list(range(num_layers)) if layers is None else list(layers)
    if not layers:
        raise ValueError("no layers selected for the relation loss")
    return layers


def one_document_from_start(mask, segment_ids, shape):
    """True (a traced bool) when every row is one document from token 0, padded at its end: the
    real tokens a prefix, one segment id among them (lard_jax.data's per_document blocks). Then
    causal order alone keeps every real row inside its document (keys j <= i are real and of its
    segment), so the relation kernel runs without mask arithmetic (its unmasked tiles) and the
    padded rows are zeroed afterwards: the same row KL on real rows, the same gradients."""
    valid = _valid(mask, shape)
    prefix = jnp.all(valid[:, :-1] >= valid[:, 1:]) & jnp.all(valid[:, 0])
    if segment_ids is None:
        return prefix
    first = segment_ids[:, :1]
    return prefix & jnp.all(jnp.where(valid, segment_ids == first, True))


def _layer_relation_kl(relations, mask, segment_ids, impl, block_sizes, normalize, num_query_heads, shape):
    """fn(teacher {q,k,v}, student {q,k,v}, relations) -> {r: one layer's summed row KL / (valid tokens x heads)}."""
    n_valid = jnp.maximum(_valid(mask, shape).sum(), 1).astype(jnp.float32)
    prefix = None if mask is None and segment_ids is None else one_document_from_start(mask, segment_ids, shape)

    def rows_kl(pairs):
        """[(student, teacher)] of one layer -> their [B, H_r, T] row KLs; relations with the same
        head dim share one kernel launch (pallas_kernels.self_relation_kl_multi: heads concatenated)."""
        masked = lambda ps: pallas_kernels.self_relation_kl_multi(  # noqa: E731
            ps, mask=mask, segment_ids=segment_ids, causal=True, impl=impl, block_sizes=block_sizes
        )
        if prefix is None:
            return masked(pairs)

        def causal_only(ps):  # exact on the real rows of such a batch (docstring of one_document_from_start)
            kls = pallas_kernels.self_relation_kl_multi(ps, causal=True, impl=impl, block_sizes=block_sizes)
            return [jnp.where(_valid(mask, shape)[:, None, :], kl, 0.0) for kl in kls]

        return jax.lax.cond(prefix, causal_only, masked, pairs)

    def fn(teacher, student, rels=relations):
        pairs = [(student[r], jax.lax.stop_gradient(teacher[r])) for r in rels]
        out = {}
        for r, kl in zip(rels, rows_kl(pairs)):
            heads = num_query_heads if normalize == "query_heads" else kl.shape[1]  # kl: [B, H_r, T]
            out[r] = kl.sum() / (n_valid * heads)
        return out

    return fn


def kernel_residual_names(impl: str) -> tuple[str, ...]:
    """The checkpoint_name(s) under which the relation kernel leaves what its backward needs from
    its forward (pallas_kernels.relation_kl.RESIDUALS_NAME: the two [B, H, T] float32 LSEs): a
    remat policy that saves them spares the backward a second forward kernel. () for the
    "reference" impl (plain autodiff of dense [T, T] maps) or a kernel that names none."""
    if impl == "reference":
        return ()
    name = getattr(importlib.import_module("pallas_kernels.relation_kl"), "RESIDUALS_NAME", None)
    return (name,) if name else ()


def fused_relation_loss(
    teacher_cfg,
    student_cfg,
    teacher_params,
    student_params,
    input_ids,
    *,
    mask=None,
    segment_ids=None,
    relations: Sequence[str] = RELATIONS,
    layers: Sequence[int] | None = None,
    impl: str = "auto",
    block_sizes=None,
    normalize: str = "query_heads",
    dropout_rng=None,
    return_hidden: bool = False,
):
    """relation_loss computed inside lard_jax.model.paired_decoder: teacher and student run layer by
    layer in one pass and each selected layer's KL is taken from that layer's q/k/v right there
    (summed into the scan carry). Same value as relation_loss on relation_inputs of both models
    (the same normalisation and layer mean). The kernel runs under the student block's remat with
    its LSEs saved by name (kernel_residual_names), so the backward keeps, per layer, the
    student block's input, the teacher's q/k/v and those LSEs, and reruns neither the teacher nor
    the kernel's forward (paired_decoder's docstring).

    `teacher_params` are used as given (stop_gradient them if they are traced); `dropout_rng` is
    the student's LoRA-dropout root (LlamaForCausalLM's `dropout_rng`). Returns (loss, parts,
    hidden) with hidden = (teacher, student) last hidden states when `return_hidden` (else None)."""
    from lard_jax import model as model_lib  # losses stays importable without the model

    n = student_cfg.num_hidden_layers
    if teacher_cfg.num_hidden_layers != n:
        raise ValueError(f"student has {n} layers, teacher {teacher_cfg.num_hidden_layers}")
    layers = _check_relation_args(relations, normalize, layers, n)
    for l in layers:
        if not -n <= int(l) < n:
            raise IndexError(f"relation layer {l} does not exist in a {n}-layer model")
    layer_kl = _layer_relation_kl(
        tuple(relations),
        mask,
        segment_ids,
        impl,
        block_sizes,
        normalize,
        student_cfg.num_attention_heads,
        input_ids.shape,
    )
    sums, hidden = model_lib.paired_decoder(
        teacher_cfg,
        student_cfg,
        teacher_params,
        student_params,
        input_ids,
        layer_fn=layer_kl,
        layers=layers,
        segment_ids=segment_ids,
        attention_mask=mask,
        dropout_rng=dropout_rng,
        return_hidden=return_hidden,
        layer_fn_saves=kernel_residual_names(impl),
    )
    parts = {r: sums[r] / len(layers) for r in relations}
    return sum(parts.values()), parts, hidden


def next_token_targets(input_ids, mask=None, segment_ids=None):
    """(targets, weights): predict token i+1 from position i, within one segment, real tokens only."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.ones(input_ids.shape, bool).at[:, -1].set(False)
    if mask is not None:
        m = mask.astype(bool)
        weights &= m & jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    if segment_ids is not None:
        weights &= jnp.concatenate(
            [segment_ids[:, 1:] == segment_ids[:, :-1], jnp.zeros_like(segment_ids[:, :1], bool)], axis=1
        )
    return targets, weights


def lm_loss(logits, input_ids, mask=None, segment_ids=None):
    """Mean next-token cross entropy over valid positions (float32)."""
    targets, weights = next_token_targets(input_ids, mask, segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1)


def logit_kd_loss(student_logits, teacher_logits, mask=None, temperature: float = 1.0):
    """T^2 * KL(teacher || student) of the temperature-softened next-token distributions."""
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, -1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    kl = (jnp.exp(t_logp) * (t_logp - s_logp)).sum(-1)
    valid = _valid(mask, kl.shape).astype(jnp.float32)
    return temperature**2 * (kl * valid).sum() / jnp.maximum(valid.sum(), 1)


def hidden_cosine_loss(student_hidden: Sequence, teacher_hidden: Sequence, mask=None):
    """longred_simplified's hidden-state distillation: mean over layers and valid tokens of 1 - cos(h_s, h_t)."""
    losses = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        hs32, ht32 = hs.astype(jnp.float32), jax.lax.stop_gradient(ht).astype(jnp.float32)
        cos = (hs32 * ht32).sum(-1) * jax.lax.rsqrt((hs32**2).sum(-1) * (ht32**2).sum(-1) + 1e-12)
        valid = _valid(mask, cos.shape).astype(jnp.float32)
        losses.append(((1.0 - cos) * valid).sum() / jnp.maximum(valid.sum(), 1))
    return jnp.mean(jnp.stack(losses))
