"""End-to-end LinearARD step on real 7B/8B shapes with random weights (no download).

    python -m experiments.bench_restore_step --models llama2_7b,llama3_8b --seq_len 4096 --out results.json
    python -m experiments.bench_restore_step --models llama2_7b --seq_len 4096 --layouts_all --out layouts.json

Measures, per model shape: the full jitted step (teacher forward; student forward+backward;
Q/Q, K/K, V/V relation KL over all layers; AdamW update of q/k/v) as tokens/s, median step time
and peak device memory. The step is the library's, placed as the pipeline places it: weights with
lard_jax.sharding's shardings, `trainer.init_trainable_sharded` / `init_state` /
`jit_train_step` (state donated, kept in its shardings). Also a split of the step into
SEPARATELY JITTED parts (teacher forward, student forward+backward of a loss that only sums the
student's q/k/v, the relation loss with its own backward, the optimizer update). The parts are
timed alone, so their sum differs from the fused step by whatever XLA overlaps or fuses across them.
With several devices, `--mesh data` shards the batch (per-device batch fixed) and reports scaling.

Layout: `--layout scan` (default, as configs/base.py: decoder layers under one lax.scan, parameters
stacked) or `loop` (a Python loop over per-layer parameters); `--fused` (default, as configs/base.py:
teacher and student layer by layer in one pass, losses.fused_relation_loss) or `--no_fused` (both
forwards, then the relation loss). `--layouts_all` runs loop/unfused, scan/unfused and scan/fused
in this one process (no split) and prints and writes a table: tokens/s, memory, ratio to the best;
`--variants loop/unfused/full,scan/fused/none,...` does the same for any list of (layout, loss,
remat) triples, so remat policies are compared in one process too.
Memory per step: `compiled_gib`, the compiled step's arguments + outputs - donated + XLA's temp
buffer (its memory_analysis; what the step holds while it runs), comparable between runs of one
process; `peak_gib` is the device's peak_bytes_in_use since the process started (exact for the
first run of a process only: it never goes down).

FLOPs come from `lard_jax.flops.executed_flops_per_token`, convention "executed model FLOPs (no
remat recompute)": the matmuls the compiled step runs (teacher forward without the dead LM head;
student forward; student backward = input gradients down to layer 0 plus weight gradients of the
trainable projections only), attention with causal halving where the kernel skips masked tiles.
Fields (per device, against the chip's dense bf16 peak):
  mfu_executed                 executed model FLOPs / s / peak (replaces the earlier `mfu`, which
                               counted 6N for the student and the LM head: 57.2 vs 45.2 GFLOP/token
                               for Llama-2-7B at T = 4096)
  mfu_executed_incl_relation   the same plus the relation-KL kernel's forward + backward (its
                               backward recompute excluded)
  hfu_executed_all             every executed matmul: + relation recompute, flash-attention
                               recompute, remat recompute
and `gflop_per_token`, the whole breakdown. `--lora_rank R` trains LoRA factors instead of the
projections (the authors' variant: r 1024, alpha 2048, dropout 0.05, i.e. the unmerged path).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from lard_jax import flops as flops_lib
from lard_jax import losses, trainer
from lard_jax import sharding as sharding_lib
from lard_jax.model import REMAT_POLICIES, LlamaConfig, LlamaForCausalLM, collect_qkv, stacked_qkv
from lard_jax.presets import MODEL_SHAPES
from pallas_kernels.blocks import parse_impl_spec

_START = time.perf_counter()


def _progress(msg: str) -> None:
    """One line on stderr with the seconds since the process started (a run cut by its time
    limit then shows where its time went)."""
    print(f"[bench_restore_step {time.perf_counter() - _START:7.1f} s] {msg}", file=sys.stderr, flush=True)


# configs/base.py's defaults (c.model.scan_layers, c.loss.fused, c.model.remat), not imported: ml_collections is
# not needed to run this bench (tests/test_bench_layouts.py checks the two agree)
DEFAULT_LAYOUT = "scan"
# layout -> (scan_layers, LlamaConfig.scan_grads): "scan" is the configs' (per-layer gradients in
# the compute dtype, lard_jax.layer_scan); "scan_jaxgrad" differentiates the same scan with JAX's own
# transpose (one float32 accumulator for the stacks: the default until issue 22 part 3's fix)
LAYOUTS = {"loop": (False, "compute_dtype"), "scan": (True, "compute_dtype"), "scan_jaxgrad": (True, "jax")}
DEFAULT_FUSED = True
DEFAULT_REMAT = "dots_no_batch_attention"
LAYOUTS_ALL = (("loop", False), ("scan", False), ("scan", True))  # --layouts_all: (layout, fused)
PROFILE_STEPS = 2  # --profile_dir: steps traced per run (experiments/trace_summary.py --steps 2)

SHAPES = {
    "llama2_7b": MODEL_SHAPES["llama2_7b"],
    "llama3_8b": MODEL_SHAPES["llama3_8b"],
    "smollm2_135m": MODEL_SHAPES["smollm2_135m"],  # the real-model runs' shape (student: linear x8 here)
    "tiny": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}


def _time(fn, *args, reps=5, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _compiled_bytes(compiled):
    """What the compiled step holds while it runs: arguments + outputs - donated (aliased) + XLA's
    temp buffer, from its memory_analysis (None where the backend gives none)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend/version implements it
        return None
    if m is None:
        return None
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


