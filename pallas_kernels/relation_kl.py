"""Row-wise KL between teacher and student relation softmaxes (LinearARD loss).

    kl[b, h, i] = sum_j p_t(i, j) * (log p_t(i, j) - log p_s(i, j)),
    p_x(i, .)   = softmax_j(scale * <x_left[b, i, h], x_right[b, j, h // G]>),

over the valid keys j (causal, key mask, same segment). This file is the public
contract: validation, defaults, padding, dispatch and the custom_vjp wiring. The
kernels live in `xla.py` (pure JAX, linear memory) and `gpu.py` (Pallas/Triton);
`reference.py` is the dense version for tests.

Every implementation module provides the same two functions, on inputs padded
to a multiple of the blocks (T) and to a power of two (D), layout [B, T, H, D]:

    forward(sl, sr, tl, tr, q_ids, k_ids, *, cfg) -> (kl, lse_s, lse_t)   # [B, H, Tp] f32
    backward(sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g, *, cfg) -> (d_sl, d_sr)

where the LSEs are base-2 (log2 of the row sums of 2**(logit * log2 e)), g is the
cotangent of kl (already zero on invalid rows) and q_ids/k_ids (None when nothing
is masked but the causal structure) encode mask and segments: key j is valid for
row i iff q_ids[b, i] == k_ids[b, j]. A future `pallas_tpu` only has to provide
these two functions and a line in `_impl_module`.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "xla", "reference")
# Masked keys carry this id; a valid row never has it unless the caller uses
# INT32_MIN as a segment id (documented limitation).
_KEY_PAD_ID = int(np.iinfo(np.int32).min)
_ROW_PAD_ID = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and Triton launch settings. Blocks must be powers of two (>= 16 on GPU).

  Defaults: the fastest of a sweep on an H200 at T=4096, D=128, bf16
  (docs/kernel_notes.md); 128x128 forward tiles were within noise of 128x64.

  block_q/block_k: forward tiles (also the chunk sizes of the "xla" impl).
  block_q_dq/block_k_dq: tiles of the d_left kernel (grid over query blocks).
  block_q_dk/block_k_dk: tiles of the d_right kernel (grid over key blocks).
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dk: int = 64
  block_k_dk: int = 64
  num_warps_fwd: int = 8
  num_stages_fwd: int = 3
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  fast_exp2: bool = True  # GPU: flush-to-zero ex2.approx instead of libdevice exp2f

  def all_blocks(self):
    return (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq,
            self.block_q_dk, self.block_k_dk)


# The "xla" impl works on whole chunks per loop step: large chunks keep the
# matmuls big and the loop short; memory stays O(block_q * block_k) per head.
XLA_BLOCKS = BlockSizes(block_q=512, block_k=512, block_q_dq=512, block_k_dq=512,
                        block_q_dk=512, block_k_dk=512)
# TPU: one [block_q, block_k] tile per grid step; 128 fills the MXU and the
# lanes. Not tuned (no TPU was available); the Triton-only fields are unused.
TPU_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128,
                        block_q_dk=128, block_k_dk=128)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static (hashable) settings that reach the kernels."""
  impl: str
  causal: bool
  scale: float
  blocks: BlockSizes
  interpret: bool


def _impl_module(impl: str):
  if impl == "pallas_gpu":
    from pallas_kernels import gpu
    return gpu
  if impl == "xla":
    from pallas_kernels import xla
    return xla
  if impl == "pallas_tpu":
    from pallas_kernels import relation_kl_tpu
    return relation_kl_tpu
  raise ValueError(f"impl: no kernel module for {impl!r}")


def _resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "gpu":
    return "pallas_gpu"
  if backend == "tpu":
    return "pallas_tpu"
  return "xla"


