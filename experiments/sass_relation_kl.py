"""A static profile of the Mosaic GPU relation-KL kernels, read from their SASS, without a GPU.

Nsight Compute segfaults under JAX on the device machine and device time is scarce
(docs/kernel_notes.md), but what a kernel's inner loop asks of each unit is fixed at compile time.
This compiles the Mosaic kernels for sm_90a on this machine and reads the loop out of the SASS:

1. A child process lowers each kernel for "cuda" and hands its Mosaic module to the CUDA plugin's
   own compiler (`MosaicGpuCompile`, the function a Mosaic custom call runs on its first launch),
   with Mosaic's dump switches on: PTX, ptxas's report (registers, spills) and SASS with its
   control codes. The plugin asks the driver for the device's compute capability first, so the
   child runs over a stand-in driver (`experiments/gpu/fake_libcuda.c`, built with `cc`) that
   answers 9.0 and fails everything else; the load after the compile fails, nothing runs. A
   deviceless XLA compile first (experiments/compile_offline.py's compile-only H200) registers
   LLVM's NVPTX target in the plugin.
2. The parent finds each kernel's main loops (back edges whose body holds HGMMA and no EXIT) and
   counts their instructions by the unit that runs them (`UNITS`), per (row, key) pair of the
   relation: warp instructions, SM clocks per pair on each unit at Hopper's per-SM rates
   (`LANES_PER_SM`), the issue slots, the stall cycles ptxas scheduled for one warp's pass
   (`stall_sum`: a lower bound on a warp's time per step; waits on MUFU results, wgmma and
   barriers come on top), and how the logit wgmmas are waited on (`hgmma_groups`: each issued
   group and the number of instructions between its last HGMMA and its wait).

What it cannot see, measured since (docs/kernel_notes.md, "Ninth session", H100): its serial model
predicted `overlap_softmax` 10-20% faster and it was 2-7% slower; and the backward turned out bound
by d_left's TMA reduce-adds into L2, traffic no instruction count shows. Read its numbers as what a
loop asks of each unit, not as a forecast of time.

Setup: experiments/compile_offline.py's venv, plus nvdisasm:

    python -m venv --system-site-packages .venv-gpu-aot
    .venv-gpu-aot/bin/pip install "jax-cuda13-plugin[with-cuda]==V" "jax-cuda13-pjrt==V" \\
        nvidia-cuda-nvdisasm        # V = this machine's jax version
    .venv-gpu-aot/bin/python -m experiments.sass_relation_kl --variants fused_64x64,fused_64x64_sched \\
        --head_dims 64,128 --out docs/raw/sass_relation_kl.json --keep_sass docs/raw/sass

Variants are check_relation_kl_mgpu's (`VARIANTS`). What this cannot give: the time. A unit's
clocks per pair bound the loop from below only if that unit runs every cycle; the measured
clocks per pair (docs/bench_relation_kl.md) against these bounds say how much of the loop runs in
series.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Hopper (compute capability 9.0) per-SM throughput, lanes per clock: the CUDA C++ Programming
# Guide's "Throughput of Native Arithmetic Instructions" (FP32 add/mul/FMA 128; 32-bit integer
# add, compare, min/max, logic and shift 64; exp2/log2/rcp 16; warp shuffle 32; conversions to or
# from 32-bit floats 16), and the tensor cores' 2048 dense bf16 FMAs per clock per SM (H100 SXM's
# 989 TFLOP/s over 132 SMs at 1.83 GHz). Which SASS opcode runs on which unit is ours (UNITS).
LANES_PER_SM = {"fp32": 128, "alu": 64, "imad": 64, "mufu": 16, "shfl": 32, "cvt": 16}
TENSOR_FMA_PER_SM_CLOCK = 2048
SCHEDULERS_PER_SM = 4
WARPS_PER_WARPGROUP = 4
COMPUTE_WARPGROUPS = 2  # the Mosaic kernels' compute warpgroups (one more issues the TMA loads)

UNITS = {
    "fp32": ("FFMA", "FADD", "FMUL", "FSWZADD", "FCHK"),
    "alu": (
        "FMNMX",
        "FSEL",
        "FSETP",
        "ISETP",
        "LOP3",
        "SHF",
        "IADD3",
        "LEA",
        "SEL",
        "PLOP3",
        "PRMT",
        "IMNMX",
        "MOV",
        "SGXT",
        "VIADD",
        "IABS",
        "BMSK",
        "FLO",
        "CS2R",
        "P2R",
        "R2P",
    ),  # fmt: skip
    "imad": ("IMAD",),
    "mufu": ("MUFU",),
    "shfl": ("SHFL",),
    "cvt": ("F2FP", "F2F", "F2I", "I2F", "I2FP", "FRND"),
    "tensor": ("HGMMA",),
    "uniform": ("R2UR", "S2UR"),  # and every U* opcode (the uniform datapath)
}
_UNIT_OF = {op: unit for unit, ops in UNITS.items() for op in ops}

_INSTRUCTION = re.compile(r"^\s*(\S+)\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`?\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")


def parse_sass(text: str):
    """([(address, stall, opcode, text)], {label: address}) of a Mosaic SASS dump with control
    codes (`wait:read:write:yield:stall address instruction`, MOSAIC_GPU_DUMP_SASS_CTRL)."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTRUCTION.match(line)
        if not m or ":" not in m.group(1):
            continue
        ctrl, address, body = m.group(1), int(m.group(2), 16), m.group(3)
        for label in pending:
            labels[label] = address
        pending = []
        instructions.append((address, int(ctrl.rsplit(":", 1)[1]), opcode(body), body))
    return instructions, labels