@dataclasses.dataclass
class BuiltStep:
    """The library's step as the pipeline places it, ready to lower or run."""

    mesh: Any
    cfg: LlamaConfig  # the teacher's (scan_layers set for the scanned layout)
    teacher: LlamaForCausalLM
    student: LlamaForCausalLM
    frozen: Any
    state: Any
    optimizer: Any
    spec: Any
    ids: Any  # [1, batch, T]
    step: Any  # trainer.jit_train_step(...): step(state, frozen, {"input_ids": ids})

    @property
    def batch(self) -> dict:
        return {"input_ids": self.ids}


def random_weights(abstract, shardings, key):
    """Random normal weights (std 0.02; vectors: ones) of `abstract`'s shapes, generated on the
    device in `shardings` (no host copy of 7B). One small program per distinct (shape, dtype,
    sharding), run once per leaf with its own key: one program for the whole tree took 138 s to
    compile on the H200 (18 s on CPU at toy sizes), mostly its 291 random-number fusions."""
    programs = {}

    def leaf(k, a, sharding):
        sig = (a.shape, jnp.dtype(a.dtype), sharding)
        if sig not in programs:
            if a.ndim > 1:
                make = lambda k: (0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)  # noqa: E731
            else:
                make = lambda k: jnp.ones(a.shape, a.dtype)  # noqa: E731
            programs[sig] = jax.jit(make, out_shardings=sharding)
        return programs[sig](k)

    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    keys = jax.random.split(key, len(leaves))
    shard_leaves = treedef.flatten_up_to(shardings)
    return jax.tree_util.tree_unflatten(treedef, [leaf(k, a, sh) for k, a, sh in zip(keys, leaves, shard_leaves)])


def _models(shape: dict, remat: str, attention_impl: str, scan_layers: bool = False, scan_grads="compute_dtype"):
    """(teacher config, teacher, student): bf16 weights of `shape`; the student is the teacher
    with linear x8 RoPE (the 7B recipe's 4K -> 32K)."""
    cfg = LlamaConfig(
        **shape,
        dtype="bfloat16",
        param_dtype="bfloat16",
        remat=remat,
        attention_impl=attention_impl,
        scan_layers=scan_layers,
        scan_grads=scan_grads,
    )
    student_cfg = cfg.replace(
        rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=cfg.max_position_embeddings * 8
    )
    return cfg, LlamaForCausalLM(cfg), LlamaForCausalLM(student_cfg)


