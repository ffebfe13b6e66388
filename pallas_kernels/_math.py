"""Tile math shared by the "xla", "pallas_gpu" and "pallas_tpu" implementations.

Tiles hold raw products r = <l, r_> (float32); the scaled base-2 logit is
u = c * r with c = scale * log2(e) > 0, so every exponential is exp2(c*r - c*m),
one fused multiply-add, and the running maxima stay in raw units. Shapes: tiles
[..., rows, keys], row statistics [..., rows] or, with keepdims=True,
[..., rows, 1]. The same code runs inside a Pallas kernel (2-D tiles) and under
XLA (batched tiles): the Triton kernels and "xla" use [rows] statistics, the
Mosaic (TPU) kernels [rows, 1] columns, the 2-D form Mosaic lowers without 1-D
relayouts. `exp2` is a parameter so the GPU kernels can pass a flush-to-zero
hardware exp2.

Forward, one pass over key tiles, per row (teacher t, student s):
  m_x  running max of r_x, l_x = sum_j 2**(c (r_x - m_x)),
  acc  = sum_j 2**(c (r_t - m_t)) * (r_t - r_s), rescaled as m_t moves,
  KL   = ln2 * (c acc / l_t - lse_t + lse_s),  lse_x = c m_x + log2(l_x).
Backward: dKL_i / dlogit_s(i, j) = p_s(i, j) - p_t(i, j) (sum_j p_t = 1 on a
valid row), so dS = g_i * (p_s - p_t) * scale with p_x = 2**(c r_x - lse_x).
"""

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Initial running max (raw units): finite, so 2**(c (m_old - m_new)) is 1, not
# NaN, while a row has seen only masked keys (-inf); far below any real product.
M_INIT = -1e30


# 2**f on [-1/2, 1/2]: a degree-5 least-squares fit on Chebyshev nodes (relative error <= 2.2e-7
# in float32 Horner form, below MUFU.EX2's 2**-22), lowest degree first.
EXP2_POLY = (1.0000001, 0.69314694, 0.24022122, 0.05550742, 0.00967546, 0.0013266971)
EXP2_POLY_MIN = -126.0  # below this (and -inf, a masked logit) exp2_poly returns 0, as ex2.approx.ftz
_ROUND = 12582912.0  # 1.5 * 2**23: an integer-valued r + _ROUND holds r in its low mantissa bits
# the bits of _ROUND as a float32, as a Python int (Triton lowers no bitcast of a constant)
_ROUND_BITS = int(np.array(_ROUND, np.float32).view(np.int32))


def exp2_poly(x):
    """2**x (float32) without the special-function unit's exp2 and without a float -> int
    conversion (on NVIDIA GPUs both run at the MUFU's rate): r = floor(x + 1/2), 2**(x - r) from
    EXP2_POLY, r added to the exponent bits, read as an integer from the bits of r + 1.5 * 2**23
    (exact: r is an integer). For x <= 127; the kernels pass logits minus their running maximum
    (<= 0). On a GPU whose exponentials wait on the MUFU (relation KL at head_dim 64: two exp2 per
    logit pair), computing one of the two this way moves half of them off it
    (`BlockSizes.exp2_split`). Only operations Pallas lowers to Triton (jnp.round is not one)."""
    xc = jnp.maximum(x, EXP2_POLY_MIN)
    r = jnp.floor(xc + 0.5)
    f = xc - r  # in [-1/2, 1/2)
    p = jnp.full_like(f, EXP2_POLY[-1])
    for coef in EXP2_POLY[-2::-1]:
        p = p * f + coef
    r_bits = lax.bitcast_convert_type(r + _ROUND, jnp.int32) - _ROUND_BITS  # r as an int32
    bits = lax.bitcast_convert_type(p, jnp.int32) + lax.shift_left(r_bits, 23)
    return jnp.where(x < EXP2_POLY_MIN, 0.0, lax.bitcast_convert_type(bits, jnp.float32))


def tile_dot(a, b, contract=(1, 1)):
    """2-D tile product with f32 accumulation, contracting a's axis contract[0]
    with b's axis contract[1] ((1, 1): a @ b.T; (1, 0): a @ b; (0, 0): a.T @ b).
    f32 inputs use exact (non-tf32 / fp32-pass) products."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _col(x, keepdims):
    """A row statistic broadcast against a tile."""
    return x if keepdims else x[..., None]


def init_stats(shape):
    z = jnp.zeros(shape, jnp.float32)
    return (z + M_INIT, z, z + M_INIT, z, z)  # m_s, l_s, m_t, l_t, acc


def online_update(stats, r_s, r_t, diff, c, exp2=jnp.exp2, keepdims=False, exp2_t=None, col=None):
    """Fold one key tile. r_* are masked (-inf); diff = r_t - r_s is unmasked. `exp2_t`: the
    teacher's exponential where it differs from the student's (default `exp2`). `col`: how a row
    statistic is broadcast against the tile (default: a trailing axis; Mosaic GPU passes a
    broadcast_in_dim that keeps its register layout)."""
    exp2_t = exp2_t or exp2
    col = col or (lambda v: _col(v, keepdims))
    m_s, l_s, m_t, l_t, acc = stats
    row_max = lambda x: jnp.max(x, axis=-1, keepdims=keepdims)
    row_sum = lambda x: jnp.sum(x, axis=-1, keepdims=keepdims)
    m_s_new = jnp.maximum(m_s, row_max(r_s))
    m_t_new = jnp.maximum(m_t, row_max(r_t))
    p_s = exp2(r_s * c - col(m_s_new * c))
    p_t = exp2_t(r_t * c - col(m_t_new * c))
    alpha_t = exp2_t((m_t - m_t_new) * c)
    l_s = l_s * exp2((m_s - m_s_new) * c) + row_sum(p_s)
    l_t = l_t * alpha_t + row_sum(p_t)
    acc = acc * alpha_t + row_sum(p_t * diff)
    return m_s_new, l_s, m_t_new, l_t, acc


def finalize(stats, c):
    """-> (kl [nats], lse_s, lse_t [base 2]); rows with no valid key give kl = 0.
    Element-wise, so any statistics shape works."""
    m_s, l_s, m_t, l_t, acc = stats
    has_key = l_t > 0
    l_s = jnp.where(has_key, l_s, 1.0)
    l_t = jnp.where(has_key, l_t, 1.0)
    lse_s = m_s * c + jnp.log2(l_s)
    lse_t = m_t * c + jnp.log2(l_t)
    kl = LN2 * (c * (acc / l_t + (m_s - m_t)) + (jnp.log2(l_s) - jnp.log2(l_t)))
    return jnp.where(has_key, kl, 0.0), lse_s, lse_t


def grad_logits(r_s, r_t, lse_s, lse_t, g_scaled, c, exp2=jnp.exp2, keepdims=False, exp2_t=None, col=None):
    """dKL/d<l, r_> for one tile; g_scaled = g * scale per row; masked r = -inf. `col`: as in
    online_update (a transposed tile passes a broadcast along its second axis)."""
    col = col or (lambda v: _col(v, keepdims))
    p_s = exp2(r_s * c - col(lse_s))
    p_t = (exp2_t or exp2)(r_t * c - col(lse_t))
    return (p_s - p_t) * col(g_scaled)