def opcode(body: str) -> str:
    """The opcode with its modifiers ("MUFU.EX2") of one instruction's text (predicate dropped)."""
    words = body.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def unit_of(op: str) -> str:
    """The unit an opcode's warp instruction occupies (UNITS; "uniform" for U*, else "other")."""
    base = op.split(".")[0]
    if base in _UNIT_OF:
        return _UNIT_OF[base]
    if base.startswith("U") and base not in ("UNKNOWN",):
        return "uniform"
    return "other"


def main_loops(instructions, labels):
    """[(first address, back-edge address)] of the loops whose body holds an HGMMA and no EXIT
    (this drops the out-of-line barrier retries at a kernel's end, which branch back into it),
    innermost first; a loop that contains another such loop is dropped."""
    loops = []
    for address, _, op, body in instructions:
        if not op.startswith("BRA"):
            continue
        m = _TARGET.search(body)
        start = labels.get(m.group(1)) if m else None
        if start is None or start > address:
            continue
        ops = [o for a, _, o, _ in instructions if start <= a <= address]
        if any(o.startswith("HGMMA") for o in ops) and not any(o.startswith("EXIT") for o in ops):
            loops.append((start, address))
    loops = sorted(set(loops))
    return [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]


def hgmma_groups(body):
    """One dict per run of HGMMAs that ends at a `WARPGROUP.DEPBAR` (a wgmma group and where it is
    waited on): its HGMMAs and FMAs; `instructions_before_wait`, between its last HGMMA and the
    wait; and its window, from its first HGMMA to the wait: `window_instructions`, the stall
    cycles ptxas scheduled there (`window_cycles`: what the warp does while the wgmma may run)
    and the exponentials among them (`window_mufu`). The loop is read around: a group still in
    flight at the back edge is waited on in the next step."""
    groups, group = [], None
    for k, (_, stall, op, _) in enumerate(body + body):
        if k >= len(body) and group is None:
            break  # the second pass only finishes a group left in flight at the back edge
        m = _HGMMA.match(op)
        if m:
            if k >= len(body):
                break  # already counted in the first pass
            if group is None:
                group = dict(
                    hgmma=0, fma=0, instructions_before_wait=0, window_instructions=0, window_cycles=0, window_mufu=0
                )
            else:
                group["window_instructions"] += 1
                group["window_cycles"] += stall
            group["hgmma"] += 1
            group["fma"] += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
            group["instructions_before_wait"] = 0
            continue
        if group is None:
            continue
        if op.startswith("WARPGROUP.DEPBAR"):
            groups.append(group)
            group = None
            continue
        group["instructions_before_wait"] += 1
        group["window_instructions"] += 1
        group["window_cycles"] += stall
        group["window_mufu"] += op.startswith("MUFU")
    return groups