def abstract_step(
    shape: dict,
    *,
    seq_len,
    batch_per_device=1,
    remat=DEFAULT_REMAT,
    kernel_impl="auto",
    attention_impl="xla",
    layout=DEFAULT_LAYOUT,
    fused=DEFAULT_FUSED,
    device=None,
    trainable_dtype=jnp.float32,
):
    """(step, (state, frozen, batch)): `build_step`'s jitted step on ONE device and its arguments as
    ShapeDtypeStructs, so `step.lower(*args).compile()` compiles it without allocating a weight.
    `device` (default jax.devices()[0]) may be a device of a compile-only topology
    (jax.experimental.topologies): experiments/compile_offline.py compiles the H200 step on a
    machine without a GPU this way. Same models, state layout and shardings as build_step."""
    device = jax.devices()[0] if device is None else device
    mesh = sharding_lib.make_mesh(data=1, devices=[device])
    scan, scan_grads = LAYOUTS[layout]
    _, teacher, student = _models(shape, remat, attention_impl, scan_layers=scan, scan_grads=scan_grads)
    abstract = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    shardings = sharding_lib.param_shardings(abstract, mesh)
    sds = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    frozen = jax.tree_util.tree_map(sds, abstract, shardings)
    lora = trainer.LoraSpec()
    mask = trainer.trainable_mask(frozen)
    trainable = jax.eval_shape(
        lambda f: jax.tree_util.tree_map(
            lambda x: x.astype(trainable_dtype), trainer.init_trainable(f, mask, lora, jax.random.PRNGKey(3))
        ),
        frozen,
    )
    optimizer, schedule = trainer.make_optimizer(lr=2e-5, warmup_steps=4, total_steps=144)
    abstract_state = jax.eval_shape(lambda t: trainer.initial_state(t, optimizer, jax.random.PRNGKey(0)), trainable)
    replicated = sharding_lib.replicated(mesh)  # one device: every leaf is whole on it (trainer.place_state)
    state = jax.tree_util.tree_map(lambda x: sds(x, replicated), abstract_state)
    spec = loss_spec(kernel_impl, fused)
    bsh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    batch = {"input_ids": jax.ShapeDtypeStruct((1, batch_per_device, seq_len), jnp.int32, sharding=bsh)}
    step = trainer.jit_train_step(teacher, student, spec, lora, optimizer, schedule, state)
    return step, (state, frozen, batch)


def build_step(
    shape: dict,
    *,
    seq_len,
    batch_per_device,
    remat,
    kernel_impl,
    attention_impl,
    mesh_data=1,
    lora=trainer.LoraSpec(),
    layout=DEFAULT_LAYOUT,
    fused=DEFAULT_FUSED,
) -> BuiltStep:
    """Random weights of `shape` (generated on device, with the library's shardings), the
    trainable tree and optimizer state on the mesh, a random batch and the jitted step."""
    devices = jax.devices()[:mesh_data]
    mesh = sharding_lib.make_mesh(data=mesh_data, devices=devices)
    cfg, teacher, student = _models(shape, remat, attention_impl)
    scan, scan_grads = LAYOUTS[layout]
    abstract = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    shardings = sharding_lib.param_shardings(abstract, mesh)

    frozen = random_weights(abstract, shardings, jax.random.PRNGKey(1))
    if scan:  # the same weights stacked (shardings kept, the layer axis in front; per-layer buffers freed)
        frozen = trainer.to_layout(frozen, True, delete_source=True)
        cfg, teacher, student = _models(shape, remat, attention_impl, scan_layers=True, scan_grads=scan_grads)
    # The library's step as the pipeline runs it: trainable tree and state placed on the mesh,
    # the jitted step donating the state and returning it in the same shardings.
    mask = trainer.trainable_mask(frozen)
    trainable = trainer.init_trainable_sharded(frozen, mask, lora, jax.random.PRNGKey(3), mesh, jnp.float32)
    optimizer, schedule = trainer.make_optimizer(lr=2e-5, warmup_steps=4, total_steps=144)
    state = trainer.init_state(trainable, optimizer, jax.random.PRNGKey(0), mesh)
    spec = loss_spec(kernel_impl, fused)
    bsh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    ids = jax.device_put(
        jax.random.randint(jax.random.PRNGKey(2), (1, batch_per_device * mesh_data, seq_len), 0, shape["vocab_size"]),
        bsh,
    )
    step = trainer.jit_train_step(teacher, student, spec, lora, optimizer, schedule, state)
    return BuiltStep(mesh, cfg, teacher, student, frozen, state, optimizer, spec, ids, step)


