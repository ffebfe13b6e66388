"""Relation KL forward as a Pallas Mosaic GPU kernel (Hopper: TMA, wgmma, warp specialisation).

WORK IN PROGRESS (issue 24). Lowered for "cuda" by the CPU tests; NOT YET RUN ON A GPU, so not
reachable from `relation_kl(impl=...)` and not chosen by "auto". The first device call runs
`experiments/check_relation_kl_mgpu.py` (exactness against the float64 reference and the
Triton kernel, then timing); only then does it join the dispatch. Plan and structure:
docs/kernel_notes.md, "Plan for a Mosaic GPU kernel on Hopper".

`forward` returns what the Triton forward returns ([B, H, T] float32 KL rows and the two base-2
LSEs), so its residuals feed the Triton backward (`relation_kl_gpu.backward`) unchanged.

Per program (grid: heads x query-block pairs x batch), three warpgroups:
  * two compute warpgroups, one query block each: TMA-load the block's student and teacher left
    rows once, then per key step two wgmmas into float32 accumulators (s_left . s_right^T and
    t_left . t_right^T), the causal mask on diagonal tiles, and the online statistics of
    `_math.online_update` (both log-sum-exps and the KL accumulator);
  * one memory warpgroup: streams the s_right / t_right tiles of the query head's right-side head
    (GQA: head // group) into a ring of `max_concurrent_steps` shared-memory slots, each with a
    "loaded" barrier (TMA) and a "consumed" barrier (both compute warpgroups arrive).
With causal masking the later query block needs more key steps; the earlier warpgroup keeps
arriving on the consumed barriers of the steps it skips so the ring keeps moving.

Limits (callers check; the Triton kernel covers the rest): bf16/f16 inputs, head dim a multiple
of 64, T a multiple of 2 * block_q and of block_kv, no padding mask or segment ids yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _math

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a jax without Mosaic GPU
    plgpu = None

MIN_BLOCK = 64  # wgmma tiles: blocks and the head dim are multiples of 64


def check_shapes(sl, sr, block_q: int, block_kv: int) -> None:
    """ValueError naming what this kernel cannot take (the caller then uses the Triton kernel)."""
    if plgpu is None:
        raise ValueError("this jax has no Pallas Mosaic GPU (jax.experimental.pallas.mosaic_gpu)")
    B, T, H, D = sl.shape
    if sr.shape[0] != B or sr.shape[1] != T or sr.shape[3] != D or H % sr.shape[2]:
        raise ValueError(f"right side {sr.shape} does not fit left side {sl.shape}")
    if jnp.dtype(sl.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype {sl.dtype}: the Mosaic GPU kernel takes bfloat16 or float16")
    if D % MIN_BLOCK:
        raise ValueError(f"head dim {D} is not a multiple of {MIN_BLOCK}")
    if block_q % MIN_BLOCK or block_kv % MIN_BLOCK:
        raise ValueError(f"blocks ({block_q}, {block_kv}) must be multiples of {MIN_BLOCK}")
    if T % (2 * block_q) or T % block_kv:
        raise ValueError(f"T = {T} must be a multiple of 2 * block_q = {2 * block_q} and of block_kv = {block_kv}")


def _bcast(row, shape):
    """A [rows] statistic (WGMMA row layout) against a [rows, keys] tile."""
    return lax.broadcast_in_dim(row, shape, [0])


def forward(sl, sr, tl, tr, *, scale: float, causal: bool, block_q=64, block_kv=64, max_concurrent_steps=2):
    """(kl, lse_s, lse_t), each [B, H, T] float32, as `relation_kl_gpu.forward` returns them."""
    check_shapes(sl, sr, block_q, block_kv)
    B, T, H, D = sl.shape
    G = H // sr.shape[2]
    dtype = sl.dtype
    c = scale * _math.LOG2E
    n_kv = T // block_kv
    steps = max(2, min(max_concurrent_steps, n_kv))

    def kernel(sl_ref, sr_ref, tl_ref, tr_ref, kl_ref, lss_ref, lst_ref, scoped):
        smem, loaded, consumed, left_barriers = scoped
        left_smem, sr_smem, tr_smem, rows_smem = smem
        sr_loaded, tr_loaded = loaded
        sr_consumed, tr_consumed = consumed
        batch, head = lax.axis_index("batch"), lax.axis_index("heads")
        wg = lax.axis_index("wg")
        pair_base = lax.axis_index("q_seq") * (2 * block_q)
        if causal:  # the later block of the pair needs this many key steps; the ring serves both
            ring_steps = pl.cdiv(pair_base + 2 * block_q, jnp.array(block_kv, jnp.int32))
        else:
            ring_steps = jnp.array(n_kv, jnp.int32)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_base = pair_base + wg * block_q
            own = left_smem.at[wg]  # [2, block_q, D]: student, teacher
            rows_at = (batch, pl.ds(q_base, block_q), head)
            plgpu.copy_gmem_to_smem(sl_ref.at[rows_at], own.at[0], left_barriers.at[2 * wg])
            plgpu.copy_gmem_to_smem(tl_ref.at[rows_at], own.at[1], left_barriers.at[2 * wg + 1])
            plgpu.barrier_wait(left_barriers.at[2 * wg])
            plgpu.barrier_wait(left_barriers.at[2 * wg + 1])
            row = lambda v: plgpu.layout_cast(jnp.full((block_q,), v, jnp.float32), plgpu.Layout.WGMMA.reduce(1))  # noqa: E731
            stats = (row(_math.M_INIT), row(0.0), row(_math.M_INIT), row(0.0), row(0.0))
            kv_steps = pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32)) if causal else ring_steps

            def tile(slot, left, right):
                def body(acc_ref):
                    plgpu.wgmma(acc_ref, left, plgpu.transpose_ref(right.at[slot], (1, 0)))
                    return acc_ref[...]

                return pl.run_scoped(body, plgpu.ACC((block_q, block_kv), jnp.float32))

            def step(kv_step, stats, masked):
                slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                plgpu.barrier_wait(sr_loaded.at[slot])
                r_s = tile(slot, own.at[0], sr_smem)
                plgpu.barrier_arrive(sr_consumed.at[slot])
                plgpu.barrier_wait(tr_loaded.at[slot])
                r_t = tile(slot, own.at[1], tr_smem)
                plgpu.barrier_arrive(tr_consumed.at[slot])
                diff = r_t - r_s
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, r_s.shape, 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, r_s.shape, 1, layout=plgpu.Layout.WGMMA)
                    valid = rows + q_base >= cols + kv_step * block_kv
                    r_s, r_t = jnp.where(valid, r_s, -jnp.inf), jnp.where(valid, r_t, -jnp.inf)
                return _math.online_update(
                    stats, r_s, r_t, diff, c, jnp.exp2, col=functools.partial(_bcast, shape=r_s.shape)
                )

            if causal:
                n_full = lax.div(q_base, jnp.array(block_kv, jnp.int32))  # key tiles left of the diagonal
                stats = lax.fori_loop(0, n_full, functools.partial(step, masked=False), stats)
                stats = lax.fori_loop(n_full, kv_steps, functools.partial(step, masked=True), stats)

                def skip(kv_step, _):  # steps only the other block needs: release their slots
                    slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                    plgpu.barrier_arrive(sr_consumed.at[slot])
                    plgpu.barrier_arrive(tr_consumed.at[slot])

                lax.fori_loop(kv_steps, ring_steps, skip, None)
            else:
                stats = lax.fori_loop(0, kv_steps, functools.partial(step, masked=False), stats)
            kl, lse_s, lse_t = _math.finalize(stats, c)
            out = rows_smem.at[wg]  # [3, block_q]
            for i, v in enumerate((kl, lse_s, lse_t)):
                out.at[i][...] = v
            plgpu.commit_smem()
            for i, ref in enumerate((kl_ref, lss_ref, lst_ref)):
                plgpu.copy_smem_to_gmem(out.at[i], ref.at[batch, head, pl.ds(q_base, block_q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            r_head = lax.div(head, jnp.array(G, head.dtype))

            @pl.loop(0, ring_steps)
            def _(kv_step):
                slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                at = (batch, pl.ds(kv_step * block_kv, block_kv), r_head)

                @pl.when(kv_step >= steps)  # the slot's previous tile has been read by both
                def _():
                    plgpu.barrier_wait(sr_consumed.at[slot])
                    plgpu.barrier_wait(tr_consumed.at[slot])

                plgpu.copy_gmem_to_smem(sr_ref.at[at], sr_smem.at[slot], sr_loaded.at[slot])
                plgpu.copy_gmem_to_smem(tr_ref.at[at], tr_smem.at[slot], tr_loaded.at[slot])

    def entry(sl_ref, sr_ref, tl_ref, tr_ref, kl_ref, lss_ref, lst_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, 2, block_q, D), dtype, transforms=transforms),  # [wg, student/teacher]
            plgpu.SMEM((steps, block_kv, D), dtype, transforms=transforms),
            plgpu.SMEM((steps, block_kv, D), dtype, transforms=transforms),
            plgpu.SMEM((2, 3, block_q), jnp.float32),  # [wg, kl/lse_s/lse_t]
        )
        pl.run_scoped(
            lambda *scoped: kernel(sl_ref, sr_ref, tl_ref, tr_ref, kl_ref, lss_ref, lst_ref, scoped),
            smem,
            (plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=steps)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_barriers=4),  # per warpgroup and side: its left block's TMA
            collective_axes="wg",
        )

    row = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    return plgpu.kernel(
        entry,
        out_type=(row, row, row),
        grid=(H, T // (2 * block_q), B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(sl, sr, tl, tr)
