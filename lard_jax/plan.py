"""A run, planned before any weight is read: `plan = resolve(config)`.

`resolve` reads the checkpoint's config.json (or GGUF metadata) and tensor headers, never its
tensors; normalises the student's RoPE once; computes every derived field (student positions,
the loss spec, the LoRA spec, each stage's optimizer settings, the evaluation spec); and runs every
check, in this order, before any device work or weight read:

  config keys (validate_config) -> workdir writable -> text sources resolved -> checkpoint headers
  (check_checkpoint) -> tokenizer -> model x config x mesh (check_against_model) -> evaluation
  settings and held-out text -> a finished run not retrained by accident (check_not_finished) ->
  resumability of the workdir (check_resumable) -> training text
  tokenised into the cache (one loader per stage).

A mistake raises ConfigError / hf.CheckpointError (lard_jax.errors.UserError: one line that names
the key and the fix). `lard_jax.pipeline.run_restoration` then only executes the plan: models,
stages, export, evaluation. The specs it uses come from here, never from re-reading config fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import jax

from lard_jax import hf, safetensors_io, trainer
from lard_jax import rope as rope_lib
from lard_jax import sharding as sharding_lib
from lard_jax.errors import UserError
from lard_jax.model import REMAT_POLICIES, SCAN_GRADS, LlamaConfig, LlamaForCausalLM, dtype_of
from lard_jax.sources import BUILTIN_PREFIX, resolve_source
from lard_jax.trainer import LoraSpec, LossSpec


# ----------------------------------------------------------------------------------------------
# the plan
@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage: its loss, length, batch, optimizer settings and data loader."""

    name: str  # "stage1" (restoration) or "stage2_cpt"
    loss: LossSpec
    steps: int
    batch_size: int  # global sequences per micro-step
    grad_accum: int
    seq_len: int
    optimizer: dict  # keyword arguments of trainer.make_optimizer (without total_steps)
    loader: Any = dataclasses.field(repr=False, default=None)  # data.BlockLoader over the token cache

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.grad_accum * self.seq_len

    @property
    def data_passes(self) -> float | None:
        """How many times the stage reads its loader's distinct blocks (None without a loader)."""
        if self.loader is None or not self.loader.num_blocks:
            return None
        return self.steps * self.batch_size * self.grad_accum / self.loader.num_blocks

    def describe_data(self) -> str:
        """One line: the distinct text a stage reads and how often, e.g. for the console."""
        if self.loader is None:
            return f"{self.name}: no loader"
        blocks = self.loader.num_blocks
        dropped = getattr(self.loader, "dropped_documents", 0)
        return (
            f"{self.name}: {self.steps} steps x {self.batch_size * self.grad_accum} x {self.seq_len} tokens read "
            f"{blocks} distinct blocks ({blocks * self.seq_len:,} tokens, {self.loader.mode} mode"
            + (f", {dropped} short documents dropped" if dropped else "")
            + f") {self.data_passes:.3g} times"
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs to know before it reads a weight."""

    config: Any  # the resolved ml_collections config (text sources as local paths)
    teacher: LlamaConfig  # from the checkpoint's header: architecture, native RoPE
    rope: dict | None  # the student's RoPE scaling, normalised (rope.normalize_rope_scaling) once here
    student_max_positions: int
    mesh_shape: dict  # {"data": n, "fsdp": n, "tensor": n}, -1 resolved
    rules: tuple  # logical-axis rules (sharding.rules_from_config: the defaults with config.mesh.rules applied)
    tokenizer: Any
    projections: tuple  # trainer.PROJECTION_SETS[config.train.trainable]
    lora: LoraSpec
    stages: tuple  # StagePlan, in order
    eval: Any = None  # evaluation.runner.EvalSpec, or None when evaluation is off
    eval_docs: Any = dataclasses.field(repr=False, default=None)  # held-out documents as token ids
    is_gguf: bool = False

    @property
    def student(self) -> LlamaConfig:
        """The student's config: the teacher's with the scaled RoPE and the positions it claims."""
        return self.teacher.replace(rope_scaling=self.rope, max_position_embeddings=self.student_max_positions)

    @property
    def train_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def make_mesh(self):
        return _mesh(self.config)


def _mesh(config):
    """The run's (data, fsdp, tensor) mesh over the first config.mesh.num_devices devices (0 = all)."""
    c = config.mesh
    return sharding_lib.make_mesh(c.data, c.fsdp, c.tensor, devices=jax.devices()[: c.num_devices or None])


def optimizer_kwargs(train_block, **overrides) -> dict:
    """trainer.make_optimizer's keywords from config.train (stage 2 overrides lr / warmup / min)."""
    out = dict(
        lr=train_block.lr,
        warmup_steps=train_block.warmup_steps,
        min_lr_ratio=train_block.min_lr_ratio,
        clip=train_block.clip,
        weight_decay=train_block.weight_decay,
        b1=train_block.b1,
        b2=train_block.b2,
        eps=train_block.eps,
    )
    out.update(overrides)
    return out


def _mesh_rules(config) -> tuple:
    try:
        return sharding_lib.rules_from_config(config.mesh)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(f"config.mesh.rules: {e}") from None


def resolve(config, *, build_loaders: bool = True) -> Plan:
    """The checked, resolved plan of `config` (see the module docstring for the order of checks).
    `build_loaders=False` skips tokenising the training text (tools that only need the models)."""
    rope = validate_config(config)
    config = config.copy_and_resolve_references()
    prepare_workdir(config.workdir)
    with config.unlocked():
        config.data.source = resolve_source(config.data.source, config.workdir)
        if config.eval.source:
            config.eval.source = resolve_source(config.eval.source, config.workdir)
    teacher_cfg = check_checkpoint(config.model.checkpoint)
    tokenizer = load_run_tokenizer(config.data.tokenizer, config.model.checkpoint)
    if tokenizer.vocab_size > teacher_cfg.vocab_size:
        raise ConfigError(
            f"config.data.tokenizer: the tokenizer has {tokenizer.vocab_size} tokens, the model only "
            f"{teacher_cfg.vocab_size}; use the checkpoint's own tokenizer"
        )
    rules = _mesh_rules(config)
    plan_mesh = _mesh(config)
    check_against_model(config, teacher_cfg, plan_mesh, rope)
    student_max = student_max_positions(config, teacher_cfg, rope)
    eval_spec, eval_docs = None, None
    if config.eval.enabled:  # fail on a bad evaluation setting before training, not after
        eval_spec, eval_docs = _resolve_eval(config, tokenizer, student_max)
    check_not_finished(config)
    check_resumable(config)
    lora = LoraSpec(rank=config.train.lora_rank, alpha=config.train.lora_alpha, dropout=config.train.lora_dropout)
    opt = optimizer_kwargs(config.train)
    stages = [
        StagePlan(
            "stage1",
            LossSpec.from_config(config.loss, long_factor=_factor(rope)),  # each method reads its own keys
            int(config.train.steps),
            int(config.train.batch_size),
            int(config.train.grad_accum),
            int(config.data.seq_len),
            opt,
        )
    ]
    if config.stage2.steps:
        stages.append(
            StagePlan(
                "stage2_cpt",
                LossSpec(method="cpt"),
                int(config.stage2.steps),
                int(config.stage2.batch_size),
                int(config.stage2.grad_accum),
                int(config.stage2.seq_len or student_max),
                optimizer_kwargs(
                    config.train,
                    lr=config.stage2.lr,
                    warmup_steps=config.stage2.warmup_steps,
                    min_lr_ratio=config.stage2.min_lr_ratio,
                ),
            )
        )
    if build_loaders:
        stages = [
            dataclasses.replace(
                s,
                loader=build_loader(
                    config, tokenizer, seq_len=s.seq_len, batch_size=s.batch_size, grad_accum=s.grad_accum
                ),
            )
            for s in stages
        ]
        for s in stages:
            if s.data_passes > 2 and getattr(s.loader, "dropped_documents", 0):
                warnings.warn(
                    f"{s.describe_data()}: the run repeats few blocks while documents shorter than a block are "
                    "dropped; data.mode='packed' (every document, cut into blocks) or more text repeats less",
                    stacklevel=2,
                )
    return Plan(
        config=config,
        teacher=teacher_cfg,
        rope=rope,
        student_max_positions=student_max,
        mesh_shape=dict(plan_mesh.shape),
        rules=rules,
        tokenizer=tokenizer,
        projections=trainer.PROJECTION_SETS[config.train.trainable],
        lora=lora,
        stages=tuple(stages),
        eval=eval_spec,
        eval_docs=eval_docs,
        is_gguf=_gguf_path(config.model.checkpoint) is not None,
    )


def _factor(rope: dict | None) -> float:
    """The scaling factor of a normalised RoPE dict (1.0 for none): one default everywhere."""
    return float((rope or {}).get("factor", 1.0))


def _resolve_eval(config, tokenizer, student_max: int):
    from lard_jax.evaluation import runner as eval_runner

    if not config.eval.source:
        raise ConfigError(
            "config.eval.enabled needs config.eval.source; pass --config.eval.source=/path/to/heldout "
            "(documents never trained on)"
        )
    try:
        spec = eval_runner.eval_spec_from_config(config.eval, config.data.seq_len)
        eval_runner.check_spec(spec, tokenizer)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(f"config.eval: {e}") from None
    warn_long_eval(spec, student_max, "the student")
    try:
        docs = eval_runner.heldout_token_docs(config.eval.source, tokenizer, config.data.text_field)
    except UserError:
        raise
    except ValueError as e:
        raise _data_error(e, f"config.eval.source={config.eval.source}") from None
    return spec, docs


# ----------------------------------------------------------------------------------------------
# the checks (each runs once, from resolve)
class ConfigError(UserError):
    """A configuration that cannot run; the message says which key, why, and how to fix it."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


EXPORT_DTYPES = ("checkpoint", "float32", "bfloat16", "float16")  # config.model.export_dtype


def export_dtype_of(config) -> str:
    value = config.model.get("export_dtype", "checkpoint")
    if value not in EXPORT_DTYPES:
        raise ConfigError(
            f"config.model.export_dtype={value!r}: expected one of {', '.join(EXPORT_DTYPES)}; "
            "e.g. --config.model.export_dtype=float32"
        )
    return value


def validate_config(config) -> dict | None:
    """Every check that needs only the config; returns the student's normalised RoPE dict."""
    if not config.workdir:
        raise ConfigError("config.workdir is not set: pass --config.workdir=/path/for/outputs")
    if not config.model.checkpoint:
        raise ConfigError("config.model.checkpoint is not set: pass --config.model.checkpoint=/path/to/hf_checkpoint")
    if not os.path.isdir(config.model.checkpoint) and _gguf_path(config.model.checkpoint) is None:
        raise ConfigError(
            f"config.model.checkpoint={config.model.checkpoint}: directory not found; pass a local "
            "Hugging Face checkpoint directory (config.json + *.safetensors)"
        )
    if not config.data.source:
        raise ConfigError("config.data.source is not set: pass --config.data.source=/path/to/text_or_jsonl")
    if not config.data.source.startswith(BUILTIN_PREFIX) and not os.path.exists(config.data.source):
        raise ConfigError(
            f"config.data.source: not found: {config.data.source}; pass an existing file or folder of documents"
        )
    export_dtype_of(config)  # a typo fails here, not after training
    for key in ("dtype", "param_dtype", "trainable_dtype"):
        try:
            dtype_of(config.model[key])
        except ValueError as e:
            raise ConfigError(f"config.model.{key}: {e}") from None
    for key, allowed in (("remat", REMAT_POLICIES), ("scan_grads", SCAN_GRADS)):
        if key in config.model and config.model[key] not in allowed:
            raise ConfigError(f"config.model.{key}={config.model[key]!r}; expected one of {allowed}")
    if config.train.trainable not in trainer.PROJECTION_SETS:
        raise ConfigError(
            f"config.train.trainable={config.train.trainable!r}; expected one of {sorted(trainer.PROJECTION_SETS)}"
        )
    try:
        trainer.check_method(config.loss.method)
        LossSpec(normalize=config.loss.normalize)
        LoraSpec(rank=config.train.lora_rank, alpha=config.train.lora_alpha, dropout=config.train.lora_dropout)
    except ValueError as e:
        raise ConfigError(f"config.loss / config.train: {e}") from None
    bad = [r for r in config.loss.relations if r not in ("q", "k", "v")]
    if bad or not config.loss.relations:
        raise ConfigError(
            f"config.loss.relations={tuple(config.loss.relations)}; expected a non-empty subset of q, k, v"
        )
    for key in ("steps", "batch_size", "grad_accum"):
        if int(config.train[key]) < 1:
            raise ConfigError(f"config.train.{key} must be >= 1, got {config.train[key]}")
    if config.data.seq_len < 2:
        raise ConfigError(f"config.data.seq_len must be >= 2, got {config.data.seq_len}")
    try:
        rope = rope_lib.normalize_rope_scaling(_rope_dict(config))
    except ValueError as e:
        raise ConfigError(f"config.student.rope_scaling: {e}") from None
    mesh_devices = 1
    for axis in ("data", "fsdp", "tensor"):
        size = int(config.mesh[axis])
        if size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis} must be >= 1 or -1, got {size}")
        mesh_devices *= abs(size)
    n = config.mesh.num_devices or jax.device_count()
    if n > jax.device_count():
        raise ConfigError(f"config.mesh.num_devices={n} but only {jax.device_count()} devices exist")
    if -1 not in (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) and mesh_devices != n:
        raise ConfigError(f"config.mesh {dict(config.mesh)} needs {mesh_devices} devices, {n} available")
    if n % mesh_devices:
        raise ConfigError(f"config.mesh {dict(config.mesh)} does not divide the {n} available devices")
    return rope