def loop_profile(
    body, pairs_per_step: int, warps_per_step: int = WARPS_PER_WARPGROUP, concurrent: int = COMPUTE_WARPGROUPS
) -> dict:
    """Per (row, key) pair: what one step of the loop asks of each unit. `body`: one warp's
    instructions for the step; `warps_per_step` warps each run it and together cover
    `pairs_per_step` pairs (a Mosaic compute warpgroup: 4 warps, block_q x block_kv; a Triton
    program: num_warps warps, block_q x block_k); `concurrent` such steps run on an SM at once (the
    Mosaic kernels' two compute warpgroups; Triton programs resident per SM)."""
    per_pair = warps_per_step / pairs_per_step  # warp instructions per pair, per instruction in the body
    counts = collections.Counter(unit_of(op) for _, _, op, _ in body)
    ops = collections.Counter(op for _, _, op, _ in body)
    # an HGMMA is in each of a warpgroup's 4 warps' streams, and is one wgmma of the warpgroup
    tensor_fmas = (warps_per_step / WARPS_PER_WARPGROUP) * sum(
        int(m.group(1)) * int(m.group(2)) * int(m.group(3)) for _, _, op, _ in body if (m := _HGMMA.match(op))
    )
    clocks = {unit: counts[unit] * per_pair * 32 / lanes for unit, lanes in LANES_PER_SM.items()}
    clocks["tensor"] = tensor_fmas / pairs_per_step / TENSOR_FMA_PER_SM_CLOCK
    clocks["issue"] = len(body) * per_pair / SCHEDULERS_PER_SM
    stall = sum(s for _, s, _, _ in body)
    tensor_step = tensor_fmas / TENSOR_FMA_PER_SM_CLOCK  # the step's wgmmas, the SM's tensor cores to themselves
    groups = hgmma_groups(body)
    # what of the wgmmas the warp waits for: a group's time on the tensor cores less the cycles the
    # warp spends issuing its window (the SM's tensor cores to this step alone)
    scale = warps_per_step / WARPS_PER_WARPGROUP
    exposed = sum(max(0.0, g["fma"] * scale / TENSOR_FMA_PER_SM_CLOCK - g["window_cycles"]) for g in groups)
    softmax_step = stall * max(1.0, warps_per_step / SCHEDULERS_PER_SM)  # a scheduler's warps of the step in turn
    return {
        "instructions": len(body),
        "by_unit": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "top_opcodes": dict(ops.most_common(12)),
        "pairs_per_step": pairs_per_step,
        "warps_per_step": warps_per_step,
        "concurrent_steps": concurrent,
        "warp_instructions_per_pair": {u: round(c * per_pair, 6) for u, c in counts.items()},
        "sm_clocks_per_pair": {u: round(c, 6) for u, c in sorted(clocks.items(), key=lambda kv: -kv[1])},
        "bound_unit": max(clocks, key=clocks.get),
        "stall_sum": stall,
        # the step's scheduled cycles on a scheduler, over the pairs of the steps that run at once:
        # the loop's latency-bound clocks per pair per SM
        "stall_clocks_per_pair": round(softmax_step / (concurrent * pairs_per_step), 6),
        # two bracketing models of the step, from the listing alone (variable latencies ignored):
        # "serial", the step's wgmmas then its softmax and the concurrent steps one after the
        # other; "alternating", the concurrent steps filling each other's gaps (FlashAttention-3's
        # ping-pong at its best), never below a unit's own bound
        "serial_clocks_per_pair": round((exposed + softmax_step) / pairs_per_step, 6),
        "alternating_clocks_per_pair": round(
            max((exposed + softmax_step) / (concurrent * pairs_per_step), *clocks.values()), 6
        ),
        "tensor_clocks_per_step": round(tensor_step, 1),
        "exposed_tensor_clocks_per_step": round(exposed, 1),
        "tensor_fma_per_pair": round(tensor_fmas / pairs_per_step, 1),
        "hgmma_groups": groups,
        "masked": any(op.startswith("FSEL") for _, _, op, _ in body),
    }


