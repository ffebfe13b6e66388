"""Tile math shared by the "xla" and "pallas_gpu" implementations.

Logits are kept in base 2 (u = scale * log2(e) * <l, r>) so the kernels use exp2.
Shapes: logit tiles [..., rows, keys], row statistics [..., rows]; the same code
runs inside a Pallas kernel (2-D tiles) and under XLA (batched tiles).

Forward, one pass over key tiles, per row (teacher t, student s):
  m_x  running max, l_x = sum_j 2**(u_x - m_x),
  acc  = sum_j 2**(u_t - m_t) * (u_t - u_s), rescaled as m_t moves,
  KL   = ln2 * (acc / l_t - lse_t + lse_s),  lse_x = m_x + log2(l_x).
Backward: dKL_i / dlogit_s(i, j) = p_s(i, j) - p_t(i, j) (sum_j p_t = 1 on a
valid row), so dS = g_i * (p_s - p_t) * scale with p_x = 2**(u_x - lse_x).
"""
import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Initial running max: finite, so 2**(m_old - m_new) is 1, not NaN, while a row
# has seen only masked keys (-inf); far below any real logit.
M_INIT = -1e30


def init_stats(shape):
  z = jnp.zeros(shape, jnp.float32)
  return (z + M_INIT, z, z + M_INIT, z, z)  # m_s, l_s, m_t, l_t, acc


def online_update(stats, u_s, u_t, diff):
  """Fold one key tile. u_* are masked (-inf); diff = u_t - u_s is unmasked."""
  m_s, l_s, m_t, l_t, acc = stats
  m_s_new = jnp.maximum(m_s, jnp.max(u_s, axis=-1))
  m_t_new = jnp.maximum(m_t, jnp.max(u_t, axis=-1))
  p_s = jnp.exp2(u_s - m_s_new[..., None])
  p_t = jnp.exp2(u_t - m_t_new[..., None])
  alpha_t = jnp.exp2(m_t - m_t_new)
  l_s = l_s * jnp.exp2(m_s - m_s_new) + jnp.sum(p_s, axis=-1)
  l_t = l_t * alpha_t + jnp.sum(p_t, axis=-1)
  acc = acc * alpha_t + jnp.sum(p_t * diff, axis=-1)
  return m_s_new, l_s, m_t_new, l_t, acc


def finalize(stats):
  """-> (kl [nats], lse_s, lse_t [base 2]); rows with no valid key give kl = 0."""
  m_s, l_s, m_t, l_t, acc = stats
  has_key = l_t > 0
  l_s = jnp.where(has_key, l_s, 1.0)
  l_t = jnp.where(has_key, l_t, 1.0)
  lse_s = m_s + jnp.log2(l_s)
  lse_t = m_t + jnp.log2(l_t)
  kl = LN2 * (acc / l_t + (m_s - m_t) + (jnp.log2(l_s) - jnp.log2(l_t)))
  return jnp.where(has_key, kl, 0.0), lse_s, lse_t


def grad_logits(u_s, u_t, lse_s, lse_t, g_scaled):
  """dKL/d<l, r> for one tile; g_scaled = g * scale per row; masked u = -inf."""
  p_s = jnp.exp2(u_s - lse_s[..., None])
  p_t = jnp.exp2(u_t - lse_t[..., None])
  return (p_s - p_t) * g_scaled[..., None]
