"""Block-size policy of relation_kl: defaults, padding and per-backend tile rules.

Everything that decides a tile or a padded size lives here; the backends only
read `cfg.blocks` and the shapes they are given.

Padding (done once in `relation_kl.relation_kl`, before dispatch):
  * D -> `padded_head_dim(D)`: a power of two >= 16 (Triton tiles are powers of
    two and `tl.dot` needs >= 16; zero columns add nothing to a dot product).
    The TPU backend widens it further to `lane_dim(Dp)`, a multiple of 128
    lanes, inside its own wrapper (its inputs are viewed as [B, T, H * Dq]).
  * T -> `padded_length(T, blocks, impl)`: a multiple of the largest block
    ("pallas_mgpu": of twice it, a block per compute warpgroup); padded rows
    and keys carry ids that mask them.

Blocks (`pick_blocks`):
  * defaults per impl: `default_blocks` (GPU: `GPU_TILE_TABLE`, keyed by the
    head-dim class and the grid-size class of the call, shrunk for rows wider
    than 256 bytes; "xla": 512 chunks; TPU: 128, untuned);
  * a dict overrides fields of the defaults, a BlockSizes replaces them;
  * clamped to T: no block larger than max(MIN_BLOCK, next_pow2(T)) ("pallas_mgpu":
    max(64, ...), padding covers the rest);
  * every block a power of two;
  * "pallas_gpu": every block >= 16 (`tl.dot` minimum);
  * "pallas_mgpu": every block >= 64 (wgmma tiles); the forward (and the
    two-kernel backward) on block_q x block_k, the one-kernel backward on
    block_q_dk x block_k_dk (= *_dq). In a dict the *_dq / *_dk fields follow
    each other, else block_q / block_k; a BlockSizes object runs every kernel
    on its block_q x block_k (its *_dq / *_dk must equal them);
  * "pallas_tpu": the (8, 128) vreg tiling: blocks >= 8 (sublanes) and key
    blocks, the lane axis of the logit tiles, multiples of 128 unless one
    block spans the whole padded sequence.
"""

from __future__ import annotations

import dataclasses

MIN_BLOCK = 16  # smallest block the clamp to T produces; GPU minimum
SUBLANES, LANES = 8, 128  # TPU vreg tile (second-minor, minor)
# GPU defaults are tuned for 256-byte rows (bf16/f16, D <= 128); wider rows
# shrink the tiles in proportion so shared memory stays < 227 KB (Hopper).
GPU_TUNED_ROW_BYTES = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and Triton launch settings. Blocks must be powers of two (the
    per-backend minimums and multiples are in this module's docstring).

    Field defaults: the fastest of a sweep on an H200 at T=4096, D=128, bf16
    (docs/kernel_notes.md); 128x128 forward tiles were within noise of 128x64.
    The GPU's defaults per head dim and grid size are GPU_TILE_TABLE below.

    block_q/block_k: forward tiles (also the chunk sizes of the "xla" impl).
    block_q_dq/block_k_dq: tiles of the d_left kernel (grid over query blocks).
    block_q_dk/block_k_dk: tiles of the d_right kernel (grid over key blocks).
    num_warps_*/num_stages_*/fast_exp2/exp2_split: Triton only; fused_bwd: Triton and Mosaic GPU;
    schedule_barrier, overlap_softmax, merge_d_left: Mosaic GPU only.
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
    # GPU: the teacher's exponentials by _math.exp2_poly (FMA pipes), the student's on the MUFU.
    # Off until measured (experiments/bench_relation_kl.py's exp2 A/B has the row to decide it).
    exp2_split: bool = False
    # GPU: one backward kernel (d_right's grid) that also adds d_left, so each tile's logits and
    # exponentials are computed once, not twice (docs/kernel_notes.md). Triton: per-element atomic
    # adds, 4.8x slower on the H200 at D 64, off; Mosaic GPU: one TMA reduce-add per tile, faster
    # than its two kernels, on in MGPU_BLOCKS.
    fused_bwd: bool = False
    # Mosaic GPU: FlashAttention-3's ping-pong. The two compute warpgroups meet at a barrier after
    # issuing a step's logit wgmmas and after its exponentials, so one warpgroup's tensor-core work
    # runs while the other's exponentials do. The forward and the one-kernel backward take it (the
    # two-kernel backward ignores it). Off until an H200 says it pays (docs/kernel_notes.md).
    schedule_barrier: bool = False
    # Mosaic GPU forward and one-kernel backward: each step issues the next step's logit wgmmas
    # before its own exponentials, so they run under them (FlashAttention-3's intra-warpgroup
    # overlap; docs/kernel_notes.md "Eighth session": the SASS showed each warpgroup's wgmmas and
    # softmax nearly in series). Not with schedule_barrier. Exact on an H100 (2026-12-05) but slower
    # (docs/kernel_notes.md "Ninth session"): off.
    overlap_softmax: bool = False
    # Mosaic GPU one-kernel backward: the two compute warpgroups' d_left parts of a query tile
    # summed by one wgmma pair and added by one TMA reduce-add instead of two, the warpgroups taking
    # turns (d_left's reduce-add traffic halved; the ablation found d_left ~45% of the D 128
    # backward). Not with schedule_barrier or overlap_softmax. On in MGPU_BLOCKS_WIDE (D 128).
    merge_d_left: bool = False

    def all_blocks(self):
        return (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq, self.block_q_dk, self.block_k_dk)

    def key_blocks(self):
        return (self.block_k, self.block_k_dq, self.block_k_dk)


BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSizes) if f.name.startswith("block_"))
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(BlockSizes)}
BOOL_FIELDS = tuple(name for name, t in FIELD_TYPES.items() if t in (bool, "bool"))