def parse_ptxas(text: str) -> dict:
    """Registers, spill bytes and named barriers from ptxas's -v report."""
    out = {}
    for key, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
        ("barriers", r"used (\d+) barriers"),
    ):
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1))
    return out


def kernel_report(sass_text: str, ptxas_text: str, pairs_per_step: int, **step) -> dict:
    """ptxas's report and each main loop's profile (`loop_profile`; `step`: its warps_per_step,
    concurrent)."""
    instructions, labels = parse_sass(sass_text)
    loops = []
    for start, end in main_loops(instructions, labels):
        body = [i for i in instructions if start <= i[0] <= end]
        loops.append({"start": hex(start), "end": hex(end), **loop_profile(body, pairs_per_step, **step)})
    return {"ptxas": parse_ptxas(ptxas_text), "instructions": len(instructions), "loops": loops}


# ----------------------------------------------------------------------------------------------
# The compile (child process: over the stand-in driver, with Mosaic's dumps on)

KERNEL_NAMES = {"fwd": "relation_kl_mgpu_fwd", "bwd": "relation_kl_mgpu_dfused"}
SETUP = (
    "needs JAX's CUDA plugin and nvdisasm beside this jax ({version}): python -m venv "
    "--system-site-packages .venv-gpu-aot && .venv-gpu-aot/bin/pip install "
    '"jax-cuda13-plugin[with-cuda]=={version}" "jax-cuda13-pjrt=={version}" nvidia-cuda-nvdisasm; '
    "then run this module with .venv-gpu-aot/bin/python"
)


class SetupError(RuntimeError):
    """What the static profile needs is missing: the CUDA plugin, nvdisasm or a C compiler."""


def _cuda_root() -> str:
    """The pip CUDA directory that holds bin/nvdisasm (nvidia-cuda-nvdisasm)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec else ():
        for root in sorted(glob.glob(os.path.join(base, "cu*"))):
            if os.path.exists(os.path.join(root, "bin", "nvdisasm")):
                return root
    import jax

    raise SetupError("no nvdisasm; " + SETUP.format(version=jax.__version__))


def _ptxas() -> str:
    """The ptxas Mosaic's compile runs (the first on PATH; else nvidia-cuda-nvcc's), used for the
    Triton kernels' PTX too, so that both listings come from one compiler."""
    return shutil.which("ptxas") or os.path.join(_cuda_root(), "bin", "ptxas")


