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

import contextlib
import json
import math
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from lard_jax import checkpoints as checkpoints_lib
from lard_jax import hf, model_card, preemption, skipped_steps, trainer, workdir_lock
from lard_jax import plan as plan_lib
from lard_jax import rope as rope_lib
from lard_jax import sharding as sharding_lib
from lard_jax.export import export_student  # noqa: F401  (public here too)
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
    check_not_finished,
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
    overrides = dict(
        remat=config.model.remat,
        attention_impl=config.model.attention_impl,
        scan_grads=config.model.get("scan_grads", "compute_dtype"),
    )
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


# export: lard_jax.export (re-exported here: its historical home)


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
    guard: preemption.PreemptionGuard | None = None,
):
    """Runs (or resumes) one planned stage; returns the trained `trainable` tree.

    Resumes from the newest checkpoint that reads back (damaged newer ones are set aside,
    lard_jax.checkpoints). Every step: a non-finite update is skipped on the device and counted
    (lard_jax.skipped_steps stops the run past config.train.max_skipped_steps); `guard` (a
    PreemptionGuard, entered by the caller; None: this stage's own) is asked whether to stop, and
    if so the step just done is checkpointed and `Preempted` raised."""
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
    try:
        start, restored = checkpoints_lib.restore_newest_intact(
            manager,
            lambda step: _restore_state(manager, step, state),
            stage=name,
            agree=_on_every_process if jax.process_count() > 1 else None,
        )
    except BaseException:
        manager.close()
        raise
    if restored is None:
        start = 0
    else:
        state = restored
        print(f"[{name}] resumed from step {start} ({ckpt_dir})")
        if start > steps:
            manager.close()
            raise ConfigError(
                f"config.{'train' if name == 'stage1' else 'stage2'}.steps={steps}: {ckpt_dir} already "
                f"holds step {start}; pass steps >= {start}, or use a new config.workdir"
            )
    drill = tuple(int(s) for s in config.train.get("nan_at_steps", ())) if stage is plan.stages[0] else ()
    step_fn = trainer.jit_train_step(teacher, student, spec, lora, optimizer, schedule, state, nan_at_steps=drill)
    skips = skipped_steps.SkippedSteps(
        name, config.train.get("max_skipped_steps", 3), already=int(jax.device_get(state.skipped)), warn=_warn_over_bar
    )
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

    def newest_checkpoint():
        manager.wait_until_finished()
        return manager.latest_step()

    own_guard = guard is None
    guard = preemption.PreemptionGuard() if own_guard else guard
    bar = tqdm(total=steps, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True)
    t_last, last_logged = time.perf_counter(), start
    try:
        with guard if own_guard else contextlib.nullcontext():
            for step in range(start, steps):
                batch = device_batch(loader.batch_at(step), grad_accum, mesh)
                state, metrics = step_fn(state, frozen, batch)
                done = step + 1
                skips.add(done, metrics)
                stop = guard.reached(done)  # every step, on every process (the multi-host sync point)
                save = stop or done == steps or manager.should_save(done)
                log_now = done % config.train.log_every == 0 or done == steps
                if log_now or save:  # reads metrics the loop reads anyway; raises past the skip limit
                    skips.check(newest_checkpoint)
                if log_now:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    tps = tokens_per_step * (done - last_logged) / max(now - t_last, 1e-9)
                    t_last, last_logged = now, done
                    metrics["tokens_per_s"] = tps
                    metrics["mfu_executed"] = flops_lib.mfu(flops, tps, peak, jax.device_count()) if flops else None
                    log.write(done, metrics)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4g}", gnorm=f"{metrics['grad_norm']:.3g}", tok_s=f"{tps:.0f}"
                    )
                bar.update(1)
                if save:
                    manager.save(done, args=ocp.args.StandardSave(_as_dict(state)), force=True)
                if stop:
                    manager.wait_until_finished()
                    bar.close()
                    raise guard.stopped(name, done, steps, ckpt_dir)
                if config.train.crash_after_step and done == config.train.crash_after_step:
                    manager.wait_until_finished()
                    os._exit(17)  # simulated crash: no clean shutdown
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    return state.trainable


def _as_dict(state: TrainState) -> dict:
    return {
        "step": state.step,
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "rng": state.rng,
        "skipped": state.skipped,
    }


def _restore_state(manager, step: int, state: TrainState) -> TrainState:
    """Checkpoint `step` into `state`'s structure and shardings (either parameter layout). A
    checkpoint written before TrainState counted skipped steps restores with the count at 0."""

    def read(abstract):
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))

    try:
        return TrainState(**trainer.restore_any_layout(read, _as_dict(state)))
    except Exception as first:  # noqa: BLE001 -- the legacy structure next, else this error
        legacy = {k: v for k, v in _as_dict(state).items() if k != "skipped"}
        try:
            restored = trainer.restore_any_layout(read, legacy)
        except Exception:  # noqa: BLE001
            raise first from None
        return TrainState(**restored, skipped=state.skipped)