def bench_one(
    name,
    *,
    seq_len,
    batch_per_device,
    remat,
    kernel_impl,
    attention_impl,
    mesh_data,
    reps,
    split,
    lora=trainer.LoraSpec(),
    layout=DEFAULT_LAYOUT,
    fused=DEFAULT_FUSED,
    profile_dir="",
):
    _progress(f"{name} {layout}/{'fused' if fused else 'unfused'}/{remat} dp{mesh_data}: building")
    built = build_step(
        SHAPES[name],
        seq_len=seq_len,
        batch_per_device=batch_per_device,
        remat=remat,
        kernel_impl=kernel_impl,
        attention_impl=attention_impl,
        mesh_data=mesh_data,
        lora=lora,
        layout=layout,
        fused=fused,
    )
    mesh, cfg, teacher, student, frozen = built.mesh, built.cfg, built.teacher, built.student, built.frozen
    state, optimizer, spec, ids, batch, step = (
        built.state,
        built.optimizer,
        built.spec,
        built.ids,
        built.batch,
        built.step,
    )
    batch_size = batch_per_device * mesh_data
    result = {
        "model": name,
        "seq_len": seq_len,
        "batch": batch_size,
        "devices": mesh_data,
        "layout": layout,
        "fused": fused,
        "remat": remat,
        "kernel_impl": kernel_impl,
        "attention_impl": attention_impl,
        "lora": dataclasses.asdict(lora) if lora.enabled else None,
        "params_b": sum(x.size for x in jax.tree_util.tree_leaves(frozen)) / 1e9,
    }
    with sharding_lib.use_mesh(mesh):
        t0 = time.perf_counter()
        _progress("built; compiling")
        step = step.lower(state, frozen, batch).compile()  # the executable run below (state still donated)
        _progress(f"compiled in {time.perf_counter() - t0:.1f} s; warm-up and {reps} timed steps")
        nbytes = _compiled_bytes(step)
        result["compiled_gib"] = None if nbytes is None else nbytes / 2**30
        for _ in range(2):  # compile, then one more warm-up call (compile_s covers both, as before)
            state, m = step(state, frozen, batch)
            jax.block_until_ready(m)
        result["compile_s"] = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            state, m = step(state, frozen, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        result["step_s"] = statistics.median(times)
        result["loss"] = float(m["loss"])
        result["peak_gib"] = (_peak_bytes() or 0) / 2**30
        _progress(f"step {result['step_s'] * 1e3:.1f} ms, peak {result['peak_gib']:.1f} GiB")
        if profile_dir:  # PROFILE_STEPS more steps under jax.profiler, after the timed ones and the peak memory read
            loss = "fused" if fused else "unfused"
            trace_dir = os.path.join(profile_dir, f"{name}_{layout}_{loss}_{remat}_dp{mesh_data}")
            with jax.profiler.trace(trace_dir):
                for _ in range(PROFILE_STEPS):
                    state, m = step(state, frozen, batch)
                    jax.block_until_ready(m)
            result["profile_dir"], result["profile_steps"] = trace_dir, PROFILE_STEPS
        tokens = batch_size * seq_len
        result["tokens_per_s"] = tokens / result["step_s"]
        fl = flops_lib.executed_flops_per_token(
            cfg,
            seq_len=seq_len,
            relations=spec.relations,
            layers=spec.layers,
            remat=remat,
            lora_rank=lora.rank,
            lora_merged=lora.merged,
            micro_batch=batch_per_device,
        )
        peak = trainer.peak_flops_per_device()
        result["flops_convention"] = fl["convention"]
        result["attention_causal_halving"] = fl["attention_causal_halving"]
        result["gflop_per_token"] = {k: v / 1e9 for k, v in fl.items() if isinstance(v, float)}
        result["peak_tflops_per_device"] = peak / 1e12 if peak else None
        tps = result["tokens_per_s"]
        result["mfu_executed"] = flops_lib.mfu(fl, tps, peak, mesh_data)
        result["mfu_executed_incl_relation"] = flops_lib.mfu(
            fl["model_total"] + fl["relation_total"], tps, peak, mesh_data
        )
        result["hfu_executed_all"] = flops_lib.mfu(fl, tps, peak, mesh_data, key="executed_total")
        print(json.dumps(result), flush=True)  # the step's numbers, before the (slow to compile) split
        if split:
            result["split_s"] = _split(teacher, student, frozen, state.trainable, ids[0], spec, optimizer, reps, lora)
            rel = (fl["relation_total"] + fl["relation_backward_recompute"]) * tokens / mesh_data
            result["relation_split_tflops_executed"] = rel / result["split_s"]["relation_loss_fwd_bwd"] / 1e12
    return result


def _split(teacher, student, frozen, trainable, ids, spec, optimizer, reps, lora):
    # Every big array is an argument, never a closure constant (XLA would embed gigabytes).
    def qkv(model, params, ids):  # per-layer list, or stacked {q, k, v} for the scan layout (no slicing)
        _, st = model.apply({"params": params}, ids, mutable=["intermediates"])
        stacked = stacked_qkv(st["intermediates"])
        return collect_qkv(st["intermediates"]) if stacked is None else stacked

    teacher_fwd = jax.jit(lambda f, x: qkv(teacher, f, x))
    t_layers = teacher_fwd(frozen, ids)

    def student_proxy(t, f, x):  # forward+backward of the student alone: a loss that only sums its q/k/v
        layers = qkv(student, trainer.student_params(f, t, lora), x)
        layers = [layers] if isinstance(layers, dict) else layers
        return sum(jnp.sum(l[r].astype(jnp.float32)) for l in layers for r in "qkv")

    student_fb = jax.jit(jax.grad(student_proxy))
    s_layers = jax.jit(lambda t, f, x: qkv(student, trainer.student_params(f, t, lora), x))(trainable, frozen, ids)

    def rel(s, t):
        blocks = dict(spec.kernel_blocks)
        return losses.relation_loss(s, t, relations=spec.relations, impl=spec.kernel_impl, block_sizes=blocks)[0]

    relation = jax.jit(jax.value_and_grad(rel))
    grads = jax.tree_util.tree_map(jnp.ones_like, trainable)
    opt_state = optimizer.init(trainable)
    opt = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
    return {
        "teacher_forward": _time(teacher_fwd, frozen, ids, reps=reps),
        "student_forward_backward": _time(student_fb, trainable, frozen, ids, reps=reps),
        "relation_loss_fwd_bwd": _time(relation, s_layers, t_layers, reps=reps),
        "optimizer": _time(opt, grads, opt_state, trainable, reps=reps),
    }


def loss_spec(kernel_impl: str, fused: bool):
    """The LinearARD LossSpec of a --kernel_impl (impl[:FIELD=VALUE...], blocks.parse_impl_spec)."""
    impl, blocks = parse_impl_spec(kernel_impl)
    return trainer.LossSpec(kernel_impl=impl, kernel_blocks=blocks, fused=fused)


def parse_variants(text: str) -> list[tuple[str, bool, str]]:
    """ "loop/unfused/full,scan/fused/none" -> [(layout, fused, remat), ...]; ValueError names the bad part."""
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        fields = part.split("/")
        if len(fields) != 3:
            raise ValueError(f"variant {part!r}: expected layout/loss/remat, e.g. scan/fused/full")
        layout, loss, remat = (x.strip() for x in fields)
        if layout not in LAYOUTS:
            raise ValueError(f"variant {part!r}: layout must be one of {tuple(LAYOUTS)}, not {layout!r}")
        if loss not in ("fused", "unfused"):
            raise ValueError(f"variant {part!r}: loss must be fused or unfused, not {loss!r}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"variant {part!r}: remat must be one of {REMAT_POLICIES}, not {remat!r}")
        out.append((layout, loss == "fused", remat))
    if not out:
        raise ValueError("--variants is empty")
    return out


def layouts_table(results) -> list[dict]:
    """The --layouts_all table: per model and device count, each layout's tokens/s, memory and
    tokens/s as a fraction of the fastest layout's (failed runs are left out)."""
    rows = []
    ok = [r for r in results if "error" not in r]
    for key in dict.fromkeys((r["model"], r["devices"]) for r in ok):
        group = [r for r in ok if (r["model"], r["devices"]) == key]
        best = max(r["tokens_per_s"] for r in group)
        for r in group:
            rows.append(
                {
                    "model": r["model"],
                    "devices": r["devices"],
                    "layout": r["layout"],
                    "fused": r["fused"],
                    "remat": r.get("remat"),
                    "tokens_per_s": r["tokens_per_s"],
                    "step_ms": r["step_s"] * 1e3,
                    "compiled_gib": r.get("compiled_gib"),
                    "peak_gib": r["peak_gib"],
                    "ratio_to_best": r["tokens_per_s"] / best,
                    "default": (r["layout"], r["fused"], r.get("remat"))
                    == (DEFAULT_LAYOUT, DEFAULT_FUSED, DEFAULT_REMAT),
                }
            )
    return rows


def _gib(x):
    return "n/a" if x is None else f"{x:.2f}"


def print_layouts_table(rows):
    print("\nLayouts (one process; compiled GiB = the step's arguments + outputs - donated + XLA temp)")
    print(
        f"{'model':10} {'dev':>3} {'layout':6} {'loss':8} {'remat':13} {'tok/s':>9} {'step ms':>8} "
        f"{'compiled GiB':>12} {'proc peak':>9} {'vs best':>7}"
    )
    for r in rows:
        loss = "fused" if r["fused"] else "unfused"
        mark = "  <- default" if r["default"] else ""
        print(
            f"{r['model']:10} {r['devices']:>3} {r['layout']:6} {loss:8} {str(r.get('remat')):13} "
            f"{r['tokens_per_s']:9.0f} "
            f"{r['step_ms']:8.1f} {_gib(r['compiled_gib']):>12} {_gib(r['peak_gib']):>9} "
            f"{r['ratio_to_best']:7.3f}{mark}"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama2_7b,llama3_8b")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch_per_device", type=int, default=1)
    p.add_argument("--remat", default=DEFAULT_REMAT, choices=REMAT_POLICIES, help="configs/base.py's default")
    p.add_argument(
        "--kernel_impl",
        default="auto",
        help="relation kernel impl[:FIELD=VALUE...] (BlockSizes overrides, e.g. pallas_mgpu:merge_d_left=0)",
    )
    p.add_argument("--attention_impl", default="cudnn" if jax.default_backend() == "gpu" else "xla")
    p.add_argument("--mesh_data", default="1", help="comma list of data-parallel sizes to run, e.g. 1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no_split", action="store_true")
    p.add_argument(
        "--layout",
        choices=tuple(LAYOUTS),
        default=DEFAULT_LAYOUT,
        help="scan (configs' default): stacked parameters under one lax.scan; loop: per-layer parameters",
    )
    p.add_argument(
        "--fused",
        dest="fused",
        action="store_true",
        default=DEFAULT_FUSED,
        help="fused relation loss (configs' default)",
    )
    p.add_argument("--no_fused", dest="fused", action="store_false", help="the relation loss after both forwards")
    p.add_argument(
        "--layouts_all",
        action="store_true",
        help="run loop/unfused, scan/unfused and scan/fused in this process (no split) and print a table",
    )
    p.add_argument(
        "--variants",
        default="",
        help="comma list of layout/loss/remat, e.g. loop/unfused/full,scan/fused/none: run each in this "
        "process (no split) and print the table (overrides --layout, --fused, --remat, --layouts_all)",
    )
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: train LoRA factors (authors' variant: 1024)")
    p.add_argument("--lora_alpha", type=float, default=None, help="default 2 x rank (the authors' 2048 at r 1024)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (> 0: the unmerged path)")
    p.add_argument(
        "--profile_dir",
        default="",
        help="trace 2 more steps of each run with jax.profiler into <dir>/<model>_<layout>_<loss>_<remat>_dp<n>; "
        "read them with experiments/trace_summary.py --steps 2",
    )
    p.add_argument("--out", default="")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        variants = parse_variants(args.variants) if args.variants else None
        parse_impl_spec(args.kernel_impl)
    except ValueError as e:
        parser.error(str(e))
    if variants is None:
        pairs = LAYOUTS_ALL if args.layouts_all else ((args.layout, args.fused),)
        variants = [(layout, fused, args.remat) for layout, fused in pairs]
    table = args.layouts_all or bool(args.variants)
    lora = trainer.LoraSpec()
    if args.lora_rank:
        lora = trainer.LoraSpec(
            rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank, dropout=args.lora_dropout
        )
    results = []
    for name in args.models.split(","):
        for dp in [int(x) for x in args.mesh_data.split(",")]:
            for layout, fused, remat in variants:
                try:
                    r = bench_one(
                        name,
                        seq_len=args.seq_len,
                        batch_per_device=args.batch_per_device,
                        remat=remat,
                        kernel_impl=args.kernel_impl,
                        attention_impl=args.attention_impl,
                        mesh_data=dp,
                        reps=args.reps,
                        split=not args.no_split and not table and dp == 1,
                        lora=lora,
                        layout=layout,
                        fused=fused,
                        profile_dir=args.profile_dir,
                    )
                except Exception as e:  # report OOM and carry on with the other shapes
                    r = {
                        "model": name,
                        "devices": dp,
                        "layout": layout,
                        "fused": fused,
                        "remat": remat,
                        "error": f"{type(e).__name__}: {str(e)[:400]}",
                    }
                results.append(r)
                print(json.dumps(r), flush=True)
                gc.collect()  # the previous run's weights and state go before the next run's are made
                if args.out:  # after every run, so a later timeout keeps what finished
                    out = {
                        "device": jax.devices()[0].device_kind,
                        "jax": jax.__version__,
                        "command": "python -m experiments.bench_restore_step " + " ".join(argv or sys.argv[1:]),
                        "results": results,
                    }
                    if table:
                        out["layouts"] = layouts_table(results)
                    with open(args.out, "w") as f:
                        json.dump(out, f, indent=2)
    print("\nMFU: executed model FLOPs (no remat recompute), lard_jax.flops; +rel adds the relation kernel")
    print(
        f"{'model':10} {'dev':>3} {'layout':6} {'loss':8} {'tok/s':>9} {'step ms':>8} {'MFU':>6} {'+rel':>6} "
        f"{'GF/tok':>7} {'peak GiB':>8}  split (ms)"
    )
    for r in results:
        loss = "fused" if r["fused"] else "unfused"
        if "error" in r:
            print(f"{r['model']:10} {r['devices']:>3} {r['layout']:6} {loss:8}  ERROR {r['error'][:80]}")
            continue
        split = " ".join(f"{k}={v * 1e3:.0f}" for k, v in r.get("split_s", {}).items())
        pct = lambda x: f"{100 * x:.1f}%" if x else "n/a"  # noqa: E731
        print(
            f"{r['model']:10} {r['devices']:>3} {r['layout']:6} {loss:8} {r['tokens_per_s']:9.0f} "
            f"{r['step_s'] * 1e3:8.1f} {pct(r['mfu_executed']):>6} {pct(r['mfu_executed_incl_relation']):>6} "
            f"{r['gflop_per_token']['model_total']:7.2f} {r['peak_gib']:8.1f}  {split}"
        )
    if table:
        print_layouts_table(layouts_table(results))
    return results


if __name__ == "__main__":
    main()