def build_stand_in_driver(directory: str) -> str:
    """Compile experiments/gpu/fake_libcuda.c to directory/libcuda.so.1; the directory."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu", "fake_libcuda.c")
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise SetupError("no C compiler (cc, gcc or clang) to build the stand-in driver " + source)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", os.path.join(directory, "libcuda.so.1"), source], check=True
    )
    return directory


def _lowerable(variant_name: str, head_dim: int, seq_len: int):
    """{kind: (jitted kernel, abstract arguments)} of one check_relation_kl_mgpu variant."""
    import jax
    import jax.numpy as jnp

    from experiments.check_relation_kl_mgpu import VARIANTS, variant_kernels

    variant = {v[0]: v for v in VARIANTS}[variant_name]
    fwd, bwd = variant_kernels(variant, scale=head_dim**-0.5, causal=True)
    x = jax.ShapeDtypeStruct((1, seq_len, 2, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, 2, seq_len), jnp.float32)
    return {
        "fwd": (jax.jit(lambda s, t: fwd(s, s, t, t)), (x, x)),
        "bwd": (jax.jit(lambda s, t, ls, lt, g: bwd(s, s, t, t, ls, lt, g)), (x, x, rows, rows, rows)),
    }


def _child(variant_name: str, head_dim: int, seq_len: int, kinds) -> None:
    """Compile each kernel's Mosaic module in the CUDA plugin (dumps go to MOSAIC_GPU_DUMP_TO)."""
    import ctypes

    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import core

    from experiments import compile_offline

    os.environ["MOSAIC_GPU_CUDA_ROOT"] = _cuda_root()  # jax sets its own at import
    device = compile_offline.compile_only_device("h200")  # registers LLVM's NVPTX target, once compiled
    sharding = jax.sharding.SingleDeviceSharding(device)
    one = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)
    jax.jit(jnp.exp, in_shardings=sharding, out_shardings=sharding).trace(one).lower().compile()
    try:
        import jax_plugins.xla_cuda13 as plugin
    except ImportError:
        import jax_plugins.xla_cuda12 as plugin
    compile_module = ctypes.CDLL(plugin._get_library_path()).MosaicGpuCompile
    compile_module.argtypes, compile_module.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_void_p
    for kind, (fn, args) in _lowerable(variant_name, head_dim, seq_len).items():
        if kind not in kinds:
            continue
        before = set(core.KNOWN_KERNELS)
        fn.trace(*args).lower(lowering_platforms=("cuda",))
        for key in set(core.KNOWN_KERNELS) - before:
            module = core.KNOWN_KERNELS[key]
            # returns NULL: the load after the compile fails on the stand-in driver (expected)
            compile_module(ctypes.c_char_p(module), len(module))


