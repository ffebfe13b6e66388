"""`pl.CostEstimate`s of the relation_kl kernels (the convention of docs/kernel_notes.md).

Counted on the shapes a pallas_call receives (padded T and D; the TPU backend
passes its lane-padded D), per kernel:

  pairs            = B * H * T^2 / 2 if causal else B * H * T^2   (H: query heads)
  flops            = 2 * D * pairs * MATMULS[kernel]
                     forward 2 (student and teacher logits), d_left and d_right
                     3 each (both logit tiles recomputed + one gradient matmul):
                     forward 2*T^2*D*H, backward 6*T^2*D*H for causal B = 1
  transcendentals  = 2 * pairs   (one exp2 per pair for each softmax; the per-row
                     rescales and log2s are O(T) and not counted)
  bytes_accessed   = every operand read once + every result written once (the
                     compulsory HBM traffic; re-reads of right-side tiles are not
                     counted)

The causal half square is the convention: the diagonal tiles run in full, so
the kernels execute slightly more. Under `jax.vmap`, pallas_call's batching rule
scales the estimate by the axis size. Built with keyword arguments only
(flops / transcendentals / bytes_accessed, the fields of jax 0.10's
pl.CostEstimate; remote_bytes_transferred keeps its default).
"""

from __future__ import annotations

import math

import numpy as np
from jax.experimental import pallas as pl

MATMULS = {"fwd": 2, "dleft": 3, "dright": 3, "dfused": 4}  # dfused: BlockSizes(fused_bwd=True)
EXP2_PER_PAIR = 2


def num_pairs(B: int, H: int, T: int, causal: bool) -> int:
    """(row, key) pairs a kernel visits: the causal half square or the square."""
    n = int(B) * int(H) * int(T) * int(T)
    return n // 2 if causal else n


def flops(kernel: str, *, B: int, H: int, T: int, D: int, causal: bool) -> int:
    return 2 * int(D) * MATMULS[kernel] * num_pairs(B, H, T, causal)


def transcendentals(*, B: int, H: int, T: int, causal: bool) -> int:
    return EXP2_PER_PAIR * num_pairs(B, H, T, causal)


def _nbytes(x) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def estimate(kernel: str, *, B: int, H: int, T: int, D: int, causal: bool, operands, outputs) -> pl.CostEstimate:
    """CostEstimate of one kernel; operands/outputs: arrays or ShapeDtypeStructs."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return pl.CostEstimate(
        flops=flops(kernel, B=B, H=H, T=T, D=D, causal=causal),
        transcendentals=transcendentals(B=B, H=H, T=T, causal=causal),
        bytes_accessed=sum(_nbytes(x) for x in (*operands, *outputs)),
    )
