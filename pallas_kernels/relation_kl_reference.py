"""Dense relation KL, impl "reference": materialises the [B, H, T, T] logits.

Tests and baselines only (O(T^2) memory). Exported as
`pallas_kernels.relation_kl_reference`; `relation_kl(..., impl="reference")`
calls it (its gradient is plain autodiff, no custom_vjp)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_pairs(B, T, *, mask=None, segment_ids=None, causal=True):
    """[B, 1, T, T] bool: key j is valid for row i."""
    ok = jnp.ones((B, 1, T, T), bool)
    if causal:
        ok = ok & jnp.tril(jnp.ones((T, T), bool))
    if mask is not None:
        ok = ok & mask[:, None, None, :]
    if segment_ids is not None:
        ok = ok & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return ok


def _log_softmax_rows(left, right, valid, scale):
    H, Hr = left.shape[2], right.shape[2]
    right = jnp.repeat(right, H // Hr, axis=2)
    acc = jnp.promote_types(left.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    logits = scale * jnp.einsum(
        "bihd,bjhd->bhij", left, right, preferred_element_type=acc, precision=jax.lax.Precision.HIGHEST
    )
    # A finite fill keeps fully masked rows NaN-free; they are zeroed below.
    logits = jnp.where(valid, logits, -1e30)
    return jax.nn.log_softmax(logits, axis=-1)


def relation_kl_reference(s_left, s_right, t_left, t_right, *, mask=None, segment_ids=None, causal=True, scale=None):
    B, T, H, D = s_left.shape
    scale = D**-0.5 if scale is None else scale
    valid = valid_pairs(B, T, mask=mask, segment_ids=segment_ids, causal=causal)
    logp_s = _log_softmax_rows(s_left, s_right, valid, scale)
    logp_t = _log_softmax_rows(jax.lax.stop_gradient(t_left), jax.lax.stop_gradient(t_right), valid, scale)
    terms = jnp.where(valid, jnp.exp(logp_t) * (logp_t - logp_s), 0.0)
    kl = terms.sum(-1)
    row_valid = valid.any(-1)
    if mask is not None:
        row_valid = row_valid & mask[:, None, :]
    return jnp.where(row_valid, kl, 0.0)