def compile_variant(variant_name: str, head_dim: int, kinds, dump_dir: str, driver_dir: str, seq_len=1024):
    """Run the child for one variant and head dim; {kind: (sass text, ptxas text)}."""
    env = dict(os.environ)
    env.update(
        LD_LIBRARY_PATH=driver_dir + os.pathsep + env.get("LD_LIBRARY_PATH", ""),
        PATH=os.path.dirname(_ptxas()) + os.pathsep + env.get("PATH", ""),
        MOSAIC_GPU_DUMP_TO=dump_dir,
        MOSAIC_GPU_DUMP_SASS_CTRL="1",
        MOSAIC_GPU_DUMP_PTXAS="1",
        JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
        CUDA_VISIBLE_DEVICES="-1",
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for kind in kinds:
        # one process a kernel: the plugin aborts on a second compile after a failed load
        cmd = [
            sys.executable,
            "-m",
            "experiments.sass_relation_kl",
            "--_child",
            variant_name,
            str(head_dim),
            str(seq_len),
            kind,
        ]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
        found = sorted(glob.glob(os.path.join(dump_dir, KERNEL_NAMES[kind] + "_*.sass_ctrl")))
        if not found:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(
                f"{variant_name} D{head_dim} {kind}: no SASS was dumped (exit {proc.returncode}):\n{tail}"
            )
        with open(found[-1]) as f:
            sass = f.read()
        ptxas_path = found[-1].replace(".sass_ctrl", ".ptxas")
        ptxas = open(ptxas_path).read() if os.path.exists(ptxas_path) else ""
        out[kind] = (sass, ptxas, found[-1])
    return out


# ----------------------------------------------------------------------------------------------
# The Triton kernels ("pallas_gpu"): XLA compiles them for a compile-only H200 and dumps their PTX;
# ptxas and nvdisasm (pip) make the SASS, whose control codes are read from the encoding.

TRITON_KERNELS = ("fwd", "dleft", "dright")
TRITON_SHAPES = {64: (4, 8192, 15), 128: (1, 16384, 32)}  # (B, T, heads): SmolLM2's merged layer, the 7B's
_ENCODED = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* (0x[0-9a-f]{16}) \*/\s*$")
_HIGH_WORD = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")


def _wait_mask(wait: int) -> str:
    """The barriers an instruction waits on, as Mosaic's listing writes them ("-", "2", "2&1", "0x32")."""
    bits = [str(b) for b in range(5, -1, -1) if wait >> b & 1]
    return "-" if not bits else "&".join(bits) if len(bits) <= 2 else f"0x{wait:x}"


def control_listing(nvdisasm_hex: str) -> str:
    """`nvdisasm -hex -c` output rewritten as Mosaic's SASS_CTRL listing
    (`wait:read:write:yield:stall /*address*/ instruction`), so that `parse_sass` reads both. The
    control bits are bits 41-61 of each instruction's high word: stall (4), yield (1), write
    barrier (3), read barrier (3), wait mask (6), as Jia et al. decoded them for Volta. On Hopper
    the decode reproduces Mosaic's own listing of the same cubin field for field (1,920
    instructions of the forward, ptxas 13.0; tests/test_sass_relation_kl.py keeps a sample)."""
    out, lines = [], nvdisasm_hex.splitlines()
    for k, line in enumerate(lines):
        m = _ENCODED.search(line)
        high = _HIGH_WORD.match(lines[k + 1]) if m and k + 1 < len(lines) else None
        if not m or not high:
            if line.strip().endswith(":") and line.strip().startswith(".L_x_"):
                out.append(line.strip())
            continue
        c = int(high.group(1), 16) >> 41
        stall, yields, write, read, wait = c & 15, (c >> 4) & 1, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 63
        ctrl = ":".join(
            (
                _wait_mask(wait),
                str(read) if read != 7 else "-",
                str(write) if write != 7 else "-",
                "Y" if yields else "-",
                f"{stall:02d}",
            )
        )
        out.append(f"   {ctrl}        /*{m.group(1)}*/                   {m.group(2)} ;")
    return "\n".join(out)


def _triton_child(head_dim: int, B: int, T: int, H: int, field: str = "plain") -> None:
    """Compile d(sum of relation_kl(impl="pallas_gpu"))/d(student) for the compile-only H200, on
    the tile table's blocks (`field`: one boolean BlockSizes field set, or "plain"); XLA_FLAGS
    (set by the parent) dumps the Triton kernels' PTX."""
    import jax
    import jax.numpy as jnp

    from experiments import compile_offline
    from pallas_kernels.relation_kl import relation_kl

    sharding = jax.sharding.SingleDeviceSharding(compile_offline.compile_only_device("h200"))
    x = jax.ShapeDtypeStruct((B, T, H, head_dim), jnp.bfloat16, sharding=sharding)

    blocks = triton_blocks(head_dim, B, T, H, field)

    def loss(s, t):
        return relation_kl(s, s, t, t, causal=True, impl="pallas_gpu", block_sizes=blocks).sum()

    jax.jit(jax.grad(loss), in_shardings=(sharding, sharding), out_shardings=sharding).trace(x, x).lower().compile()


def triton_blocks(head_dim: int, B: int, T: int, H: int, field: str = "plain"):
    """The tile table's blocks for the shape, with one boolean field set unless `field` is "plain"."""
    import dataclasses

    from pallas_kernels import blocks as _blocks

    blocks = _blocks.pick_blocks(None, "pallas_gpu", T, head_dim * 2, batch_heads=B * H)
    return blocks if field == "plain" else dataclasses.replace(blocks, **{field: True})


def compile_triton(head_dim: int, shape, dump_dir: str, field: str = "plain") -> dict:
    """{kind: (SASS listing, ptxas report)} of the three Triton kernels at one shape."""
    B, T, H = shape
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_dump_to={dump_dir}", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", CUDA_VISIBLE_DEVICES="-1")
    cmd = [
        sys.executable,
        "-m",
        "experiments.sass_relation_kl",
        "--_triton_child",
        str(head_dim),
        str(B),
        str(T),
        str(H),
        field,
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    bin_dir = os.path.join(_cuda_root(), "bin")
    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        with open(path) as f:
            ptx = f.read()
        m = re.search(r"\.entry relation_kl_(fwd|dleft|dright)\(", ptx)
        if not m:
            continue
        cubin = path[: -len(".ptx")] + ".cubin"
        report = subprocess.run(
            [_ptxas(), "-arch=sm_90a", "-v", "-o", cubin, path],
            capture_output=True,
            text=True,
            check=True,
        )
        listing = subprocess.run(
            [os.path.join(bin_dir, "nvdisasm"), "-hex", "-c", cubin], capture_output=True, text=True, check=True
        ).stdout
        out[m.group(1)] = (control_listing(listing), report.stdout + report.stderr)
    missing = [k for k in TRITON_KERNELS if k not in out]
    if missing:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(
            f"Triton D{head_dim}: no PTX for {missing} in the XLA dump (exit {proc.returncode}):\n{tail}"
        )
    return out


def ctas_per_sm(registers: int, warps: int) -> int:
    """Programs an SM holds by its 64K registers alone (allocated per thread in steps of 8)."""
    per_thread = -(-max(registers, 1) // 8) * 8
    return max(1, 65536 // (per_thread * 32 * warps))


def triton_rows(head_dim: int, shape, dump_dir: str, keep_dir=None, field: str = "plain") -> list:
    blocks = triton_blocks(head_dim, *shape, field)
    steps = {
        "fwd": (blocks.block_q * blocks.block_k, blocks.num_warps_fwd),
        "dleft": (blocks.block_q_dq * blocks.block_k_dq, blocks.num_warps_bwd),
        "dright": (blocks.block_q_dk * blocks.block_k_dk, blocks.num_warps_bwd),
    }
    rows = []
    name = "triton" if field == "plain" else f"triton:{field}"
    for kind, (listing, report) in compile_triton(head_dim, shape, dump_dir, field).items():
        pairs, warps = steps[kind]
        regs = parse_ptxas(report).get("registers", 255)
        row = {
            "variant": name,
            "head_dim": head_dim,
            "kernel": kind,
            "shape": dict(zip(("B", "T", "H"), shape)),
            "blocks": blocks.__dict__ if hasattr(blocks, "__dict__") else str(blocks),
            **kernel_report(listing, report, pairs, warps_per_step=warps, concurrent=ctas_per_sm(regs, warps)),
        }
        rows.append(row)
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            stem = "triton" if field == "plain" else f"triton_{field}"
            with open(os.path.join(keep_dir, f"{stem}_d{head_dim}_{kind}.sass"), "w") as f:
                f.write(listing)
    return rows


def pairs_per_step(variant_name: str) -> int:
    from experiments.check_relation_kl_mgpu import VARIANTS

    _, block_q, block_kv, *_ = {v[0]: v for v in VARIANTS}[variant_name]
    return block_q * block_kv


def table(rows) -> str:
    units = ("mufu", "tensor", "fp32", "alu", "issue", "cvt")
    lines = [
        "| variant | D | kernel | loop | regs | instr | "
        + " | ".join(f"{u} clk/pair" for u in units)
        + " | stall clk/pair | serial | alternating | wgmma windows (instr/MUFU) |",
        "|---|---|---|---|---|---|" + "---|" * len(units) + "---|---|---|---|",
    ]
    for r in rows:
        for k, lp in enumerate(r["loops"]):
            clocks = lp["sm_clocks_per_pair"]
            waits = ", ".join(f"{g['window_instructions']}/{g['window_mufu']}" for g in lp["hgmma_groups"])
            lines.append(
                f"| {r['variant']} | {r['head_dim']} | {r['kernel']} | {k}{' masked' if lp['masked'] else ''} "
                f"| {r['ptxas'].get('registers', '?')} | {lp['instructions']} | "
                + " | ".join(f"{clocks.get(u, 0):.3f}" for u in units)
                + f" | {lp['stall_clocks_per_pair']:.3f} | {lp['serial_clocks_per_pair']:.3f}"
                + f" | {lp['alternating_clocks_per_pair']:.3f} | {waits} |"
            )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_triton_child"]:
        _triton_child(*(int(v) for v in argv[1:5]), *argv[5:6])
        return None
    if argv[:1] == ["--_child"]:
        _, variant_name, head_dim, seq_len, kinds = argv
        _child(variant_name, int(head_dim), int(seq_len), kinds.split(","))
        return None
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--variants",
        default="fused_64x64,fused_64x64_sched,fused_64x64_pair",
        help="check_relation_kl_mgpu VARIANTS names",
    )
    p.add_argument("--head_dims", default="64,128")
    p.add_argument("--kernels", default="fwd,bwd", help="fwd (forward), bwd (one-kernel backward)")
    p.add_argument("--out", default=None, help="JSON")
    p.add_argument("--keep_sass", default=None, help="directory to copy each kernel's SASS and ptxas report into")
    p.add_argument(
        "--triton",
        nargs="?",
        const="plain",
        default="",
        help="also the Triton kernels (impl='pallas_gpu') at each head dim, at TRITON_SHAPES: a comma list of "
        "'plain' (the tile table's blocks) and boolean BlockSizes fields to set (e.g. plain,overlap_softmax)",
    )
    a = p.parse_args(argv)
    from experiments.check_relation_kl_mgpu import VARIANTS

    known = {v[0]: v for v in VARIANTS}
    variants = [v for v in a.variants.split(",") if v]
    kinds = [k for k in a.kernels.split(",") if k]
    head_dims = [int(d) for d in a.head_dims.split(",") if d]
    for v in variants:
        if v not in known:
            p.error(f"unknown variant {v!r}; expected some of {sorted(known)}")
        if not known[v][4]:
            p.error(f"variant {v!r} has the two-kernel backward; this reads the one-kernel ones (fused_*)")
    for k in kinds:
        if k not in KERNEL_NAMES:
            p.error(f"unknown kernel {k!r}; expected some of {sorted(KERNEL_NAMES)}")
    from pallas_kernels.blocks import BOOL_FIELDS

    flags = sorted(BOOL_FIELDS)
    triton_fields = [f for f in a.triton.split(",") if f]
    for f in triton_fields:
        if f != "plain" and f not in flags:
            p.error(f"--triton: {f!r} is neither 'plain' nor a boolean BlockSizes field ({flags})")
    if triton_fields:
        for d in head_dims:
            if d not in TRITON_SHAPES:
                p.error(f"--triton: no shape for head dim {d}; expected some of {sorted(TRITON_SHAPES)}")
    import jax

    try:
        import jax_plugins  # noqa: F401

        _cuda_root()
    except (ImportError, SetupError):
        p.error(SETUP.format(version=jax.__version__))
    version = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    result = {
        "jax": jax.__version__,
        "ptxas": f"{_ptxas()}: {version[-1]}" if version else _ptxas(),
        "command": "python -m experiments.sass_relation_kl " + " ".join(argv),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        driver = build_stand_in_driver(tmp)
        for v in variants:
            for d in head_dims:
                if d not in known[v][3]:
                    print(f"skip {v} at D {d} (the variant is for head dims {known[v][3]})", flush=True)
                    continue
                dump = tempfile.mkdtemp(dir=tmp)
                compiled = compile_variant(v, d, kinds, dump, driver)
                for kind, (sass, ptxas, path) in compiled.items():
                    row = {"variant": v, "head_dim": d, "kernel": kind, **kernel_report(sass, ptxas, pairs_per_step(v))}
                    result["rows"].append(row)
                    if a.keep_sass:
                        os.makedirs(a.keep_sass, exist_ok=True)
                        stem = os.path.join(a.keep_sass, f"{v}_d{d}_{kind}")
                        shutil.copy(path, stem + ".sass")
                        if ptxas:
                            with open(stem + ".ptxas", "w") as f:
                                f.write(ptxas)
                    print(f"{v} D{d} {kind}: {row['ptxas']}, {len(row['loops'])} main loop(s)", flush=True)
        for field in triton_fields:
            for d in head_dims:
                rows = triton_rows(d, TRITON_SHAPES[d], tempfile.mkdtemp(dir=tmp), a.keep_sass, field)
                result["rows"].extend(rows)
                for row in rows:
                    print(
                        f"{row['variant']} D{d} {row['kernel']}: {row['ptxas']}, {len(row['loops'])} main loop(s)",
                        flush=True,
                    )
    print(table(result["rows"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