def check_fields(names, what: str = "block_sizes") -> None:
    """ValueError, starting with `what`, naming every one of `names` that is not a BlockSizes field."""
    unknown = sorted(set(names) - set(FIELD_TYPES))
    if unknown:
        raise ValueError(f"{what}: unknown BlockSizes field(s) {unknown}; fields: {sorted(FIELD_TYPES)}")


def parse_impl_spec(spec: str) -> tuple[str, dict]:
    """A relation kernel impl and BlockSizes overrides as the experiments' command lines write them:
    "pallas_mgpu:merge_d_left=0:block_q=64" -> ("pallas_mgpu", {"merge_d_left": False, "block_q": 64});
    a boolean field named alone is set ("pallas_mgpu:schedule_barrier"). ValueError names a bad part."""
    impl, *parts = spec.split(":")
    bare = [part for part in parts if "=" not in part]
    unknown = [part for part in bare if part not in BOOL_FIELDS]
    if unknown:
        raise ValueError(f"{spec!r}: {unknown} are not boolean BlockSizes fields {BOOL_FIELDS}")
    out = dict.fromkeys(bare, True)
    for field, value in (part.split("=", 1) for part in parts if "=" in part):
        check_fields([field], repr(spec))
        if field in BOOL_FIELDS:
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"{spec!r}: {field} takes 0/1/true/false, got {value!r}")
            out[field] = value.lower() in ("1", "true")
        else:
            try:
                out[field] = int(value)
            except ValueError:
                raise ValueError(f"{spec!r}: {field} takes an integer, got {value!r}") from None
    return impl, out


GPU_BLOCKS = BlockSizes()