def _rope_dict(config) -> dict | None:
    rs = config.student.rope_scaling
    if rs is None:
        return None
    d = rs.to_dict() if hasattr(rs, "to_dict") else dict(rs)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def check_against_model(config, teacher_cfg, mesh, student_rope=None) -> dict | None:
    """The config against the checkpoint's architecture and the mesh; returns the student's RoPE
    (`student_rope`, normalised by validate_config; recomputed when not given)."""
    if student_rope is None:
        student_rope = rope_lib.normalize_rope_scaling(_rope_dict(config))
    if student_rope == teacher_cfg.rope_scaling_dict:
        raise ConfigError(
            f"config.student.rope_scaling equals the teacher's ({rope_lib.describe_rope(student_rope)}): "
            "there is nothing to restore"
        )
    native = teacher_cfg.max_position_embeddings
    if config.data.seq_len > native and not config.data.get("allow_long", False):
        raise ConfigError(
            f"config.data.seq_len={config.data.seq_len} is beyond the teacher's max_position_embeddings "
            f"{native}: LinearARD distils at the teacher's native length; use --config.data.seq_len="
            f"{native}, or pass --config.data.allow_long=True to train longer anyway"
        )
    dp = sharding_lib.data_parallel_size(mesh)
    batches = [("train.batch_size", config.train.batch_size)]
    if config.stage2.steps:
        batches.append(("stage2.batch_size", config.stage2.batch_size))
    for name, batch in batches:
        if batch % dp:
            raise ConfigError(f"config.{name}={batch} is not divisible by the mesh's data x fsdp = {dp}")
    if jax.process_count() > 1 and config.train.batch_size % jax.process_count():
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by {jax.process_count()} hosts"
        )
    for layer in config.loss.layers:
        if not 0 <= int(layer) < teacher_cfg.num_hidden_layers:
            raise ConfigError(
                f"config.loss.layers: layer {layer} does not exist in a {teacher_cfg.num_hidden_layers}-layer model"
            )
    return student_rope