def _warn_over_bar(message: str) -> None:
    """cli.warn with the progress bar cleared first and redrawn after (no line glued to the bar)."""
    from lard_jax import cli

    with tqdm.external_write_mode(file=sys.stderr):
        cli.warn(message)


def _on_every_process(ok: bool) -> bool:
    """True only if `ok` on every process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


# ----------------------------------------------------------------------------------------------
def _check_reliability_keys(config) -> None:
    limit = config.train.get("max_skipped_steps", 3)
    if not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"config.train.max_skipped_steps must be an integer >= 0, got {limit!r}")
    drill = config.train.get("nan_at_steps", ())
    if not all(isinstance(s, int) and s >= 1 for s in drill):
        raise ConfigError(f"config.train.nan_at_steps must be steps >= 1, got {tuple(drill)!r}")


def run_restoration(config) -> dict:
    """The whole run; returns a summary dict (also written to <workdir>/summary.json).

    `plan_lib.resolve(config)` runs every check and tokenises the text first; nothing here reads a
    weight before it has returned. The workdir is locked for the run (lard_jax.workdir_lock) before
    anything but the config's own checks: a second run there stops at once."""
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    plan_lib.validate_config(config)
    _check_reliability_keys(config)
    prepare_workdir(config.workdir)
    lock = workdir_lock.WorkdirLock(config.workdir, process_index=jax.process_index())
    previous = lock.acquire()
    try:
        if previous:
            from lard_jax import cli

            cli.warn(
                f"config.workdir={config.workdir}: took over the lock of a run that is no longer running "
                f"({workdir_lock.describe(previous)}); its checkpoints are resumed"
            )
        return _run_locked(config)
    finally:
        lock.release()


def _run_locked(config) -> dict:
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
    for stage in plan.stages:
        print(f"data: {stage.describe_data()}")
    mask = trainer.trainable_mask(frozen, plan.projections)
    trainable = _init_trainable(frozen, mask, plan.lora, config, mesh)
    t0 = time.perf_counter()
    # activation constraints follow the plan's rules; SIGTERM / SIGINT stop at a checkpointed step
    with sharding_lib.use_mesh(mesh, plan.rules), preemption.PreemptionGuard() as guard:
        for stage in plan.stages:
            trainable = train_stage(
                stage,
                plan,
                teacher=teacher,
                student=student,
                frozen=frozen,
                trainable=trainable,
                mesh=mesh,
                guard=guard,
            )
        if guard.signal_name is not None and not guard.synced:  # the notice came after the last step's check
            last = plan.stages[-1]
            raise guard.stopped(
                last.name,
                last.steps,
                last.steps,
                os.path.abspath(os.path.join(config.workdir, "checkpoints", last.name)),
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
        train_tokens=int(plan.train_tokens),
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
                config,
                plan.tokenizer,
                teacher,
                student,
                frozen,
                student_params,
                docs=plan.eval_docs,
                spec=plan.eval,
                stages=[stage.name for stage in plan.stages],
            )
        )
        if jax.process_index() == 0:  # the student's card gains the report's table
            model_card.add_report(out, os.path.join(config.workdir, "report.json"), native_len=plan.eval.native_len)
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    deleted = None
    if not config.train.get("keep_checkpoints_after", False):  # the run is complete: hf_student/ is its result
        deleted = checkpoints_lib.delete_training_checkpoints(config.workdir)
    _print_outputs(config.workdir, out, deleted)
    return summary


def _print_outputs(workdir: str, hf_student: str, deleted: str | None) -> None:
    """The paths a finished run leaves: hf_student/, the report and its plots (process 0)."""
    if jax.process_index() != 0:
        return
    lines = [f"outputs in {os.path.abspath(workdir)}:", f"  restored student  {os.path.abspath(hf_student)}{os.sep}"]
    report = os.path.join(workdir, "report.md")
    if os.path.isfile(report):
        lines.append(f"  report            {os.path.abspath(report)}")
    plots = sorted(f for f in os.listdir(workdir) if f.endswith(".png"))
    if plots:
        lines.append(f"  plots             {', '.join(os.path.join(os.path.abspath(workdir), p) for p in plots)}")
    lines.append(f"  summary           {os.path.abspath(os.path.join(workdir, 'summary.json'))}")
    if deleted:
        lines.append(
            f"  training checkpoints deleted ({deleted}; config.train.keep_checkpoints_after=True keeps them); "
            "rerunning this command stops at once; with --config.train.retrain=True it trains again from step 0"
        )
    print("\n".join(lines))


def _train_metrics(workdir: str, stages) -> dict[str, list[dict]]:
    """stage -> the records of <workdir>/metrics_<stage>.jsonl for this run's stages (the report's
    loss curve; a file an earlier run in the workdir left for another stage is not read)."""
    out: dict[str, list[dict]] = {}
    for stage in stages:
        path = os.path.join(workdir, f"metrics_{stage}.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                out[stage] = [json.loads(line) for line in f if line.strip()]
    return out


def evaluate_run(
    config, tokenizer, teacher, student, frozen, student_params, docs=None, spec=None, stages=("stage1", "stage2")
) -> dict:
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
        training=_train_metrics(config.workdir, stages),
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