def _validate(s_left, s_right, t_left, t_right, mask, segment_ids, causal, scale,
              impl, block_sizes):
  """Raise ValueError naming the bad argument; runs on shapes only (no tracing)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  named = dict(s_left=s_left, s_right=s_right, t_left=t_left, t_right=t_right)
  for name, x in named.items():
    if not hasattr(x, "shape") or len(x.shape) != 4:
      raise ValueError(f"{name} must be a [B, T, H, D] array, got shape "
                       f"{getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
      raise ValueError(f"{name} must be bf16, f16 or f32, got {x.dtype}")
  B, T, H, D = s_left.shape
  Br, Tr, Hr, Dr = s_right.shape
  if (Br, Tr, Dr) != (B, T, D):
    raise ValueError(f"s_right shape {s_right.shape} does not match s_left "
                     f"{s_left.shape} in batch, length or head dim")
  if Hr == 0 or H % Hr:
    raise ValueError(f"s_right heads ({Hr}) must divide s_left heads ({H})")
  if s_right.dtype != s_left.dtype:
    raise ValueError(f"s_right dtype {s_right.dtype} != s_left dtype {s_left.dtype}")
  for t_name, s_name in (("t_left", "s_left"), ("t_right", "s_right")):
    t, s = named[t_name], named[s_name]
    if t.shape != s.shape:
      raise ValueError(f"{t_name} shape {t.shape} != {s_name} shape {s.shape}")
    if t.dtype != s.dtype:
      raise ValueError(f"{t_name} dtype {t.dtype} != {s_name} dtype {s.dtype}")
  if mask is not None:
    if tuple(mask.shape) != (B, T) or mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be a bool [B, T] = {(B, T)} array, got "
                       f"{mask.dtype}{tuple(mask.shape)}")
  if segment_ids is not None:
    if (tuple(segment_ids.shape) != (B, T)
        or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
      raise ValueError(f"segment_ids must be an integer [B, T] = {(B, T)} array, "
                       f"got {segment_ids.dtype}{tuple(segment_ids.shape)}")
  if scale is not None and not (isinstance(scale, numbers.Real) and scale > 0):
    raise ValueError(f"scale must be a positive Python number, got {scale!r}")
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a Python bool, got {causal!r}")
  if block_sizes is not None and not isinstance(block_sizes, (BlockSizes, dict)):
    raise ValueError("block_sizes must be a BlockSizes or a dict of its fields")


def _round_up(x, m):
  return -(-x // m) * m


def _default_blocks(impl, row_bytes):
  if impl == "xla":
    return XLA_BLOCKS
  if impl == "pallas_tpu":
    return TPU_BLOCKS
  # Defaults are tuned for bf16/f16 with D <= 128 (256-byte rows). Wider rows
  # (f32, D = 256) would overflow the 227 KB of shared memory a Hopper block
  # gets, so tiles shrink in proportion and pipelining drops to two stages.
  shrink = max(1, row_bytes // 256)
  if shrink == 1:
    return BlockSizes()
  base = BlockSizes()
  return dataclasses.replace(
      base, num_stages_fwd=2, num_stages_bwd=2,
      **{f.name: max(16, getattr(base, f.name) // shrink)
         for f in dataclasses.fields(base) if f.name.startswith("block_")})


def _pick_blocks(block_sizes, impl, T, row_bytes):
  if block_sizes is None:
    base = _default_blocks(impl, row_bytes)
  elif isinstance(block_sizes, dict):
    base = dataclasses.replace(_default_blocks(impl, row_bytes), **block_sizes)
  else:
    base = block_sizes
  # Short sequences: no tile larger than T rounded up to a power of two.
  cap = max(16, int(pl_next_pow2(T)))
  blocks = dataclasses.replace(base, **{
      f.name: min(getattr(base, f.name), cap)
      for f in dataclasses.fields(base) if f.name.startswith("block_")})
  for b in blocks.all_blocks():
    if b <= 0 or b & (b - 1):
      raise ValueError(f"block_sizes: blocks must be powers of two, got {blocks}")
  if impl == "pallas_tpu":
    # (8, 128) tiling: key blocks are the lane axis of the logit tiles, so a
    # multiple of 128 unless one block spans the whole padded sequence.
    Tp = _round_up(T, max(blocks.all_blocks()))
    keys = (blocks.block_k, blocks.block_k_dq, blocks.block_k_dk)
    if min(blocks.all_blocks()) < 8 or any(k % 128 and k != Tp for k in keys):
      raise ValueError("block_sizes: pallas_tpu needs blocks >= 8 and key blocks "
                       f"that are multiples of 128 (or span T), got {blocks}")
  return blocks


def pl_next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def relation_kl(s_left, s_right, t_left, t_right, *, mask=None, segment_ids=None,
                causal=True, scale=None, impl="auto", interpret=False,
                block_sizes=None):
  """Per-row KL(teacher || student) of relation softmaxes, [B, H, T] float32.

  Inputs are [B, T, H, D] (right sides [B, T, H_right, D], H_right | H) in bf16,
  f16 or f32. Gradients flow to s_left and s_right only. Rows that are masked,
  or have no valid key, give 0. The caller does any averaging.
  """
  _validate(s_left, s_right, t_left, t_right, mask, segment_ids, causal, scale,
            impl, block_sizes)
  B, T, H, D = s_left.shape
  scale = float(D ** -0.5 if scale is None else scale)
  impl = _resolve_impl(impl)
  t_left = jax.lax.stop_gradient(t_left)
  t_right = jax.lax.stop_gradient(t_right)
  if impl == "reference":
    from pallas_kernels.reference import relation_kl_reference
    return relation_kl_reference(s_left, s_right, t_left, t_right, mask=mask,
                                 segment_ids=segment_ids, causal=causal,
                                 scale=scale)
  Dp = max(16, pl_next_pow2(D))  # Triton tiles are powers of two; zeros add nothing
  blocks = _pick_blocks(block_sizes, impl, T, Dp * jnp.dtype(s_left.dtype).itemsize)
  cfg = Config(impl=impl, causal=bool(causal), scale=scale, blocks=blocks,
               interpret=bool(interpret))
  _impl_module(impl)  # fail early on an unavailable impl

  Tp = _round_up(T, max(blocks.all_blocks()))
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D))
  sl, sr, tl, tr = (jnp.pad(x, pad) if pad != ((0, 0),) * 4 else x
                    for x in (s_left, s_right, t_left, t_right))

  row_valid = None
  q_ids = k_ids = None
  if mask is not None or segment_ids is not None or Tp != T:
    seg = (jnp.zeros((B, T), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    valid = jnp.ones((B, T), bool) if mask is None else mask
    q_ids = jnp.where(valid, seg, _ROW_PAD_ID)
    k_ids = jnp.where(valid, seg, _KEY_PAD_ID)
    q_ids = jnp.pad(q_ids, ((0, 0), (0, Tp - T)), constant_values=_ROW_PAD_ID)
    k_ids = jnp.pad(k_ids, ((0, 0), (0, Tp - T)), constant_values=_KEY_PAD_ID)
    if mask is not None:
      row_valid = mask[:, None, :]

  kl = _relation_kl_padded(cfg, sl, sr, tl, tr, q_ids, k_ids)[:, :, :T]
  if row_valid is not None:
    kl = jnp.where(row_valid, kl, 0.0)
  return kl


def self_relation_kl(student, teacher, **kw):
  """The LinearARD case: relation of a tensor with itself (e.g. Q·Qᵀ)."""
  return relation_kl(student, student, teacher, teacher, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _relation_kl_padded(cfg: Config, sl, sr, tl, tr, q_ids, k_ids):
  kl, _, _ = _impl_module(cfg.impl).forward(sl, sr, tl, tr, q_ids, k_ids, cfg=cfg)
  return kl


def _fwd(cfg: Config, sl, sr, tl, tr, q_ids, k_ids):
  kl, lse_s, lse_t = _impl_module(cfg.impl).forward(
      sl, sr, tl, tr, q_ids, k_ids, cfg=cfg)
  return kl, (sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t)


def _bwd(cfg: Config, res: Any, g):
  sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t = res
  d_sl, d_sr = _impl_module(cfg.impl).backward(
      sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g.astype(jnp.float32), cfg=cfg)
  # The teacher is frozen: its cotangent is zeros; ids are integers (None).
  return (d_sl.astype(sl.dtype), d_sr.astype(sr.dtype), jnp.zeros_like(tl),
          jnp.zeros_like(tr), None, None)


_relation_kl_padded.defvjp(_fwd, _bwd)