def _gguf_path(path: str) -> str | None:
    find = getattr(hf, "_gguf_path", None)  # GGUF support (lard_jax.gguf) may be absent
    return find(path) if find is not None and path else None


def check_checkpoint(path: str, *, what: str = "config.model.checkpoint"):
    """The teacher's LlamaConfig from config.json, after checking the weight files against it from
    their headers alone (files and shards present, not truncated, every tensor there with the shape
    config.json implies, a float dtype). Reads no weights."""
    if _gguf_path(path) is not None:
        return hf.config_from_hf(hf.read_hf_config(path), source=path)
    if not os.path.isdir(path):
        raise ConfigError(f"{what}={path}: directory not found; pass a local Hugging Face checkpoint directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            f"{what}={path}: no config.json; a Hugging Face checkpoint directory holds config.json "
            "next to its *.safetensors weights"
        )
    cfg = hf.config_from_hf(hf.read_hf_config(path), source=os.path.join(path, "config.json"))
    files = hf._checkpoint_files(path)
    expected = hf.hf_tensor_names(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        raise hf.CheckpointError(
            f"{path}: {len(missing)} tensor(s) that config.json implies are missing from the "
            f"weights, e.g. {missing[:3]}; the weights and config.json do not match"
        )
    model = LlamaForCausalLM(cfg)
    shapes = hf.param_shapes(model)
    headers = {}
    for name, (our_path, transpose) in expected.items():
        fname = files[name]
        if fname not in headers:
            headers[fname] = safetensors_io.read_header(fname)[0]
        info = headers[fname].get(name)
        if info is None:
            raise hf.CheckpointError(
                f"{fname}: tensor {name} is missing although the index lists it there; "
                "re-download or re-save the checkpoint"
            )
        want = tuple(hf._get_path(shapes, our_path).shape)
        want = want[::-1] if transpose else want
        if tuple(info["shape"]) != want:
            raise hf.CheckpointError(
                f"{fname}: tensor {name} has shape {tuple(info['shape'])}, config.json implies "
                f"{want}; use the config.json that belongs to these weights"
            )
        if info["dtype"] not in ("F32", "F16", "BF16", "F64"):
            raise hf.CheckpointError(
                f"{fname}: tensor {name} has dtype {info['dtype']} (quantized?); lard_jax "
                "reads float32, float16 and bfloat16 checkpoints: dequantize it first"
            )
    return cfg


def load_run_tokenizer(tokenizer_spec: str, checkpoint: str):
    """The run's tokenizer (config.data.tokenizer, or the checkpoint's own), or a ConfigError that
    says what is missing; never touches weights."""
    from lard_jax.tokenizer import load_tokenizer

    if (
        not tokenizer_spec
        and _gguf_path(checkpoint) is None
        and os.path.isdir(checkpoint)
        and not any(os.path.isfile(os.path.join(checkpoint, n)) for n in TOKENIZER_FILES)
    ):
        raise ConfigError(
            f"config.model.checkpoint={checkpoint}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files into it, or pass --config.data.tokenizer=/path/to/tokenizer_dir "
            "(or =byte for the built-in byte tokenizer)"
        )
    spec = tokenizer_spec or checkpoint
    what = "config.data.tokenizer" if tokenizer_spec else "config.model.checkpoint"
    try:
        return load_tokenizer(spec)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"{what}={spec}: cannot load a tokenizer ({' '.join(str(e).split())[:300]}); pass "
            "--config.data.tokenizer=/path/to/tokenizer_dir or =byte"
        ) from None