# ------------------------------------------------------------ GPU tile table ---
# Default "pallas_gpu" tiles per (head-dim class, grid-size class). Paste the
# `table` that `python3 -m experiments.tune_relation_kl --out tune.json` prints
# here (docs/kernel_notes.md, "Tile table"). Until an entry is measured it holds
# the D = 128 tiles of the first sweep (GPU_BLOCKS).
#
# head-dim class: the row width of a 16-bit (bf16/f16) input, padded D * 2 bytes:
#   64  = rows of <= 128 bytes (bf16 D <= 64: SmolLM2, Llama-3.2-1B ...);
#   128 = rows of 129..256 bytes (bf16 D = 128, f32 D <= 64: Llama-2-7B ...).
#   Wider rows (bf16 D = 256, f32 D = 128) take the 128 entry with every block
#   divided by row_bytes // 256 and 2 stages, so shared memory stays < 227 KB.
# grid-size class: "few" when the call has B * H <= FEW_BATCH_HEADS (batch x
#   query heads; e.g. the K and V relations of SmolLM2, 3 KV heads x B <= 4,
#   whose grids are T / block_q * B * H programs for 132 SMs), else "many".
FEW_BATCH_HEADS = 16
# Tuned on one H200 (jax 0.11.2, experiments/tune_relation_kl.py, 2026-12-04; docs/kernel_notes.md):
# D=64 at T=8192, B in {2, 4}, H in {9, 3}: fwd+bwd 1.02-1.10x faster than GPU_BLOCKS; D=128 at
# T=4096, B=1, H in {32, 8}: 1.01-1.04x. Every entry checked equal to GPU_BLOCKS' results there.
GPU_TILE_TABLE: dict[tuple[int, str], BlockSizes] = {
    (64, "few"): BlockSizes(block_q=64, block_k=128, num_warps_fwd=4, num_stages_bwd=3),
    (64, "many"): BlockSizes(block_q=64, block_k=128, num_warps_fwd=4, num_stages_bwd=3),
    (128, "few"): BlockSizes(block_q=64, num_warps_fwd=4, num_stages_fwd=2),
    (128, "many"): BlockSizes(block_q=64, num_warps_fwd=4, num_stages_fwd=2),
}
# relation_kl_multi: whether the relations of one call that share (D, dtype) go
# through ONE launch (heads concatenated) by default, per head-dim class. Exact
# either way; the tuner's "layer" section measures which is faster. Measured (SmolLM2 layer,
# 9+3+3 heads, D=64, T=8192, tuned tiles): B=2 one launch 3.32 ms fwd+bwd vs three 3.61; B=4
# 6.60 vs 6.64 (equal): one launch kept for D=64. D=128 not measured as a layer; kept.
GPU_MERGE_RELATIONS: dict[int, bool] = {64: True, 128: True}
# The "xla" impl works on whole chunks per loop step: large chunks keep the
# matmuls big and the loop short; memory stays O(block_q * block_k) per head.
XLA_BLOCKS = BlockSizes(**{f: 512 for f in BLOCK_FIELDS})
# TPU: one [block_q, block_k] tile per grid step; 128 fills the MXU and the
# lanes. Not tuned (no TPU was available); the Triton-only fields are unused.
TPU_BLOCKS = BlockSizes(**{f: 128 for f in BLOCK_FIELDS})
# "pallas_mgpu": block_q x block_k for the forward (each program a pair of block_q-row blocks, one
# per compute warpgroup) and the two-kernel backward; the one-kernel backward (fused_bwd) runs on
# block_q_dk x block_k_dk (= *_dq), which follow block_q x block_k unless set. 64 x 64 was the
# fastest of the two measured on an H200 at head dim 128 (docs/raw/check_mgpu_h200_call2.json,
# _16k.json: 64 x 128 took 2.05x / 1.47x / 1.34x its time at T 2048 / 4096 / 16384). fused_bwd: the
# one-kernel backward (d_left by TMA reduce-add), 0.95x / 0.88x the two-kernel one's forward +
# backward at T 4096 32/8 heads D 128 and T 8192 9/3 heads D 64, exact
# (docs/raw/check_mgpu_fused_h200_session6.json).
# merge_d_left (one reduce-add per query tile and pair of key blocks): on for rows of 128 bytes and
# more (bf16 D 128), where it took the forward + backward from 1.24x to 1.09x cuDNN attention's time
# at T 16384 and from 1.07-1.11x to 1.00-1.01x at T 4096; off at D 64, where it was 1.5% slower
# (H100, docs/raw/check_merge_*_h100_session9.json; docs/kernel_notes.md "Ninth session").
# At D 64 (bf16 rows of 128 bytes and fewer) 128-row query blocks: one SmolLM2 layer's relation loss
# (9/3/3 heads, B 4, T 8192) took 5.47 / 5.48 ms against 5.85 with 64 x 64, in two processes, and
# the whole SmolLM2 step ran 97,384 against 95,303 tokens/s; exact at B 2 T 8192 9/3 heads (H200,
# docs/raw/layer_bq128*_h200_session10.json, check_128x64_h200_session10.json; kernel_notes "Tenth
# session"). Its forward alone is slower than 64 x 64's (0.77 against 0.71 ms there); the backward
# gains more. 128 x 64 with merge_d_left, and 64 x 128 with or without it, were slower. The forward
# on 64 x 128 with the backward on 128 x 64 (block_q=64, block_k=128, block_q_dk=block_q_dq=128,
# block_k_dk=block_k_dq=64) would take ~6% less from its parts' times; it has not
# been run as a whole (check_relation_kl_mgpu's fused_64x128_bwd128x64, API case 25).
MGPU_MIN_BLOCK = 64
MGPU_BLOCKS = BlockSizes(**{f: 64 for f in BLOCK_FIELDS}, fused_bwd=True)
MGPU_BLOCKS_WIDE = dataclasses.replace(MGPU_BLOCKS, merge_d_left=True)
MGPU_BLOCKS_NARROW = dataclasses.replace(MGPU_BLOCKS, block_q=128, block_q_dq=128, block_q_dk=128)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def padded_head_dim(D: int) -> int:
    """Head dim every backend receives: a power of two >= 16."""
    return max(MIN_BLOCK, next_pow2(D))


