"""The restoration run: config -> plan -> teacher/student -> masked training (-> CPT) -> hf_student/.

`run_restoration(config)` is what `python -m experiments.restore --config=...` calls. It first
builds the plan (`lard_jax.plan.resolve`): every check of the config, the workdir, the checkpoint's
headers, the tokenizer, the mesh, the evaluation settings, resumability and the text, before any
weight is read; mistakes raise `ConfigError` / `hf.CheckpointError` (both
`lard_jax.errors.UserError`). This module only executes the plan: it loads the models, runs each
stage, writes hf_student/ (`export_student`: the checkpoint with only the trained tensors replaced)
and evaluates. The checks are re-exported here (`pipeline.ConfigError`, `pipeline.validate_config`,
...) for existing callers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from lard_jax import hf, safetensors_io, trainer
from lard_jax import plan as plan_lib
from lard_jax import rope as rope_lib
from lard_jax import sharding as sharding_lib
from lard_jax.model import LlamaForCausalLM, dtype_of
from lard_jax.plan import (  # noqa: F401  (re-exported: the checks' historical home)
    TOKENIZER_FILES,
    ConfigError,
    _data_error,
    _gguf_path,
    _rope_dict,
    build_loader,
    check_against_model,
    check_checkpoint,
    check_resumable,
    load_run_tokenizer,
    prepare_workdir,
    student_max_positions,
    validate_config,
    warn_long_eval,
)
from lard_jax.sources import BUILTIN_PREFIX, resolve_source  # noqa: F401  (resolve_source: public here too)
from lard_jax.trainer import LoraSpec, LossSpec, TrainState  # noqa: F401


# ----------------------------------------------------------------------------------------------
# models
def build_models(plan: plan_lib.Plan, mesh):
    """(teacher, student, frozen_params): the first weight read. The teacher is the checkpoint with
    the run's numerics; the student is the plan's config (scaled RoPE) with the same numerics."""
    config = plan.config
    overrides = dict(remat=config.model.remat, attention_impl=config.model.attention_impl)
    teacher, frozen = hf.load_pretrained(
        config.model.checkpoint,
        dtype=dtype_of(config.model.dtype),
        param_dtype=dtype_of(config.model.param_dtype),
        mesh=mesh,
        rules=plan.rules,
        **overrides,
    )
    if config.model.get("scan_layers", False):  # stacked layers: one nn.scan (hf reads/writes per layer)
        frozen = trainer.to_layout(frozen, True, delete_source=True)
        teacher = LlamaForCausalLM(teacher.config.replace(scan_layers=True))
    student = LlamaForCausalLM(
        teacher.config.replace(rope_scaling=plan.rope, max_position_embeddings=plan.student_max_positions)
    )
    return teacher, student, frozen


# ----------------------------------------------------------------------------------------------
# data
def device_batch(host_batch: dict, grad_accum: int, mesh) -> dict:
    """Host arrays [accum * micro, T] -> global arrays [accum, micro, T] sharded over data x fsdp."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        value = value.reshape((grad_accum, value.shape[0] // grad_accum) + value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# ----------------------------------------------------------------------------------------------
# export: the checkpoint with the trained tensors replaced, nothing else changed
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def _hf_config_with_rope(raw: dict, student_cfg) -> dict:
    """The checkpoint's config.json with the student's RoPE (and max_position_embeddings); the rest as is."""
    out = dict(raw)
    rope = student_cfg.rope_scaling_dict
    if isinstance(raw.get("rope_parameters"), dict):  # transformers 5 style: rope_theta lives inside
        params = dict(rope or {"rope_type": "default"})
        params["rope_theta"] = raw["rope_parameters"].get("rope_theta", student_cfg.rope_theta)
        out["rope_parameters"] = params
        if "rope_scaling" in raw:
            out["rope_scaling"] = rope
    else:
        out["rope_scaling"] = rope
    if raw.get("max_position_embeddings") != student_cfg.max_position_embeddings:
        out["max_position_embeddings"] = student_cfg.max_position_embeddings
    return out