def prepare_workdir(workdir: str, what: str = "config.workdir") -> None:
    """Create the workdir and prove it writable now, not at the first checkpoint."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"{what}={workdir}: not writable ({e.strerror or e}); choose a directory you can write to"
        ) from None


def student_max_positions(config, teacher_cfg, rope: dict | None = None) -> int:
    """What the student's config claims: config.student.max_position_embeddings, else teacher's x factor."""
    if rope is None:
        rope = rope_lib.normalize_rope_scaling(_rope_dict(config))
    return int(config.student.max_position_embeddings or teacher_cfg.max_position_embeddings * _factor(rope))


def warn_long_eval(spec, max_positions: int, who: str) -> None:
    """A warning naming every evaluation length past what `who`'s RoPE addresses (max_position_embeddings)."""
    from lard_jax import cli

    for key, lengths in (
        ("ppl_lengths", spec.ppl_lengths),
        ("passkey_lengths", spec.passkey_lengths),
        ("niah_lengths", spec.niah_lengths),
    ):
        past = sorted({int(n) for n in lengths if int(n) > max_positions})
        if past:
            cli.warn(
                f"config.eval.{key}: {', '.join(map(str, past))} is beyond {who}'s max_position_embeddings "
                f"{max_positions}; results there measure extrapolation past what its RoPE addresses"
            )