def lane_dim(Dp: int) -> int:
    """TPU: head dim widened to whole 128-lane vregs."""
    return round_up(Dp, LANES)


def padded_length(T: int, blocks: BlockSizes, impl: str = "") -> int:
    """Sequence length every backend receives: a multiple of every block ("pallas_mgpu": of two
    of each, one per compute warpgroup)."""
    return round_up(T, max(blocks.all_blocks()) * (2 if impl == "pallas_mgpu" else 1))


def head_dim_class(row_bytes: int) -> int:
    """Key of GPU_TILE_TABLE / GPU_MERGE_RELATIONS for rows of `row_bytes` (padded D x itemsize)."""
    return 64 if row_bytes <= 128 else 128


def grid_class(batch_heads: int | None) -> str:
    """The grid-size class of GPU_TILE_TABLE, "few" or "many"; None (not known) counts as "many"."""
    return "few" if batch_heads is not None and batch_heads <= FEW_BATCH_HEADS else "many"


def gpu_table_key(row_bytes: int, batch_heads: int | None = None) -> tuple[int, str]:
    return head_dim_class(row_bytes), grid_class(batch_heads)


def default_blocks(impl: str, row_bytes: int, batch_heads: int | None = None) -> BlockSizes:
    """Defaults of an impl for rows of `row_bytes` (padded D x itemsize) and a
    call with `batch_heads` = B x H (query heads; GPU only, None: "many")."""
    if impl == "xla":
        return XLA_BLOCKS
    if impl == "pallas_tpu":
        return TPU_BLOCKS
    if impl == "pallas_mgpu":
        return MGPU_BLOCKS_WIDE if head_dim_class(row_bytes) == 128 else MGPU_BLOCKS_NARROW
    base = GPU_TILE_TABLE[gpu_table_key(row_bytes, batch_heads)]
    shrink = max(1, row_bytes // GPU_TUNED_ROW_BYTES)
    if shrink == 1:
        return base
    return dataclasses.replace(
        base,
        num_stages_fwd=2,
        num_stages_bwd=2,
        **{f: max(MIN_BLOCK, getattr(base, f) // shrink) for f in BLOCK_FIELDS},
    )


def merge_relations(impl: str, row_bytes: int) -> bool:
    """Default of relation_kl_multi's `merge` for rows of `row_bytes`."""
    if impl != "pallas_gpu":
        return True
    return GPU_MERGE_RELATIONS[head_dim_class(row_bytes)]


def pick_blocks(block_sizes, impl: str, T: int, row_bytes: int, batch_heads: int | None = None) -> BlockSizes:
    """The blocks an impl runs with: defaults or overrides, clamped to T, checked.

    block_sizes: None, a BlockSizes, or a dict of BlockSizes fields overriding
    the defaults (`default_blocks(impl, row_bytes, batch_heads)`). Raises
    ValueError (mentioning "block_sizes") on a bad choice.
    """
    if block_sizes is None:
        base = default_blocks(impl, row_bytes, batch_heads)
    elif isinstance(block_sizes, dict):
        check_fields(block_sizes, "block_sizes")
        base = dataclasses.replace(default_blocks(impl, row_bytes, batch_heads), **block_sizes)
        if impl == "pallas_mgpu":  # the backward's blocks: as given (*_dq and *_dk alike), else the forward's
            follow = {}
            for axis, fwd in (("q", "block_q"), ("k", "block_k")):
                pair = (f"block_{axis}_dq", f"block_{axis}_dk")
                given = [f for f in pair if f in block_sizes]
                src = getattr(base, given[0]) if given else getattr(base, fwd)
                follow.update({f: src for f in pair if f not in block_sizes})
            base = dataclasses.replace(base, **follow)
    else:
        base = block_sizes
    # Short sequences: no tile larger than T rounded up to a power of two.
    cap = max(MGPU_MIN_BLOCK if impl == "pallas_mgpu" else MIN_BLOCK, next_pow2(T))
    blocks = dataclasses.replace(base, **{f: min(getattr(base, f), cap) for f in BLOCK_FIELDS})
    for b in blocks.all_blocks():
        if b <= 0 or b & (b - 1):
            raise ValueError(f"block_sizes: blocks must be powers of two, got {blocks}")
    if impl == "pallas_gpu" and min(blocks.all_blocks()) < MIN_BLOCK:
        raise ValueError(f"block_sizes: pallas_gpu needs blocks >= {MIN_BLOCK} (tl.dot), got {blocks}")
    if impl == "pallas_mgpu":
        if min(blocks.all_blocks()) < MGPU_MIN_BLOCK:
            raise ValueError(f"block_sizes: pallas_mgpu needs blocks >= {MGPU_MIN_BLOCK} (wgmma tiles), got {blocks}")
        bwd = (blocks.block_q_dk, blocks.block_k_dk)
        if (blocks.block_q_dq, blocks.block_k_dq) != bwd:
            raise ValueError(
                "block_sizes: pallas_mgpu's backward runs on one block_q_dk x block_k_dk; set block_q_dq / "
                f"block_k_dq equal to them (or leave all four to follow block_q x block_k), got {blocks}"
            )
        if bwd != (blocks.block_q, blocks.block_k) and isinstance(block_sizes, BlockSizes):
            # an object's unset *_dk fields are the class defaults, not a choice
            raise ValueError(
                "block_sizes: a BlockSizes object runs pallas_mgpu's kernels on its block_q x block_k, so its "
                "*_dq / *_dk fields must equal them; give the one-kernel backward its own blocks as dict "
                f"overrides (block_q_dk=..., block_k_dk=...), got {blocks}"
            )
        if bwd != (blocks.block_q, blocks.block_k) and not blocks.fused_bwd:
            raise ValueError(
                "block_sizes: pallas_mgpu's two-kernel backward (fused_bwd=False) runs on the forward's "
                f"block_q x block_k; set only those (or the *_dq / *_dk fields equal to them), got {blocks}"
            )
    if impl == "pallas_tpu":
        Tp = padded_length(T, blocks)
        if min(blocks.all_blocks()) < SUBLANES or any(k % LANES and k != Tp for k in blocks.key_blocks()):
            raise ValueError(
                f"block_sizes: pallas_tpu needs blocks >= {SUBLANES} and "
                f"key blocks that are multiples of {LANES} (or span T), "
                f"got {blocks}"
            )
    return blocks
