"""Relation KL as Pallas Mosaic GPU kernels (Hopper: TMA, wgmma, warp specialisation).

`relation_kl(impl="pallas_mgpu")` (`forward` and `backward` at the end of this file follow
relation_kl.py's kernel contract); "auto" picks it on Hopper at head dims 64 and 128 (bf16/f16). Measured on
an H200 (`experiments/check_relation_kl_mgpu.py`; docs/raw/check_mgpu_*_h200_*.json): agrees with
the Triton kernels to bf16 rounding (KL rows to 1e-6, d_left 1e-3, d_right 4e-3 on GQA shapes: bf16
per query head before the group sum) and with a float64 reference at T <= 2048, through the API
with key masks, segment ids and padded lengths. With the one-kernel backward (the default blocks)
forward + backward takes 0.85x the Triton kernels' time and 1.10x cuDNN attention's at T 4096,
32/8 heads, D 128, and 0.91x / 1.23x at T 8192, 9/3 heads, D 64 (2026-12-05).
Plan and state: docs/kernel_notes.md, "A Mosaic GPU kernel on Hopper".

`mosaic_forward` returns what the Triton forward returns ([B, H, T] float32 KL rows and the two
base-2 LSEs), so its residuals feed either backward. `mosaic_backward_fused` (BlockSizes.fused_bwd,
on in the default blocks) runs d_right's grid and adds each tile's d_left share by a TMA reduce-add;
`mosaic_backward` runs two kernels (d_left over query blocks, d_right over key blocks). Both skip
the tiles above the diagonal. (A first backward through `plgpu.emit_pipeline_warp_specialized`,
which computes every tile, ran 1.5-1.7x slower at T >= 4096 and was removed: docs/kernel_notes.md.)

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
`BlockSizes.schedule_barrier` (off until measured) adds FlashAttention-3's ping-pong: the compute
warpgroups meet after issuing a step's logit wgmmas and after its exponentials (`_PingPong`), so one
warpgroup's wgmmas overlap the other's exponentials. `ABLATIONS` (timing only) leave one stage out
(`experiments/ablate_relation_kl_mgpu.py`).

Limits (`unsupported_reason`; the Triton kernel covers the rest): bf16/f16 inputs, head dim a
multiple of 64 whose tiles fit in shared memory (64 and 128), T a multiple of 2 * block_q and
2 * block_kv (relation_kl pads; padding, key masks and segment ids arrive as ids).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _math
from pallas_kernels.blocks import MGPU_MIN_BLOCK

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a jax without Mosaic GPU
    plgpu = None

MIN_BLOCK = MGPU_MIN_BLOCK  # wgmma tiles: blocks and the head dim are multiples of 64


def check_shapes(sl, sr, block_q: int, block_kv: int) -> None:
    """ValueError naming what this kernel cannot take (the caller then uses the Triton kernel)."""
    B, T, H, D = sl.shape
    if sr.shape[0] != B or sr.shape[1] != T or sr.shape[3] != D or H % sr.shape[2]:
        raise ValueError(f"right side {sr.shape} does not fit left side {sl.shape}")
    reason = unsupported_reason(sl.shape, sl.dtype, interpret=False, block_q=block_q, block_kv=block_kv)
    if reason:
        raise ValueError(reason)


def _bcast(row, shape):
    """A [rows] statistic (WGMMA row layout) against a [rows, keys] tile."""
    return lax.broadcast_in_dim(row, shape, [0])


def _tile(left, right):
    """left @ right^T of two shared-memory tiles by one wgmma, float32 (WGMMA layout)."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, left, plgpu.transpose_ref(right, (1, 0)))
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((left.shape[0], right.shape[0]), jnp.float32))


def _tile_pair(left_s, right_s, left_t, right_t, after_issue=None, second=True):
    """(left_s @ right_sᵀ, left_t @ right_tᵀ): both wgmmas issued before either is waited for;
    `after_issue` (the schedule barrier's meeting) runs between issuing and waiting. second=False
    (ABLATIONS' "teacher_logits"): the first product stands in for both."""

    def body(acc_s, acc_t):
        plgpu.wgmma(acc_s, left_s, plgpu.transpose_ref(right_s, (1, 0)))
        if second:
            plgpu.wgmma(acc_t, left_t, plgpu.transpose_ref(right_t, (1, 0)))
        if after_issue is not None:
            after_issue()
        a = acc_s[...]
        return a, (acc_t[...] if second else a)

    shape = (left_s.shape[0], right_s.shape[0])
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


class _OverlappedLogits:
    """A compute warpgroup's logit tiles, issued a step ahead (`mosaic_forward(overlap_softmax=True)`,
    FlashAttention-3's intra-warpgroup overlap): `issue(kv)` waits for key step kv's tiles and starts
    the student's and the teacher's wgmma into the two accumulators, whose work then runs under the
    caller's softmax of step kv - 1; `read(kv)` waits for them and returns (student tile, teacher
    tile, key ids or None) as values, and releases the step's ring slot. Every ring barrier is
    waited on and arrived at once per use, in the same order as without the overlap."""

    def __init__(self, accs, own, rings, loaded, consumed, key_ids, steps, second=True):
        self.accs, self.own, self.rings, self.loaded, self.consumed = accs, own, rings, loaded, consumed
        self.key_ids, self.steps = key_ids, steps  # key_ids: (ids ring, its loaded barriers) or None
        self.second = second  # False: ABLATIONS' "teacher_logits" (the student's tile for both)

    @classmethod
    def scoped(cls, run, shape, own, rings, loaded, consumed=(), key_ids=None, *, steps, second=True):
        """run(logits) with its two [shape] float32 accumulators allocated around it. `consumed`: the
        slots' release barriers, arrived at by `read` (() where the caller releases the slot)."""
        return pl.run_scoped(
            lambda acc_s, acc_t: run(cls((acc_s, acc_t), own, rings, loaded, consumed, key_ids, steps, second)),
            plgpu.ACC(shape, jnp.float32),
            plgpu.ACC(shape, jnp.float32),
        )

    def _slot(self, kv):
        return lax.rem(kv, jnp.array(self.steps, kv.dtype))

    def issue(self, kv):
        slot = self._slot(kv)
        zeros = plgpu.layout_cast(jnp.zeros(self.accs[0].shape, jnp.float32), plgpu.Layout.WGMMA)
        for i, (acc, ring, loaded) in enumerate(zip(self.accs, self.rings, self.loaded)):
            plgpu.barrier_wait(loaded.at[slot])
            if i == 0 or self.second:
                acc[...] = zeros  # wgmma accumulates
                plgpu.wgmma(acc, self.own.at[i], plgpu.transpose_ref(ring.at[slot], (1, 0)))

    def read(self, kv):
        slot = self._slot(kv)
        key_ids = None
        if self.key_ids is not None:  # read before the slot is released
            ids_ring, ids_loaded = self.key_ids
            plgpu.barrier_wait(ids_loaded.at[slot])
            key_ids = _load_ids(ids_ring.at[slot], 1)
        r_s = plgpu.wgmma_accumulator_load(self.accs[0], wait_n=0)
        r_t = plgpu.wgmma_accumulator_load(self.accs[1], wait_n=None) if self.second else r_s
        for consumed in self.consumed:
            plgpu.barrier_arrive(consumed.at[slot])
        return r_s, r_t, key_ids