def _data_error(e: Exception, what: str) -> ConfigError:
    text = " ".join(str(e).split())
    if isinstance(e, UnicodeDecodeError):
        text = f"not valid UTF-8 ({text}); re-encode it as UTF-8 or remove it"
    return ConfigError(f"{what}: {text}")


# Keys that may change between a run and its resumption (run length, logging, test hooks).
# train.steps may change only with train.extend=True (check_resumable).
_RESUME_FREE_KEYS = {
    "train.extend",
    "model.scan_grads",  # the same gradients either way (tests/test_layer_scan.py)
    "train.retrain",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_checkpoints_after",
    "train.max_skipped_steps",
    "train.crash_after_step",
    "train.nan_at_steps",
    "stage2.steps",
    "eval",
    "distributed",
    "workdir",
    "mesh",
    "data.cache_dir",
    "data.allow_long",
    "model.export_dtype",
    "model.scan_layers",
    "loss.fused",
}  # orbax reshards on a new mesh


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_not_finished(config) -> None:
    """A workdir whose run has finished (summary.json written, training checkpoints deleted, as
    they are by default) is not trained again from step 0 by running the same command twice:
    refuse unless config.train.retrain says so. With checkpoints kept (train.keep_checkpoints_after)
    a rerun resumes at the last step and only exports and evaluates again, so it passes."""
    finished = os.path.exists(os.path.join(config.workdir, "summary.json"))
    has_checkpoints = os.path.isdir(os.path.join(config.workdir, "checkpoints"))
    if finished and not has_checkpoints and not config.train.get("retrain", False):
        raise ConfigError(
            f"config.workdir={config.workdir}: it holds a finished run (summary.json, hf_student/) whose "
            "training checkpoints were deleted, so running again would train from step 0; use a new "
            "config.workdir, or pass --config.train.retrain=True to train again here (its outputs are replaced)"
        )