def export_student(config, student, student_params, mask, tokenizer, out: str) -> None:
    """Write `out/` = the teacher checkpoint (same files, same layout, same bytes) with the trained
    tensors (student_params where `mask` is True, LoRA already merged) replaced, in each tensor's
    checkpoint dtype (config.model.export_dtype="float32": float32), and config.json's RoPE set to
    the student's. Frozen tensors are copied from the checkpoint files, never from the (possibly
    re-rounded) parameters in memory."""
    ckpt = config.model.checkpoint
    export_dtype = config.model.get("export_dtype", "checkpoint")
    if export_dtype not in ("checkpoint", "float32"):
        raise ConfigError(f"config.model.export_dtype={export_dtype!r}; expected 'checkpoint' or 'float32'")
    main = jax.process_index() == 0
    if _gguf_path(ckpt) is not None:  # GGUF teacher: no safetensors to copy; write the params whole
        cast = jnp.float32 if export_dtype == "float32" else dtype_of(config.model.param_dtype)
        hf.save_pretrained(out, student, jax.tree_util.tree_map(lambda x: x.astype(cast), student_params))
        if main:
            from lard_jax.tokenizer import write_gguf_side_files

            write_gguf_side_files(_gguf_path(ckpt), out)
        return
    names = hf.hf_tensor_names(student.config)
    trained = {n: v for n, v in names.items() if bool(hf._get_path(mask, v[0]))}
    files = sorted(set(hf._checkpoint_files(ckpt).values()))
    if main:
        os.makedirs(out, exist_ok=True)
    total_changed = False
    for fname in files:
        source = safetensors_io.open_tensors(fname, check_finite=False)
        tensors = {}
        for name in source:
            if name in trained:
                our_path, transpose = trained[name]
                value = hf._to_host(hf._get_path(student_params, our_path))  # every process takes part
                value = value.T if transpose else value
                dtype = np.float32 if export_dtype == "float32" else source[name].dtype
                total_changed |= np.dtype(dtype) != source[name].dtype
                tensors[name] = np.ascontiguousarray(value.astype(dtype))
            elif main:
                tensors[name] = np.asarray(source[name])
        if main:
            target = os.path.join(out, os.path.relpath(fname, ckpt))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            safetensors_io.save_file(tensors, target, source.metadata())
        del tensors
    if not main:
        return
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            index_json = json.load(f)
        if total_changed and isinstance(index_json.get("metadata"), dict) and "total_size" in index_json["metadata"]:
            index_json["metadata"]["total_size"] = sum(
                safetensors_io.open_tensors(os.path.join(out, os.path.relpath(f, ckpt)), check_finite=False)[n].nbytes
                for f in files
                for n in safetensors_io.open_tensors(f, check_finite=False)
            )
            with open(os.path.join(out, os.path.basename(index)), "w") as f:
                json.dump(index_json, f, indent=2)
        else:
            shutil.copy2(index, os.path.join(out, os.path.basename(index)))
    copied = []
    for entry in sorted(os.listdir(ckpt)):
        src = os.path.join(ckpt, entry)
        if (
            entry.startswith(".")
            or not os.path.isfile(src)
            or entry == "config.json"
            or entry.endswith(_WEIGHT_SUFFIXES)
        ):
            continue
        shutil.copy2(src, os.path.join(out, entry))
        copied.append(entry)
    with open(os.path.join(ckpt, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(_hf_config_with_rope(raw, student.config), f, indent=2)
    if not any(n in copied for n in TOKENIZER_FILES):  # the checkpoint had none: ship the one the run used
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        elif hasattr(getattr(tokenizer, "hf_tokenizer", None), "save_pretrained"):
            tokenizer.hf_tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# logging
class MetricsLog:
    """JSONL + TensorBoard event files in the workdir (process 0 only).

    A run resumed at `resume_step` first drops the JSONL records past that step (written after the
    last checkpoint, before a crash) so that every step appears once. Its TensorBoard writer opens
    with purge_step = resume_step + 1: TensorBoard then hides the earlier event files' values from
    that step on (written before the crash), so each step shows once there too."""

    def __init__(self, workdir: str, name: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, f"metrics_{name}.jsonl")
        self.writer = None
        if self.enabled and resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(
                    os.path.join(workdir, "tensorboard", name),
                    purge_step=None if resume_step is None else int(resume_step) + 1,
                )
            except ImportError:  # TensorBoard is optional; the JSONL log is always written
                self.writer = None

    def _truncate(self, resume_step: int) -> None:
        records: dict[int, str] = {}
        with open(self.path) as f:
            for line in f:
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the crash
                if step <= resume_step:
                    records[step] = line if line.endswith("\n") else line + "\n"  # the last record of a step wins
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(records[k] for k in sorted(records))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()


# ----------------------------------------------------------------------------------------------
# one training stage
def train_stage(
    stage: plan_lib.StagePlan,
    plan: plan_lib.Plan,
    *,
    teacher,
    student,
    frozen,
    trainable,
    mesh,
):
    """Runs (or resumes) one planned stage; returns the trained `trainable` tree."""
    config, name, steps, spec, lora = plan.config, stage.name, stage.steps, stage.loss, plan.lora
    loader, grad_accum, seq_len = stage.loader, stage.grad_accum, stage.seq_len
    optimizer, schedule = trainer.make_optimizer(total_steps=steps, **stage.optimizer)
    state = trainer.init_state(trainable, optimizer, jax.random.PRNGKey(config.seed), mesh)
    ckpt_dir = os.path.abspath(os.path.join(config.workdir, "checkpoints", name))
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, config.train.checkpoint_every),
            max_to_keep=max(1, config.train.keep_checkpoints),
            enable_async_checkpointing=True,
        ),
    )
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = trainer.restore_any_layout(  # a checkpoint of either parameter layout
            lambda abstract: manager.restore(start, args=ocp.args.StandardRestore(abstract)), _as_dict(state)
        )
        state = TrainState(**restored)
        print(f"[{name}] resumed from step {start} ({ckpt_dir})")
        if start > steps:
            raise ConfigError(
                f"config.{'train' if name == 'stage1' else 'stage2'}.steps={steps}: {ckpt_dir} already "
                f"holds step {start}; pass steps >= {start}, or use a new config.workdir"
            )
    step_fn = trainer.jit_train_step(teacher, student, spec, lora, optimizer, schedule, state)
    log = MetricsLog(config.workdir, name, resume_step=start)
    tokens_per_step = loader.batch_size * jax.process_count() * seq_len
    from lard_jax import flops as flops_lib

    try:  # executed model FLOPs (no remat recompute): lard_jax/flops.py says what is counted
        flops = flops_lib.executed_flops_per_token(
            student.config,
            seq_len=seq_len,
            method=spec.method,
            trainable=plan.projections,
            lora_rank=lora.rank,
            lora_merged=lora.merged,
            lambda_logit=getattr(spec, "lambda_logit", 0.0),
            relations=getattr(spec, "relations", ("q", "k", "v")),
            layers=getattr(spec, "layers", None) or None,
            hidden_layers=getattr(spec, "hidden_layers", None) or None,
            remat=student.config.remat,
            micro_batch=max(1, loader.batch_size * jax.process_count() // max(1, grad_accum * jax.device_count())),
        )
    except (ValueError, KeyError, NotImplementedError, AttributeError):  # a method the FLOP model does not know: no MFU
        flops = None
    peak = trainer.peak_flops_per_device()
    bar = tqdm(total=steps, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True)
    t_last, last_logged = time.perf_counter(), start
    for step in range(start, steps):
        batch = device_batch(loader.batch_at(step), grad_accum, mesh)
        state, metrics = step_fn(state, frozen, batch)
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            tps = tokens_per_step * (done - last_logged) / max(now - t_last, 1e-9)
            t_last, last_logged = now, done
            metrics["tokens_per_s"] = tps
            metrics["mfu_executed"] = flops_lib.mfu(flops, tps, peak, jax.device_count()) if flops else None
            log.write(done, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", gnorm=f"{metrics['grad_norm']:.3g}", tok_s=f"{tps:.0f}")
        bar.update(1)
        manager.save(done, args=ocp.args.StandardSave(_as_dict(state)), force=done == steps)
        if config.train.crash_after_step and done == config.train.crash_after_step:
            manager.wait_until_finished()
            os._exit(17)  # simulated crash: no clean shutdown
    bar.close()
    manager.wait_until_finished()
    manager.close()
    return state.trainable


def _as_dict(state: TrainState) -> dict:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}


# ----------------------------------------------------------------------------------------------
def run_restoration(config) -> dict:
    """The whole run; returns a summary dict (also written to <workdir>/summary.json).

    `plan_lib.resolve(config)` runs every check and tokenises the text first; nothing here reads a
    weight before it has returned."""
    if config.distributed:
        jax.distributed.initialize()
    plan = plan_lib.resolve(config)
    config = plan.config
    if config.get("compile_cache", True):  # before the first compilation: a rerun or resume loads its programs
        from lard_jax.compile_cache import enable_compilation_cache

        enable_compilation_cache(config.workdir)
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh = plan.make_mesh()
    teacher, student, frozen = build_models(plan, mesh)  # the first weight read
    print(
        f"teacher: {rope_lib.describe_rope(teacher.config.rope_scaling_dict)} RoPE, "
        f"{hf.num_params(frozen) / 1e6:.1f}M params; student: "
        f"{rope_lib.describe_rope(student.config.rope_scaling_dict)}; mesh {dict(mesh.shape)}"
    )
    mask = trainer.trainable_mask(frozen, plan.projections)
    trainable = _init_trainable(frozen, mask, plan.lora, config, mesh)
    t0 = time.perf_counter()
    with sharding_lib.use_mesh(mesh, plan.rules):  # activation constraints follow the plan's rules
        for stage in plan.stages:
            trainable = train_stage(
                stage, plan, teacher=teacher, student=student, frozen=frozen, trainable=trainable, mesh=mesh
            )
        student_params = jax.jit(lambda f, t: trainer.merge_student(f, t, plan.lora))(frozen, trainable)
    out = os.path.join(config.workdir, "hf_student")
    export_student(
        config,
        student,
        *trainer.per_layer_for_export(  # hf.py's per-layer layout
            student_params, mask, student.config.num_hidden_layers, full=plan.is_gguf
        ),
        plan.tokenizer,
        out,
    )
    student_params = jax.tree_util.tree_map(lambda x: x.astype(dtype_of(config.model.param_dtype)), student_params)
    summary = {
        "hf_student": out,
        "train_tokens": int(plan.train_tokens),
        "train_seconds": time.perf_counter() - t0,
        "method": config.loss.method,
        "student_rope": rope_lib.describe_rope(student.config.rope_scaling_dict),
    }
    print(f"restored student written to {out}")
    if plan.eval is not None:
        summary.update(
            evaluate_run(
                config, plan.tokenizer, teacher, student, frozen, student_params, docs=plan.eval_docs, spec=plan.eval
            )
        )
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def evaluate_run(config, tokenizer, teacher, student, frozen, student_params, docs=None, spec=None) -> dict:
    """Teacher, scaled (untrained) and restored student side by side -> <workdir>/report.*"""
    from lard_jax.evaluation import runner as eval_runner

    if docs is None:
        docs = eval_runner.heldout_token_docs(config.eval.source, tokenizer, config.data.text_field)
    if spec is None:
        spec = eval_runner.eval_spec_from_config(config.eval, config.data.seq_len)
    models = {"teacher": (teacher, frozen), "scaled": (student, frozen), "restored": (student, student_params)}
    results = eval_runner.evaluate_suite(
        models,
        tokenizer,
        docs,
        spec,
        config.workdir,
        distortion=config.eval.distortion,
        title=f"LinearARD restoration: {rope_lib.describe_rope(student.config.rope_scaling_dict)}",
        meta={"method": config.loss.method, "checkpoint": config.model.checkpoint},
    )
    eval_runner.print_table(results)
    ppl = {k: results[k].get("short_ppl") for k in models}
    out = {"short_ppl": ppl}
    if None not in ppl.values() and ppl["scaled"] != ppl["teacher"]:
        out["recovery"] = (ppl["scaled"] - ppl["restored"]) / (ppl["scaled"] - ppl["teacher"])
        print(
            f"short-text perplexity recovery: {out['recovery']:.3f} "
            "((ppl_scaled - ppl_restored) / (ppl_scaled - ppl_teacher))"
        )
    return out


def _init_trainable(frozen, mask, lora, config, mesh):
    return trainer.init_trainable_sharded(
        frozen, mask, lora, jax.random.PRNGKey(config.seed), mesh, dtype_of(config.model.trainable_dtype)
    )