# Timing instrumentation (`ablate=` of mosaic_forward / mosaic_backward_fused): leave one stage's
# work out, so that time differences say what bounds a kernel where no hardware counters can be
# read (docs/kernel_notes.md). The results are wrong on purpose; never for training.
#   "exp": every exponential becomes one FMA (the MUFU's work moves to the FMA pipes);
#   "teacher_logits": the student's logit tile stands in for the teacher's (one wgmma per step
#     fewer; the teacher's tiles are still loaded);
#   "d_left": the fused backward skips d_left's wgmma and its reduce-add (and the dSᵀ tile's
#     store to shared memory that feeds them).
ABLATIONS = ("exp", "teacher_logits", "d_left")


def _check_ablate(ablate, allowed=ABLATIONS):
    bad = sorted(set(ablate) - set(allowed))
    if bad:
        raise ValueError(f"ablate: {bad} not in {allowed}")
    return frozenset(ablate)


def _exp2_for(ablate):
    return (lambda x: x * 0.5 + 1.0) if "exp" in ablate else jnp.exp2


class _PingPong:
    """FlashAttention-3's schedule barrier between the two compute warpgroups (`barrier`: one of
    two arrivals; None: off, and every method emits nothing). A meeting is an arrival and a wait
    for the other warpgroup's. Per ring step a warpgroup meets twice, after issuing its logit
    wgmmas (`meet`, passed to `_tile_pair`) and after its exponentials (`after_exponentials`);
    a step it skips still holds both (`skipped_step`). Warpgroup 1 meets once before its loops
    (`before_loops`) and warpgroup 0 once after them (`after_loops`), so warpgroup 1 runs a meeting
    ahead: its wgmmas overlap 0's exponentials and the other way round. Both meet 2 x ring steps
    + 1 times, or the kernel hangs."""

    def __init__(self, barrier, wg):
        self.barrier, self.wg = barrier, wg

    def meet(self):
        if self.barrier is not None:
            plgpu.barrier_arrive(self.barrier)
            plgpu.barrier_wait(self.barrier)

    def after_exponentials(self, values):
        """`values`, kept before the meeting by an optimization barrier."""
        if self.barrier is None:
            return values
        values = lax.optimization_barrier(values)
        self.meet()
        return values

    def skipped_step(self):
        self.meet()
        self.meet()

    def before_loops(self):
        if self.barrier is not None:
            pl.when(self.wg == 1)(self.meet)

    def after_loops(self):
        if self.barrier is not None:
            pl.when(self.wg == 0)(self.meet)


def _causal_mask(r, row0, col0, transposed=False):
    """-inf above the diagonal of a tile whose rows start at row0 and columns at col0
    (transposed: rows are keys, columns queries)."""
    rows = plgpu.broadcasted_iota(jnp.int32, r.shape, 0, layout=plgpu.Layout.WGMMA) + row0
    cols = plgpu.broadcasted_iota(jnp.int32, r.shape, 1, layout=plgpu.Layout.WGMMA) + col0
    return jnp.where(cols >= rows if transposed else rows >= cols, r, -jnp.inf)


def _same_segment(tiles, row_ids, col_ids):
    """The tiles with -inf where their row and column ids differ (relation_kl's key mask and
    segments: key j is valid for row i iff q_ids[i] == k_ids[j]). row_ids: [rows] (WGMMA row
    layout), col_ids: [cols]; one mask for all the tiles."""
    shape = tiles[0].shape
    same = lax.broadcast_in_dim(row_ids, shape, [0]) == lax.broadcast_in_dim(col_ids, shape, [1])
    return tuple(jnp.where(same, r, -jnp.inf) for r in tiles)


def _pad(refs, n):
    """`refs` (a tuple of scoped refs, or one) padded with None to n: the ids buffers a kernel
    without ids does not allocate."""
    refs = tuple(refs) if isinstance(refs, (tuple, list)) else (refs,)
    return refs + (None,) * (n - len(refs))


def _backward_entry(
    body, has_ids, smem, ids_smem, *, n_loaded, steps, own_barriers, schedule_barrier=False, merge_d_left=False
):
    """plgpu.kernel's entry for a backward kernel `body(*inputs, qid, kid, out, scoped)`: scoped
    refs (shared memory, the ring's "loaded" barriers, its "consumed" barrier, the own block's
    barriers, with `schedule_barrier` the compute warpgroups' meeting barrier, and with
    `merge_d_left` the merged d_left's "dS written" (both warpgroups arrive) and "dS read" (the
    step's owner arrives) barriers, one of each per owner), with None for the ids buffers and
    their loaded barrier when there are no ids."""

    def entry(*refs):
        ins, out = refs[:-1], refs[-1]
        ins = ins if has_ids else (*ins, None, None)
        n_smem = len(smem) + len(ids_smem)
        pl.run_scoped(
            lambda buffers, loaded, *rest: body(*ins, out, (_pad(buffers, n_smem), _pad(loaded, n_loaded + 1), *rest)),
            (*smem, *(ids_smem if has_ids else ())),
            tuple(plgpu.Barrier(num_barriers=steps) for _ in range(n_loaded + int(has_ids))),
            plgpu.Barrier(num_arrivals=2, num_barriers=steps),
            plgpu.Barrier(num_barriers=own_barriers),
            *((plgpu.Barrier(num_arrivals=2),) if schedule_barrier else ()),
            *((plgpu.Barrier(num_arrivals=2, num_barriers=2), plgpu.Barrier(num_barriers=2)) if merge_d_left else ()),
            collective_axes="wg",
        )

    entry.__name__ = f"relation_kl_mgpu_{body.__name__}"  # the kernel's name in profiles (trace_summary's "relation")
    return entry


def _kernel_accumulating_into(entry, acc, out_type, mesh, params):
    """A Mosaic kernel `entry(acc_ref, *input_refs, out_ref)` that adds into `acc` (its first
    argument, aliased to its second output): a call returns (out, acc after the kernel).

    pl.kernel takes such an accumulator as a `jax.new_ref`, but its ref discharge re-traces the
    body as JAX's `new_body`, and the Mosaic GPU lowering names the CUDA kernel after that
    (`new_body_mosaic_gpu_kernel`, found in the SASS by experiments/sass_relation_kl.py), so a
    profile could not tell the relation loss's backward from anything else. The discharged form
    written out here (the accumulator an input aliased to an output, the body reading the input's
    ref) keeps `entry.__name__`; it needs jax's `_mpmd_map`, and without it (another jax) the ref
    form runs instead."""
    try:
        from jax._src.pallas import mpmd
    except ImportError:  # pragma: no cover - a jax without the module
        mpmd = None
    if mpmd is None or not hasattr(mpmd, "_mpmd_map"):  # pragma: no cover

        def call_with_ref(acc_value, *args):
            ref = jax.new_ref(acc_value)
            out = pl.kernel(entry, out_type=out_type, mesh=mesh, compiler_params=params, name=entry.__name__)(
                ref, *args
            )
            return out, ref[...]

        return call_with_ref

    def aliased(acc_in, *refs):
        *ins, out, _acc_out = refs  # the output ref aliases acc_in's buffer (as the discharge does)
        entry(acc_in, *ins, out)

    aliased.__name__ = entry.__name__
    acc_type = jax.ShapeDtypeStruct(acc.shape, acc.dtype)
    return mpmd._mpmd_map(
        [(mesh, aliased)],
        (out_type, acc_type),
        input_output_aliases={0: 1},
        compiler_params=params,
        name=entry.__name__,
    )