def check_resumable(config) -> None:
    """A workdir with checkpoints resumes only the run that wrote them: refuse a different model,
    data or recipe instead of failing inside orbax (or silently mixing two runs)."""
    previous = os.path.join(config.workdir, "config.json")
    if not (os.path.exists(previous) and os.path.isdir(os.path.join(config.workdir, "checkpoints"))):
        return
    with open(previous) as f:
        old = _flat(json.load(f))
    new = _flat(json.loads(config.to_json_best_effort()))
    if old.get("train.steps") != new.get("train.steps") and not config.train.get("extend", False):
        raise ConfigError(
            f"config.train.steps={new.get('train.steps')}: {config.workdir} holds checkpoints of a "
            f"{old.get('train.steps')}-step run (its learning-rate schedule ends there); pass "
            "--config.train.extend=True to continue it to the new length (the schedule is stretched), "
            f"restore --config.train.steps={old.get('train.steps')}, or use a new config.workdir"
        )
    free = lambda k: k == "train.steps" or any(k == f or k.startswith(f + ".") for f in _RESUME_FREE_KEYS)  # noqa: E731
    changed = sorted(k for k in set(old) | set(new) if not free(k) and old.get(k) != new.get(k))
    if changed:
        raise ConfigError(
            f"{config.workdir} holds checkpoints of a run with a different config "
            f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} differ); "
            "use a new config.workdir or restore the old values"
        )


# ----------------------------------------------------------------------------------------------
# data: the training text tokenised into the workdir's cache (the last check before weights)
def build_loader(config, tokenizer, *, seq_len, batch_size, grad_accum, mode=None):
    from lard_jax import data as data_lib

    # One cache per process: hosts of a pod slice may share the workdir but must not race on one folder.
    cache_dir = config.data.cache_dir or os.path.join(config.workdir, "token_cache", f"process_{jax.process_index()}")
    try:
        cache = data_lib.prepare_token_cache(
            config.data.source, tokenizer, cache_dir, text_field=config.data.text_field
        )
    except UserError:
        raise
    except ValueError as e:  # the readers' messages name the file (and line); UnicodeDecodeError included
        raise _data_error(e, f"config.data.source={config.data.source}") from None
    per_host = batch_size * grad_accum // jax.process_count()
    try:
        return data_lib.BlockLoader(
            cache,
            seq_len=seq_len,
            batch_size=per_host,
            mode=mode or config.data.mode,
            seed=config.seed,
            host_index=jax.process_index(),
            host_count=jax.process_count(),
            add_bos=config.data.add_bos and cache.bos_id is not None,
            bos=config.data.bos,
            pad_short=bool(config.data.get("pad_short", False)),
        )
    except ValueError as e:
        raise ConfigError(
            f"config.data.source: {' '.join(str(e).split())}; use more text, a "
            "smaller config.train.batch_size or config.data.seq_len, or --config.data.pad_short=True "
            "to keep short documents (padded)"
        ) from None