def _load_ids(ref, axis):
    """[n] int32 ids from shared memory in the layout of a tile's rows (axis 0) or columns (1)."""
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - axis))


def mosaic_forward(
    sl,
    sr,
    tl,
    tr,
    q_ids=None,
    k_ids=None,
    *,
    scale: float,
    causal: bool,
    block_q=64,
    block_kv=64,
    max_concurrent_steps=2,
    schedule_barrier=False,
    pair_wgmmas=None,
    overlap_softmax=False,
    ablate=(),
):
    """(kl, lse_s, lse_t), each [B, H, T] float32, as `relation_kl_gpu.forward` returns them.
    q_ids / k_ids ([B, T] int32, both or neither): key j is valid for row i iff they are equal
    (relation_kl's encoding of the key mask, segments and padding), on top of `causal`.
    schedule_barrier: a step's two logit wgmmas are issued together and the compute warpgroups
    ping-pong (`_PingPong`; BlockSizes.schedule_barrier). pair_wgmmas (default: schedule_barrier):
    the two logit wgmmas issued together, with or without the ping-pong (an A/B of the two
    halves of the change). overlap_softmax: each step reads its logit tiles (issued by the step
    before), issues the next step's wgmmas into the same accumulators and runs its softmax while
    they run (FlashAttention-3's intra-warpgroup overlap; `_OverlappedLogits`); not with the
    ping-pong. ablate: timing only (ABLATIONS)."""
    pair = schedule_barrier if pair_wgmmas is None else bool(pair_wgmmas)
    if overlap_softmax and (schedule_barrier or pair):
        raise ValueError("overlap_softmax: not with schedule_barrier or pair_wgmmas (one schedule at a time)")
    ablate = _check_ablate(ablate, ("exp", "teacher_logits"))
    exp2 = _exp2_for(ablate)
    check_shapes(sl, sr, block_q, block_kv)
    has_ids = q_ids is not None
    B, T, H, D = sl.shape
    G = H // sr.shape[2]
    dtype = sl.dtype
    c = scale * _math.LOG2E
    n_kv = T // block_kv
    steps = max(2, min(max_concurrent_steps, n_kv))

    def kernel(sl_ref, sr_ref, tl_ref, tr_ref, qid_ref, kid_ref, kl_ref, lss_ref, lst_ref, scoped):
        smem, loaded, consumed, left_barriers, *sched = scoped
        left_smem, sr_smem, tr_smem, rows_smem, qid_smem, kid_smem = smem
        sr_loaded, tr_loaded, kid_loaded = loaded
        sr_consumed, tr_consumed = consumed
        batch, head = lax.axis_index("batch"), lax.axis_index("heads")
        wg = lax.axis_index("wg")
        ping_pong = _PingPong(sched[0] if schedule_barrier else None, wg)
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
            if has_ids:
                plgpu.copy_gmem_to_smem(
                    qid_ref.at[batch, pl.ds(q_base, block_q)], qid_smem.at[wg], left_barriers.at[4 + wg]
                )
            plgpu.barrier_wait(left_barriers.at[2 * wg])
            plgpu.barrier_wait(left_barriers.at[2 * wg + 1])
            own_ids = None
            if has_ids:
                plgpu.barrier_wait(left_barriers.at[4 + wg])
                own_ids = _load_ids(qid_smem.at[wg], 0)
            row = lambda v: plgpu.layout_cast(jnp.full((block_q,), v, jnp.float32), plgpu.Layout.WGMMA.reduce(1))  # noqa: E731
            stats = (row(_math.M_INIT), row(0.0), row(_math.M_INIT), row(0.0), row(0.0))
            kv_steps = pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32)) if causal else ring_steps
            ping_pong.before_loops()

            def softmax(kv_step, stats, r_s, r_t, key_ids, masked):
                diff = r_t - r_s
                if masked:
                    k0 = kv_step * block_kv
                    r_s, r_t = _causal_mask(r_s, q_base, k0), _causal_mask(r_t, q_base, k0)
                if has_ids:
                    r_s, r_t = _same_segment((r_s, r_t), own_ids, key_ids)
                stats = _math.online_update(
                    stats, r_s, r_t, diff, c, exp2, col=functools.partial(_bcast, shape=r_s.shape)
                )
                return ping_pong.after_exponentials(stats)

            def step(kv_step, stats, masked):
                slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                key_ids = None
                if has_ids:  # read before this warpgroup releases the slot
                    plgpu.barrier_wait(kid_loaded.at[slot])
                    key_ids = _load_ids(kid_smem.at[slot], 1)
                plgpu.barrier_wait(sr_loaded.at[slot])
                if pair:
                    plgpu.barrier_wait(tr_loaded.at[slot])
                    second = "teacher_logits" not in ablate
                    r_s, r_t = _tile_pair(
                        own.at[0], sr_smem.at[slot], own.at[1], tr_smem.at[slot], ping_pong.meet, second
                    )
                    plgpu.barrier_arrive(sr_consumed.at[slot])
                    plgpu.barrier_arrive(tr_consumed.at[slot])
                else:
                    r_s = _tile(own.at[0], sr_smem.at[slot])
                    plgpu.barrier_arrive(sr_consumed.at[slot])
                    plgpu.barrier_wait(tr_loaded.at[slot])
                    r_t = r_s if "teacher_logits" in ablate else _tile(own.at[1], tr_smem.at[slot])
                    plgpu.barrier_arrive(tr_consumed.at[slot])
                return softmax(kv_step, stats, r_s, r_t, key_ids, masked)

            def overlapped_step(kv_step, carry, masked, logits):
                """The softmax of step kv_step (its tiles read by the step before) under the wgmmas
                of step kv_step + 1, which are waited on and read before the loop's back edge (an
                accumulator in flight across it makes ptxas serialize every wgmma: its loop-carried
                copies read the accumulator registers)."""
                stats, r_s, r_t, key_ids = carry
                logits.issue(kv_step + 1)
                stats = softmax(kv_step, stats, r_s, r_t, key_ids, masked)
                return (stats, *logits.read(kv_step + 1))

            def loops(stats, logits=None):
                """Steps [0, kv_steps), without the diagonal's mask left of it (causal). With
                `logits` (overlap_softmax): every step but the last issues the next one's wgmmas
                before its softmax."""
                n_full = lax.div(q_base, jnp.array(block_kv, jnp.int32)) if causal else kv_steps
                if logits is None:
                    stats = lax.fori_loop(0, n_full, functools.partial(step, masked=False), stats)
                    if causal:
                        stats = lax.fori_loop(n_full, kv_steps, functools.partial(step, masked=True), stats)
                    return stats
                first = jnp.array(0, jnp.int32)
                logits.issue(first)  # kv_steps >= 1 always
                carry = (stats, *logits.read(first))
                last = kv_steps - 1  # causal: the diagonal's last tile (kv_steps > n_full)
                run = functools.partial(overlapped_step, logits=logits)
                carry = lax.fori_loop(0, jnp.minimum(n_full, last), functools.partial(run, masked=False), carry)
                if causal:
                    carry = lax.fori_loop(n_full, last, functools.partial(run, masked=True), carry)
                return softmax(last, *carry, masked=causal)

            if overlap_softmax:
                stats = _OverlappedLogits.scoped(
                    functools.partial(loops, stats),
                    (block_q, block_kv),
                    own,
                    (sr_smem, tr_smem),
                    (sr_loaded, tr_loaded),
                    (sr_consumed, tr_consumed),
                    (kid_smem, kid_loaded) if has_ids else None,
                    steps=steps,
                    second="teacher_logits" not in ablate,
                )
            else:
                stats = loops(stats)
            if causal:

                def skip(kv_step, _):  # steps only the other block needs: release their slots
                    # Wait for the step's data first: it is loaded only after the slot's previous
                    # use was released by both warpgroups, so this arrival counts toward this
                    # step's release and never completes the previous one while the other
                    # warpgroup is still reading it.
                    slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                    if has_ids:
                        plgpu.barrier_wait(kid_loaded.at[slot])
                    plgpu.barrier_wait(sr_loaded.at[slot])
                    plgpu.barrier_arrive(sr_consumed.at[slot])
                    plgpu.barrier_wait(tr_loaded.at[slot])
                    plgpu.barrier_arrive(tr_consumed.at[slot])
                    ping_pong.skipped_step()

                lax.fori_loop(kv_steps, ring_steps, skip, None)
            ping_pong.after_loops()
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
            at = lambda i: (batch, pl.ds(i * block_kv, block_kv), r_head)  # noqa: E731
            copies = [
                (lambda i: sr_ref.at[at(i)], sr_smem, sr_loaded),
                (lambda i: tr_ref.at[at(i)], tr_smem, tr_loaded),
            ]
            if has_ids:
                copies.append((lambda i: kid_ref.at[batch, pl.ds(i * block_kv, block_kv)], kid_smem, kid_loaded))
            _ring_load(ring_steps, steps, copies, (sr_consumed, tr_consumed))

    def entry(*refs):
        ins, outs = (refs[:6], refs[6:]) if has_ids else ((*refs[:4], None, None), refs[4:])
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        ids_smem = (plgpu.SMEM((2, block_q), jnp.int32), plgpu.SMEM((steps, block_kv), jnp.int32))
        smem = (
            plgpu.SMEM((2, 2, block_q, D), dtype, transforms=transforms),  # [wg, student/teacher]
            plgpu.SMEM((steps, block_kv, D), dtype, transforms=transforms),
            plgpu.SMEM((steps, block_kv, D), dtype, transforms=transforms),
            plgpu.SMEM((2, 3, block_q), jnp.float32),  # [wg, kl/lse_s/lse_t]
            *(ids_smem if has_ids else ()),
        )
        pl.run_scoped(  # None for the ids buffers and their loaded barrier without ids
            lambda buffers, loaded, *rest: kernel(*ins, *outs, (_pad(buffers, 6), _pad(loaded, 3), *rest)),
            smem,
            (plgpu.Barrier(num_barriers=steps),) * (3 if has_ids else 2),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_barriers=6 if has_ids else 4),  # per warpgroup: its block's TMA copies
            *((plgpu.Barrier(num_arrivals=2),) if schedule_barrier else ()),  # the compute warpgroups' meetings
            collective_axes="wg",
        )

    entry.__name__ = "relation_kl_mgpu_fwd"  # the kernel's name in profiles (trace_summary's "relation")
    row = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    return plgpu.kernel(
        entry,
        out_type=(row, row, row),
        grid=(H, T // (2 * block_q), B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(sl, sr, tl, tr, *((q_ids.astype(jnp.int32), k_ids.astype(jnp.int32)) if has_ids else ()))


def _ring_load(n_steps, steps, copies, consumed):
    """The memory warpgroup's loop: step i's tiles (`copies`: (source view of step i, shared-memory
    ring, its "loaded" barriers)) go into slot i % steps once both compute warpgroups released
    the slot's previous tiles on `consumed` (one barrier, or a tuple: every one of them)."""

    @pl.loop(0, n_steps)
    def _(i):
        slot = lax.rem(i, jnp.array(steps, i.dtype))

        @pl.when(i >= steps)
        def _():
            for bar in consumed if isinstance(consumed, tuple) else (consumed,):
                plgpu.barrier_wait(bar.at[slot])

        for source, ring, loaded in copies:
            plgpu.copy_gmem_to_smem(source(i), ring.at[slot], loaded.at[slot])


def _ring_skip(lo, hi, steps, loaded, consumed, per_step=None):
    """Steps [lo, hi) of the ring that this compute warpgroup does not need: release their slots.
    Each step's data is waited for first (it is loaded only after the slot's previous use was
    released by both warpgroups), so this arrival counts toward this step, and every barrier's
    phase stays in step with the other warpgroup's. `per_step`: also run per skipped step (the
    schedule barrier's meetings of a step)."""

    def body(i, _):
        slot = lax.rem(i, jnp.array(steps, i.dtype))
        for bar in loaded:
            plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        if per_step is not None:
            per_step()

    lax.fori_loop(lo, hi, body, None)


def _wgmma_add(acc, a, b_smem, dtype):
    """acc + a @ b (a from registers, cast to the inputs' dtype; b a shared-memory tile)."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a.astype(dtype), b_smem)

    return pl.run_state(body)(plgpu.ACC.init(acc))


def mosaic_backward(
    sl,
    sr,
    tl,
    tr,
    lse_s,
    lse_t,
    g,
    q_ids=None,
    k_ids=None,
    *,
    scale: float,
    causal: bool,
    block_q=64,
    block_kv=64,
    max_concurrent_steps=2,
):
    """(d_sl, d_sr) of sum(g * kl) given the forward's base-2 LSEs, as `relation_kl_gpu.backward`
    computes them, with causal tile skipping: d_left over query blocks (each program streams the
    key tiles up to its later block's diagonal), d_right over key blocks (each streams the query
    tiles from its earlier block's diagonal on); one output per query head, groups summed after
    the kernel. The ring is the forward's: a memory warpgroup, two compute warpgroups, a slot
    released when both have read it (a warpgroup arrives on the steps it does not need).
    q_ids / k_ids: as `mosaic_forward`'s (each program holds its own block's ids and streams the
    other side's with the tiles)."""
    check_shapes(sl, sr, block_q, block_kv)
    has_ids = q_ids is not None
    ids = (q_ids.astype(jnp.int32), k_ids.astype(jnp.int32)) if has_ids else ()
    n_own = 6 if has_ids else 5  # d_left's TMA copies per warpgroup: two tiles, three rows[, ids]
    B, T, H, D = sl.shape
    Hr = sr.shape[2]
    G = H // Hr
    dtype = sl.dtype
    c = scale * _math.LOG2E
    n_q, n_kv = T // block_q, T // block_kv
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    params = plgpu.CompilerParams(approx_math=True)
    g_scaled = g * scale
    ring = lambda n, rows: max(2, min(max_concurrent_steps, n))  # noqa: E731

    # ---- d_left: one query block per compute warpgroup, the right side streamed
    s_left = ring(n_kv, block_kv)

    def dleft(sl_ref, sr_ref, tl_ref, tr_ref, lss_ref, lst_ref, g_ref, qid_ref, kid_ref, dl_ref, scoped):
        (own2, rows2, sr_ring, tr_ring, qid2, kid_ring), loaded, consumed, bars = scoped
        sr_loaded, tr_loaded, kid_loaded = loaded
        batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        pair_base = lax.axis_index("q_seq") * (2 * block_q)
        kv_block = jnp.array(block_kv, jnp.int32)
        ring_steps = pl.cdiv(pair_base + 2 * block_q, kv_block) if causal else jnp.array(n_kv, jnp.int32)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_base = pair_base + wg * block_q
            own, rows = own2.at[wg], rows2.at[wg]
            at = (batch, pl.ds(q_base, block_q), head)
            plgpu.copy_gmem_to_smem(sl_ref.at[at], own.at[0], bars.at[n_own * wg])
            plgpu.copy_gmem_to_smem(tl_ref.at[at], own.at[1], bars.at[n_own * wg + 1])
            for i, ref in enumerate((lss_ref, lst_ref, g_ref)):
                plgpu.copy_gmem_to_smem(
                    ref.at[batch, head, pl.ds(q_base, block_q)], rows.at[i], bars.at[n_own * wg + 2 + i]
                )
            if has_ids:
                plgpu.copy_gmem_to_smem(qid_ref.at[batch, pl.ds(q_base, block_q)], qid2.at[wg], bars.at[n_own * wg + 5])
            for i in range(n_own):
                plgpu.barrier_wait(bars.at[n_own * wg + i])
            load = lambda i: plgpu.load(rows.at[i], (), layout=plgpu.Layout.WGMMA.reduce(1))  # noqa: E731
            lse_s, lse_t, g_s = load(0), load(1), load(2)
            own_ids = _load_ids(qid2.at[wg], 0) if has_ids else None

            def step(kv_step, acc, masked):
                slot = lax.rem(kv_step, jnp.array(s_left, kv_step.dtype))
                if has_ids:
                    plgpu.barrier_wait(kid_loaded.at[slot])
                    key_ids = _load_ids(kid_ring.at[slot], 1)
                plgpu.barrier_wait(sr_loaded.at[slot])
                r_s = _tile(own.at[0], sr_ring.at[slot])
                plgpu.barrier_wait(tr_loaded.at[slot])
                r_t = _tile(own.at[1], tr_ring.at[slot])
                if masked:
                    k0 = kv_step * block_kv
                    r_s, r_t = _causal_mask(r_s, q_base, k0), _causal_mask(r_t, q_base, k0)
                if has_ids:
                    r_s, r_t = _same_segment((r_s, r_t), own_ids, key_ids)
                ds = _math.grad_logits(r_s, r_t, lse_s, lse_t, g_s, c, jnp.exp2, col=lambda v: _bcast(v, r_s.shape))
                acc = _wgmma_add(acc, ds, sr_ring.at[slot], dtype)
                plgpu.barrier_arrive(consumed.at[slot])
                return acc

            acc = plgpu.layout_cast(jnp.full((block_q, D), 0, jnp.float32), plgpu.Layout.WGMMA)
            if causal:
                n_full = lax.div(q_base, kv_block)  # key tiles left of the diagonal
                kv_steps = pl.cdiv(q_base + block_q, kv_block)
                acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
                acc = lax.fori_loop(n_full, kv_steps, functools.partial(step, masked=True), acc)
                _ring_skip(kv_steps, ring_steps, s_left, [b for b in loaded if b is not None], consumed)
            else:
                acc = lax.fori_loop(0, ring_steps, functools.partial(step, masked=False), acc)
            own.at[0][...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(own.at[0], dl_ref.at[at])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            r_head = lax.div(head, jnp.array(G, head.dtype))
            at = lambda i: (batch, pl.ds(i * block_kv, block_kv), r_head)  # noqa: E731
            copies = [
                (lambda i: sr_ref.at[at(i)], sr_ring, sr_loaded),
                (lambda i: tr_ref.at[at(i)], tr_ring, tr_loaded),
            ]
            if has_ids:
                copies.append((lambda i: kid_ref.at[batch, pl.ds(i * block_kv, block_kv)], kid_ring, kid_loaded))
            _ring_load(ring_steps, s_left, copies, consumed)

    dleft_entry = _backward_entry(
        dleft,
        has_ids,
        (
            plgpu.SMEM((2, 2, block_q, D), dtype, transforms=transforms),  # [wg, student/teacher]
            plgpu.SMEM((2, 3, block_q), jnp.float32),  # [wg, lse_s/lse_t/g]
            plgpu.SMEM((s_left, block_kv, D), dtype, transforms=transforms),
            plgpu.SMEM((s_left, block_kv, D), dtype, transforms=transforms),
        ),
        (plgpu.SMEM((2, block_q), jnp.int32), plgpu.SMEM((s_left, block_kv), jnp.int32)),  # own q ids, k ids ring
        n_loaded=2,
        steps=s_left,
        own_barriers=2 * n_own,
    )

    d_sl = plgpu.kernel(
        dleft_entry,
        out_type=jax.ShapeDtypeStruct(sl.shape, dtype),
        grid=(H, T // (2 * block_q), B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=params,
    )(sl, sr, tl, tr, lse_s, lse_t, g_scaled, *ids)

    # ---- d_right: one key block per compute warpgroup (per query head), the left side streamed
    _, d_sr = _key_block_backward(
        sl,
        sr,
        tl,
        tr,
        lse_s,
        lse_t,
        g_scaled,
        ids,
        scale=scale,
        causal=causal,
        block_q=block_q,
        block_kv=block_kv,
        steps=ring(n_q, block_q),
        fused=False,
    )
    return d_sl, d_sr


def _key_block_backward(
    sl,
    sr,
    tl,
    tr,
    lse_s,
    lse_t,
    g_scaled,
    ids,
    *,
    scale,
    causal,
    block_q,
    block_kv,
    steps,
    fused,
    schedule_barrier=False,
    pair_wgmmas=None,
    overlap_softmax=False,
    merge_d_left=False,
    ablate=frozenset(),
):
    """The key-block kernel of both backwards: one key block per compute warpgroup (per query
    head), the query tiles from the pair's diagonal on streamed by the memory warpgroup, d_right
    accumulated in registers. `fused`: each step's dSᵀ tile is also written to shared memory and
    read transposed by a second wgmma, dS · s_right, whose [block_q, D] float32 product is added
    into a float32 d_left by a TMA reduce-add (`mosaic_backward_fused`). Returns (d_left in the
    inputs' dtype, or None unless fused; d_right, groups summed). `schedule_barrier`: a step's two
    logit wgmmas are issued together and the compute warpgroups ping-pong (`_PingPong`). ablate:
    timing only (ABLATIONS). pair_wgmmas: as in `mosaic_forward`. overlap_softmax: each step issues
    the next step's logit wgmmas before its own exponentials (`_OverlappedLogits`); not with the
    ping-pong. merge_d_left (fused only): the two compute warpgroups' d_left parts of a query tile
    are one product, [dS₀ | dS₁] · [s_right₀ ; s_right₁] (two wgmmas into one accumulator), added by
    one reduce-add instead of two; the warpgroups take turns computing it (step i: warpgroup i % 2)
    and both run every step from the pair's first query tile (the second one's first steps fully
    masked). It halves d_left's reduce-add traffic, which the ablation found to be about half of
    the D 128 backward (docs/kernel_notes.md, "Ninth session"). Not with the ping-pong or
    overlap_softmax."""
    pair = schedule_barrier if pair_wgmmas is None else bool(pair_wgmmas)
    if overlap_softmax and (schedule_barrier or pair):
        raise ValueError("overlap_softmax: not with schedule_barrier or pair_wgmmas (one schedule at a time)")
    if merge_d_left and not fused:
        raise ValueError("merge_d_left: the one-kernel (fused) backward only")
    if merge_d_left and (schedule_barrier or pair or overlap_softmax):
        raise ValueError(
            "merge_d_left: not with schedule_barrier, pair_wgmmas or overlap_softmax (one schedule at a time)"
        )
    exp2 = _exp2_for(ablate)
    with_d_left = fused and "d_left" not in ablate
    has_ids = bool(ids)
    B, T, H, D = sl.shape
    Hr = sr.shape[2]
    G = H // Hr
    dtype = sl.dtype
    c = scale * _math.LOG2E
    n_q = T // block_q
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    params = plgpu.CompilerParams(approx_math=True)

    def body(*refs):
        dl_ref, refs = (refs[0], refs[1:]) if fused else (None, refs)
        sl_ref, sr_ref, tl_ref, tr_ref, lss_ref, lst_ref, g_ref, qid_ref, kid_ref, dr_ref, scoped = refs
        buffers, loaded, consumed, bars, *sched = scoped
        own2, sl_ring, tl_ring, lss_ring, lst_ring, g_ring, *rest = buffers
        (ds2, dl2, kid2, qid_ring) = rest if fused else (None, None, *rest)
        sl_loaded, tl_loaded, lss_loaded, lst_loaded, g_loaded, qid_loaded = loaded
        batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        ping_pong = _PingPong(sched[0] if schedule_barrier else None, wg)
        ds_written, ds_read = sched[-2:] if merge_d_left else (None, None)
        pair_base = lax.axis_index("kv_seq") * (2 * block_kv)
        q_block = jnp.array(block_q, jnp.int32)
        q_lo = lax.div(pair_base, q_block) if causal else jnp.array(0, jnp.int32)  # the pair's first query tile
        ring_steps = n_q - q_lo

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_base = pair_base + wg * block_kv
            own = own2.at[wg]
            if fused:
                ds_smem, dl_smem = ds2.at[wg], dl2.at[wg]
            r_head = lax.div(head, jnp.array(G, head.dtype))
            at = (batch, pl.ds(k_base, block_kv), r_head)
            plgpu.copy_gmem_to_smem(sr_ref.at[at], own.at[0], bars.at[2 * wg])
            plgpu.copy_gmem_to_smem(tr_ref.at[at], own.at[1], bars.at[2 * wg + 1])
            if has_ids:
                plgpu.copy_gmem_to_smem(kid_ref.at[batch, pl.ds(k_base, block_kv)], kid2.at[wg], bars.at[4 + wg])
            plgpu.barrier_wait(bars.at[2 * wg])
            plgpu.barrier_wait(bars.at[2 * wg + 1])
            own_ids = None
            if has_ids:
                plgpu.barrier_wait(bars.at[4 + wg])
                own_ids = _load_ids(kid2.at[wg], 0)  # the tile's rows are keys

            def d_left_owner(i):  # merge_d_left: the warpgroup that adds ring step i's d_left part
                return lax.rem(i, jnp.array(2, i.dtype))

            def merged_d_left(i, ds_t, q0):
                """Step i's d_left part of both warpgroups, by warpgroup i % 2 (merge_d_left). Each
                warpgroup writes its dSᵀ tile once the previous step's owner has read both, then
                the owner sums [dS₀ | dS₁] · [s_right₀ ; s_right₁] and reduce-adds it."""
                owner = d_left_owner(i)

                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(ds_read.at[1 - owner])

                ds_smem[...] = ds_t
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_written.at[owner])

                @pl.when(wg == owner)
                def _():
                    plgpu.barrier_wait(ds_written.at[owner])

                    def dl_body(dl_acc):
                        for w in range(2):
                            plgpu.wgmma(dl_acc, plgpu.transpose_ref(ds2.at[w], (1, 0)), own2.at[w].at[0])
                        return dl_acc[...]

                    part = pl.run_scoped(dl_body, plgpu.ACC((block_q, D), jnp.float32))
                    plgpu.barrier_arrive(ds_read.at[owner])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # its previous reduce has read dl_smem
                    dl_smem[...] = part
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(dl_smem, dl_ref.at[batch, pl.ds(q0, block_q), head], reduction_op="add")

            def step(i, acc, masked, logits=None, issue_next=False):  # ring step i holds query tile q_lo + i
                """One query tile. With `logits` (overlap_softmax) the step's logit tiles come in
                the carry (read by the step before) and, with `issue_next`, the next step's
                wgmmas are issued first, to run under this step's exponentials."""
                if logits is not None:
                    acc, rt_s, rt_t = acc
                slot = lax.rem(i, jnp.array(steps, i.dtype))
                q0 = (q_lo + i) * block_q if fused else None
                if has_ids:
                    plgpu.barrier_wait(qid_loaded.at[slot])
                    query_ids = _load_ids(qid_ring.at[slot], 1)
                if logits is not None:
                    if issue_next:
                        logits.issue(i + 1)
                elif pair:
                    plgpu.barrier_wait(sl_loaded.at[slot])
                    plgpu.barrier_wait(tl_loaded.at[slot])
                    second = "teacher_logits" not in ablate
                    rt_s, rt_t = _tile_pair(
                        own.at[0], sl_ring.at[slot], own.at[1], tl_ring.at[slot], ping_pong.meet, second
                    )
                else:
                    plgpu.barrier_wait(sl_loaded.at[slot])
                    rt_s = _tile(own.at[0], sl_ring.at[slot])  # [keys, queries]
                    plgpu.barrier_wait(tl_loaded.at[slot])
                    rt_t = rt_s if "teacher_logits" in ablate else _tile(own.at[1], tl_ring.at[slot])
                for bar in (lss_loaded, lst_loaded, g_loaded):
                    plgpu.barrier_wait(bar.at[slot])
                load = lambda ring: plgpu.load(ring.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))  # noqa: E731
                lse_s, lse_t, g_s = load(lss_ring), load(lst_ring), load(g_ring)
                if masked:
                    q0_mask = q0 if fused else (q_lo + i) * block_q
                    rt_s, rt_t = _causal_mask(rt_s, k_base, q0_mask, True), _causal_mask(rt_t, k_base, q0_mask, True)
                if has_ids:
                    rt_s, rt_t = _same_segment((rt_s, rt_t), own_ids, query_ids)
                col = lambda v: lax.broadcast_in_dim(v, rt_s.shape, [1])  # noqa: E731
                ds_t = _math.grad_logits(rt_s, rt_t, lse_s, lse_t, g_s, c, exp2, col=col)
                if fused:
                    ds_t = ds_t.astype(dtype)
                ds_t = ping_pong.after_exponentials(ds_t)
                acc = _wgmma_add(acc, ds_t, sl_ring.at[slot], dtype)  # d_right += dSᵀ · s_left
                plgpu.barrier_arrive(consumed.at[slot])
                if with_d_left and merge_d_left:
                    merged_d_left(i, ds_t, q0)
                elif with_d_left:  # d_left's part of this query tile: dS · s_right = (dSᵀ)ᵀ · s_right
                    ds_smem[...] = ds_t
                    plgpu.commit_smem()

                    def dl_body(dl_acc):
                        plgpu.wgmma(dl_acc, plgpu.transpose_ref(ds_smem, (1, 0)), own.at[0])
                        return dl_acc[...]

                    part = pl.run_scoped(dl_body, plgpu.ACC((block_q, D), jnp.float32))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's reduce has read dl_smem
                    dl_smem[...] = part
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(dl_smem, dl_ref.at[batch, pl.ds(q0, block_q), head], reduction_op="add")
                if logits is None:
                    return acc
                if not issue_next:
                    return acc, rt_s, rt_t
                nxt_s, nxt_t, _ = logits.read(i + 1)  # done already: d_right's wgmma waited for every group
                return acc, nxt_s, nxt_t

            def loops(acc, logits=None):
                """Ring steps [0, ring_steps): causal, the diagonal's (masked) then the rest. With
                `logits` (overlap_softmax), every step but the last issues the next one's logit
                wgmmas first; the last one takes the mask either way (harmless off the diagonal)."""
                if causal:
                    # ring steps before this block's diagonal (merge_d_left: both run from the pair's first)
                    own_lo = jnp.array(0, jnp.int32) if merge_d_left else lax.div(k_base, q_block) - q_lo
                    diag_end = pl.cdiv(k_base + block_kv, q_block) - q_lo  # the last ring step that needs the mask, + 1
                    loaded_bars = [b for b in loaded if b is not None]
                    _ring_skip(0, own_lo, steps, loaded_bars, consumed, ping_pong.skipped_step)
                    segments = ((own_lo, diag_end, True), (diag_end, ring_steps, False))
                else:
                    own_lo, segments = jnp.array(0, jnp.int32), ((0, ring_steps, False),)
                if logits is None:
                    for lo, hi, masked in segments:
                        acc = lax.fori_loop(lo, hi, functools.partial(step, masked=masked), acc)
                    return acc
                logits.issue(own_lo)
                carry = (acc, *logits.read(own_lo)[:2])
                last = ring_steps - 1
                for lo, hi, masked in segments:
                    run = functools.partial(step, masked=masked, logits=logits, issue_next=True)
                    carry = lax.fori_loop(lo, jnp.minimum(hi, last), run, carry)
                return step(last, carry, masked=causal, logits=logits)[0]

            acc = plgpu.layout_cast(jnp.full((block_kv, D), 0, jnp.float32), plgpu.Layout.WGMMA)
            ping_pong.before_loops()
            if overlap_softmax:  # the slot is released after d_right's wgmma, by the step
                acc = _OverlappedLogits.scoped(
                    functools.partial(loops, acc),
                    (block_kv, block_q),
                    own,
                    (sl_ring, tl_ring),
                    (sl_loaded, tl_loaded),
                    steps=steps,
                    second="teacher_logits" not in ablate,
                )
            else:
                acc = loops(acc)
            ping_pong.after_loops()
            if with_d_left and merge_d_left:  # the last step's owner has read both s_right tiles (own.at[0] is
                # overwritten next); without d_left (ablated) nobody arrives on ds_read
                plgpu.barrier_wait(ds_read.at[d_left_owner(ring_steps - 1)])
            if fused:
                plgpu.wait_smem_to_gmem(0)  # every reduce-add of d_left done
            own.at[0][...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(own.at[0], dr_ref.at[batch, pl.ds(k_base, block_kv), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            tile = lambda ref: lambda i: ref.at[batch, pl.ds((q_lo + i) * block_q, block_q), head]  # noqa: E731
            row = lambda ref: lambda i: ref.at[batch, head, pl.ds((q_lo + i) * block_q, block_q)]  # noqa: E731
            copies = [
                (tile(sl_ref), sl_ring, sl_loaded),
                (tile(tl_ref), tl_ring, tl_loaded),
                (row(lss_ref), lss_ring, lss_loaded),
                (row(lst_ref), lst_ring, lst_loaded),
                (row(g_ref), g_ring, g_loaded),
            ]
            if has_ids:
                ids_at = lambda i: (batch, pl.ds((q_lo + i) * block_q, block_q))  # noqa: E731
                copies.append((lambda i: qid_ref.at[ids_at(i)], qid_ring, qid_loaded))
            _ring_load(ring_steps, steps, copies, consumed)

    body.__name__ = "dfused" if fused else "dright"  # the kernels' names in profiles: relation_kl_mgpu_<name>
    fused_smem = (
        plgpu.SMEM((2, block_kv, block_q), dtype, transforms=transforms),  # [wg] dSᵀ
        plgpu.SMEM((2, block_q, D), jnp.float32),  # [wg] d_left's part, staged for the reduce-add
    )
    entry = _backward_entry(
        body,
        has_ids,
        (
            plgpu.SMEM((2, 2, block_kv, D), dtype, transforms=transforms),  # [wg, student/teacher]
            plgpu.SMEM((steps, block_q, D), dtype, transforms=transforms),
            plgpu.SMEM((steps, block_q, D), dtype, transforms=transforms),
            *(plgpu.SMEM((steps, block_q), jnp.float32) for _ in range(3)),  # lse_s, lse_t, g
            *(fused_smem if fused else ()),
        ),
        (plgpu.SMEM((2, block_kv), jnp.int32), plgpu.SMEM((steps, block_q), jnp.int32)),  # own k ids, q ids ring
        n_loaded=5,
        steps=steps,
        own_barriers=6 if has_ids else 4,  # per warpgroup: its key block's TMA copies
        schedule_barrier=schedule_barrier,
        merge_d_left=merge_d_left,
    )
    out_type = jax.ShapeDtypeStruct((B, T, H, D), dtype)
    grid, grid_names = (H, T // (2 * block_kv), B), ("heads", "kv_seq", "batch")
    d_sl = None
    if fused:  # d_left's float32 accumulator: zeros, aliased to a second output
        mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg")
        zeros = jnp.zeros((B, T, H, D), jnp.float32)
        d_sr_heads, d_left = _kernel_accumulating_into(entry, zeros, out_type, mesh, params)(
            zeros, sl, sr, tl, tr, lse_s, lse_t, g_scaled, *ids
        )
        d_sl = d_left.astype(dtype)
    else:
        d_sr_heads = plgpu.kernel(
            entry,
            out_type=out_type,
            grid=grid,
            grid_names=grid_names,
            num_threads=3,
            thread_name="wg",
            compiler_params=params,
        )(sl, sr, tl, tr, lse_s, lse_t, g_scaled, *ids)
    if G > 1:  # one output per query head: sum each group (in float32)
        return d_sl, d_sr_heads.reshape(B, T, Hr, G, D).astype(jnp.float32).sum(3).astype(dtype)
    return d_sl, d_sr_heads


def mosaic_backward_fused(
    sl,
    sr,
    tl,
    tr,
    lse_s,
    lse_t,
    g,
    q_ids=None,
    k_ids=None,
    *,
    scale: float,
    causal: bool,
    block_q=64,
    block_kv=64,
    max_concurrent_steps=2,
    schedule_barrier=False,
    pair_wgmmas=None,
    overlap_softmax=False,
    merge_d_left=False,
    ablate=(),
):
    """(d_sl, d_sr) as `mosaic_backward` computes them, in one kernel: the d_right kernel's grid
    (a key block per compute warpgroup, the query tiles from the diagonal on streamed by the memory
    warpgroup), where each step's dSᵀ tile, besides feeding d_right, is written to shared memory
    and read transposed by a second wgmma, dS · s_right, whose [block_q, D] float32 product is
    added into a float32 d_left by a TMA reduce-add (`copy_smem_to_gmem(..., reduction_op="add")`,
    FlashAttention-3's dQ pattern). So each pair of tiles computes its two logit tiles and
    exponentials once, not twice (the two-kernel backward recomputes them for d_left). d_left is
    not bit-deterministic (the order of the adds varies) and is rounded to the inputs' dtype once,
    after the kernel. schedule_barrier, pair_wgmmas, overlap_softmax: as in `mosaic_forward` (the
    overlap: the next query tile's logit wgmmas under this tile's exponentials). merge_d_left: one
    reduce-add per query tile and pair of key blocks, not two (`_key_block_backward`). ablate:
    timing only (ABLATIONS)."""
    ablate = _check_ablate(ablate)
    check_shapes(sl, sr, block_q, block_kv)
    ids = (q_ids.astype(jnp.int32), k_ids.astype(jnp.int32)) if q_ids is not None else ()
    steps = max(2, min(max_concurrent_steps, sl.shape[1] // block_q))
    return _key_block_backward(
        sl,
        sr,
        tl,
        tr,
        lse_s,
        lse_t,
        g * scale,
        ids,
        scale=scale,
        causal=causal,
        block_q=block_q,
        block_kv=block_kv,
        steps=steps,
        fused=True,
        schedule_barrier=schedule_barrier,
        pair_wgmmas=pair_wgmmas,
        overlap_softmax=overlap_softmax,
        merge_d_left=merge_d_left,
        ablate=ablate,
    )


# ---------------------------------------------- the relation_kl contract (impl "pallas_mgpu") ---


def unsupported_reason(
    shape,
    dtype,
    *,
    interpret: bool,
    block_q: int,
    block_kv: int,
    fused_bwd: bool = False,
    bwd_blocks: tuple[int, int] | None = None,
) -> str | None:
    """Why impl "pallas_mgpu" cannot take a relation_kl call of padded left-side `shape`
    [B, Tp, H, Dp] (None: it can) with the one-kernel backward (`fused_bwd`) or the two-kernel one.
    block_q x block_kv: the forward's blocks; bwd_blocks: the one-kernel backward's (block_q,
    block_kv) where they differ (BlockSizes.block_q_dk / block_k_dk; default: the forward's).
    The Triton kernel ("pallas_gpu") takes all of these."""
    if plgpu is None:
        return "this jax has no Pallas Mosaic GPU (jax.experimental.pallas.mosaic_gpu)"
    if interpret:
        return "it has no interpret mode (Pallas' interpreter cannot run TMA copies)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: it takes bfloat16 or float16"
    _, T, _, D = shape
    if D % MIN_BLOCK:
        return f"head dim {D} (padded) is not a multiple of {MIN_BLOCK}"
    bwd_blocks = (block_q, block_kv) if bwd_blocks is None else tuple(bwd_blocks)
    if bwd_blocks != (block_q, block_kv) and not fused_bwd:
        return (
            f"backward blocks {bwd_blocks} differ from the forward's ({block_q}, {block_kv}): "
            "only the one-kernel backward (fused_bwd) takes its own"
        )
    for bq, bkv in {(block_q, block_kv), bwd_blocks}:
        if bq % MIN_BLOCK or bkv % MIN_BLOCK:
            return f"blocks ({bq}, {bkv}) must be multiples of {MIN_BLOCK}"
        if T % (2 * bq) or T % (2 * bkv):
            # the grids take blocks in pairs (two compute warpgroups); block_kv is BlockSizes.block_k
            return f"T = {T} must be a multiple of 2 * block_q = {2 * bq} and 2 * block_kv = {2 * bkv}"
    itemsize = jnp.dtype(dtype).itemsize
    need = smem_bytes(D, block_q, block_kv, itemsize, fused_bwd=fused_bwd, bwd_blocks=bwd_blocks)
    if need > SMEM_BYTES:
        where = "" if bwd_blocks == (block_q, block_kv) else f" (backward blocks {bwd_blocks})"
        return (
            f"head dim {D} with blocks ({block_q}, {block_kv}){where} needs ~{need} bytes of shared memory"
            f" > {SMEM_BYTES}"
            + (
                ""
                if not fused_bwd
                else " (the one-kernel backward; smaller block_q_dk / block_k_dk need less)"
                if where
                else " (the one-kernel backward; BlockSizes(fused_bwd=False) needs less)"
            )
        )
    return None


SMEM_BYTES = 232448 - 4096  # Hopper's 227 KiB per block, less room for the barriers


def smem_bytes(
    D: int,
    block_q: int,
    block_kv: int,
    itemsize: int = 2,
    steps: int = 2,
    fused_bwd: bool = False,
    bwd_blocks: tuple[int, int] | None = None,
) -> int:
    """Shared memory of the largest of the kernels a call runs (own tiles of both warpgroups, the
    ring's tiles and rows; ids at most 2 KiB more), as allocated above; `fused_bwd`: the one-kernel
    backward, whose d_right grid also stages each warpgroup's dSᵀ tile and float32 d_left part;
    `bwd_blocks`: the backward kernels' (block_q, block_kv), default the forward's."""

    def forward_like(bq, bkv):  # the forward's grid (and the two-kernel backward's d_left grid)
        return 2 * 2 * bq * D * itemsize + 2 * steps * bkv * D * itemsize + 2 * 3 * bq * 4

    fwd = forward_like(block_q, block_kv)
    bq, bkv = (block_q, block_kv) if bwd_blocks is None else bwd_blocks
    d_left = forward_like(bq, bkv) + steps * bkv * 4
    d_right = 2 * 2 * bkv * D * itemsize + 2 * steps * bq * D * itemsize + 3 * steps * bq * 4
    if fused_bwd:
        d_right += 2 * bkv * bq * itemsize + 2 * bq * D * 4
        return max(fwd, d_right) + 2048
    return max(fwd, d_left, d_right) + 2048


def forward(sl, sr, tl, tr, q_ids, k_ids, *, cfg):
    """relation_kl's kernel contract (pallas_kernels/relation_kl.py), on blocks cfg.blocks.block_q x
    block_k (the two-kernel backward's too; `unsupported_reason` is checked first); BlockSizes.schedule_barrier
    and overlap_softmax for the forward and the fused backward."""
    b = cfg.blocks
    return mosaic_forward(
        sl,
        sr,
        tl,
        tr,
        q_ids,
        k_ids,
        scale=cfg.scale,
        causal=cfg.causal,
        block_q=b.block_q,
        block_kv=b.block_k,
        schedule_barrier=b.schedule_barrier,
        overlap_softmax=b.overlap_softmax,
    )


def backward(sl, sr, tl, tr, q_ids, k_ids, lse_s, lse_t, g, *, cfg):
    """`BlockSizes.fused_bwd`: the one-kernel backward (`mosaic_backward_fused`, with
    BlockSizes.schedule_barrier, overlap_softmax and merge_d_left) on block_q_dk x block_k_dk, which
    may differ from the forward's blocks; else two kernels (without them) on block_q x block_k."""
    b = cfg.blocks
    sched = (
        {"schedule_barrier": b.schedule_barrier, "overlap_softmax": b.overlap_softmax, "merge_d_left": b.merge_d_left}
        if b.fused_bwd
        else {}
    )
    return (mosaic_backward_fused if b.fused_bwd else mosaic_backward)(
        sl,
        sr,
        tl,
        tr,
        lse_s,
        lse_t,
        g,
        q_ids,
        k_ids,
        scale=cfg.scale,
        causal=cfg.causal,
        block_q=b.block_q_dk if b.fused_bwd else b.block_q,
        block_kv=b.block_k_dk if b.fused_bwd else b.block_k,
        **sched,
    )
