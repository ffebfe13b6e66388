"""The restoration run: config -> teacher/student -> data -> masked training (-> CPT) -> hf_student/.

`run_restoration(config)` is what `python -m experiments.restore --config=...` calls. Everything
the config can get wrong is checked by `validate_config` / `check_against_model` before any
device work, and every input (workdir, checkpoint headers, tokenizer, text) before any weight is
read; mistakes raise `ConfigError` / `hf.CheckpointError` (both `lard_jax.errors.UserError`).
`export_student` writes hf_student/: the checkpoint with only the trained tensors replaced.
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
from lard_jax import rope as rope_lib
from lard_jax import sharding as sharding_lib
from lard_jax.errors import UserError
from lard_jax.model import LlamaForCausalLM, dtype_of
from lard_jax.sources import BUILTIN_PREFIX, resolve_source  # noqa: F401  (resolve_source: public here too)
from lard_jax.trainer import LoraSpec, LossSpec, TrainState


class ConfigError(UserError):
    """A configuration that cannot run; the message says which key, why, and how to fix it."""


# ----------------------------------------------------------------------------------------------
# validation
# builtin:train / builtin:heldout: Python's own bundled documentation (lard_jax.sources)


def validate_config(config) -> None:
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
    for key in ("dtype", "param_dtype", "trainable_dtype"):
        try:
            dtype_of(config.model[key])
        except ValueError as e:
            raise ConfigError(f"config.model.{key}: {e}") from None
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
        rope_lib.normalize_rope_scaling(_rope_dict(config))
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


def _rope_dict(config) -> dict | None:
    rs = config.student.rope_scaling
    if rs is None:
        return None
    d = rs.to_dict() if hasattr(rs, "to_dict") else dict(rs)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def check_against_model(config, teacher_cfg, mesh) -> None:
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


# ----------------------------------------------------------------------------------------------
# preflight: every input checked from headers and small files, before any weight is read
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
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


def student_max_positions(config, teacher_cfg) -> int:
    """What the student's config claims: config.student.max_position_embeddings, else teacher's x factor."""
    factor = float((_rope_dict(config) or {}).get("factor", 1.0))
    return int(config.student.max_position_embeddings or teacher_cfg.max_position_embeddings * factor)


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


# ----------------------------------------------------------------------------------------------
# models
def build_models(config, mesh):
    """(teacher, student, frozen_params). The student is the teacher's config with scaled RoPE."""
    overrides = dict(remat=config.model.remat, attention_impl=config.model.attention_impl)
    teacher, frozen = hf.load_pretrained(
        config.model.checkpoint,
        dtype=dtype_of(config.model.dtype),
        param_dtype=dtype_of(config.model.param_dtype),
        mesh=mesh,
        **overrides,
    )
    if config.model.get("scan_layers", False):  # stacked layers: one nn.scan (hf reads/writes per layer)
        frozen = trainer.to_layout(frozen, True, delete_source=True)
        teacher = LlamaForCausalLM(teacher.config.replace(scan_layers=True))
    student = LlamaForCausalLM(
        teacher.config.replace(
            rope_scaling=_rope_dict(config), max_position_embeddings=student_max_positions(config, teacher.config)
        )
    )
    return teacher, student, frozen


def loss_spec(config) -> LossSpec:
    factor = float((_rope_dict(config) or {}).get("factor", 8.0))
    return LossSpec.from_config(config.loss, long_factor=factor)  # each method reads its own keys


# ----------------------------------------------------------------------------------------------
# data
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
            from lard_jax import gguf as gguf_lib

            gguf_lib.write_hf_side_files(_gguf_path(ckpt), out)
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
    last checkpoint, before a crash) so that every step appears once."""

    def __init__(self, workdir: str, name: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, f"metrics_{name}.jsonl")
        self.writer = None
        if self.enabled and resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(os.path.join(workdir, "tensorboard", name))
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
    name: str,
    config,
    *,
    teacher,
    student,
    frozen,
    trainable,
    spec: LossSpec,
    lora: LoraSpec,
    loader,
    steps: int,
    grad_accum: int,
    opt_kw: dict,
    mesh,
    seq_len: int,
):
    """Runs (or resumes) one stage; returns the trained `trainable` tree."""
    optimizer, schedule = trainer.make_optimizer(total_steps=steps, **opt_kw)
    rng = jax.random.PRNGKey(config.seed)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=jax.jit(optimizer.init)(trainable), rng=rng
    )
    # Sharded leaves (trainable, Adam moments) keep their sharding; scalars and leaves that landed on
    # one device (step, rng, Adam count) are replicated over the mesh, so the step's shardings are fixed.
    state = jax.device_put(
        state,
        jax.tree_util.tree_map(
            lambda x: (
                x.sharding
                if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
                else sharding_lib.replicated(mesh)
            ),
            state,
        ),
    )
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
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step_fn = jax.jit(
        trainer.make_train_step(teacher, student, spec, lora, optimizer, schedule),
        donate_argnums=(0,),
        out_shardings=(shardings, None),
    )
    log = MetricsLog(config.workdir, name, resume_step=start)
    tokens_per_step = loader.batch_size * jax.process_count() * seq_len
    from lard_jax import flops as flops_lib

    try:  # executed model FLOPs (no remat recompute): lard_jax/flops.py says what is counted
        flops = flops_lib.executed_flops_per_token(
            student.config,
            seq_len=seq_len,
            method=spec.method,
            trainable=trainer.PROJECTION_SETS[config.train.trainable],
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

    Every input is checked before any weight is read: the config, the workdir (writable), the
    checkpoint's config.json and tensor headers, its tokenizer, the training (and held-out) text,
    tokenised into the cache here, and the resumability of the workdir."""
    if config.distributed:
        jax.distributed.initialize()
    validate_config(config)
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
    mesh = sharding_lib.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=jax.devices()[: config.mesh.num_devices or None]
    )
    check_against_model(config, teacher_cfg, mesh)
    student_max = student_max_positions(config, teacher_cfg)
    eval_docs = None
    if config.eval.enabled:  # fail on a bad evaluation setting before training, not after
        from lard_jax.evaluation import runner as eval_runner

        if not config.eval.source:
            raise ConfigError(
                "config.eval.enabled needs config.eval.source; pass --config.eval.source=/path/to/heldout "
                "(documents never trained on)"
            )
        try:
            eval_spec = eval_runner.eval_spec_from_config(config.eval, config.data.seq_len)
            eval_runner.check_spec(eval_spec, tokenizer)
        except UserError:
            raise
        except ValueError as e:
            raise ConfigError(f"config.eval: {e}") from None
        warn_long_eval(eval_spec, student_max, "the student")
        try:
            eval_docs = eval_runner.heldout_token_docs(config.eval.source, tokenizer, config.data.text_field)
        except UserError:
            raise
        except ValueError as e:
            raise _data_error(e, f"config.eval.source={config.eval.source}") from None
    check_resumable(config)
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    loader = build_loader(
        config,
        tokenizer,
        seq_len=config.data.seq_len,
        batch_size=config.train.batch_size,
        grad_accum=config.train.grad_accum,
    )
    s2_len = config.stage2.seq_len or student_max
    loader2 = None
    if config.stage2.steps:
        loader2 = build_loader(
            config, tokenizer, seq_len=s2_len, batch_size=config.stage2.batch_size, grad_accum=config.stage2.grad_accum
        )

    teacher, student, frozen = build_models(config, mesh)  # the first weight read
    print(
        f"teacher: {rope_lib.describe_rope(teacher.config.rope_scaling_dict)} RoPE, "
        f"{hf.num_params(frozen) / 1e6:.1f}M params; student: "
        f"{rope_lib.describe_rope(student.config.rope_scaling_dict)}; mesh {dict(mesh.shape)}"
    )
    projections = trainer.PROJECTION_SETS[config.train.trainable]
    mask = trainer.trainable_mask(frozen, projections)
    lora = LoraSpec(rank=config.train.lora_rank, alpha=config.train.lora_alpha, dropout=config.train.lora_dropout)
    trainable = _init_trainable(frozen, mask, lora, config, mesh)
    spec = loss_spec(config)
    opt_kw = dict(
        lr=config.train.lr,
        warmup_steps=config.train.warmup_steps,
        min_lr_ratio=config.train.min_lr_ratio,
        clip=config.train.clip,
        weight_decay=config.train.weight_decay,
        b1=config.train.b1,
        b2=config.train.b2,
        eps=config.train.eps,
    )
    t0 = time.perf_counter()
    with mesh:
        trainable = train_stage(
            "stage1",
            config,
            teacher=teacher,
            student=student,
            frozen=frozen,
            trainable=trainable,
            spec=spec,
            lora=lora,
            loader=loader,
            steps=config.train.steps,
            grad_accum=config.train.grad_accum,
            opt_kw=opt_kw,
            mesh=mesh,
            seq_len=config.data.seq_len,
        )
        tokens = config.train.steps * config.train.batch_size * config.train.grad_accum * config.data.seq_len
        if config.stage2.steps:
            opt2 = dict(
                opt_kw,
                lr=config.stage2.lr,
                warmup_steps=config.stage2.warmup_steps,
                min_lr_ratio=config.stage2.min_lr_ratio,
            )
            trainable = train_stage(
                "stage2_cpt",
                config,
                teacher=teacher,
                student=student,
                frozen=frozen,
                trainable=trainable,
                spec=LossSpec(method="cpt"),
                lora=lora,
                loader=loader2,
                steps=config.stage2.steps,
                grad_accum=config.stage2.grad_accum,
                opt_kw=opt2,
                mesh=mesh,
                seq_len=s2_len,
            )
            tokens += config.stage2.steps * config.stage2.batch_size * config.stage2.grad_accum * s2_len
        student_params = jax.jit(lambda f, t: trainer.merge_student(f, t, lora))(frozen, trainable)
    out = os.path.join(config.workdir, "hf_student")
    export_student(
        config,
        student,
        *trainer.per_layer_for_export(  # hf.py's per-layer layout
            student_params, mask, student.config.num_hidden_layers, full=_gguf_path(config.model.checkpoint) is not None
        ),
        tokenizer,
        out,
    )
    student_params = jax.tree_util.tree_map(lambda x: x.astype(dtype_of(config.model.param_dtype)), student_params)
    summary = {
        "hf_student": out,
        "train_tokens": int(tokens),
        "train_seconds": time.perf_counter() - t0,
        "method": config.loss.method,
        "student_rope": rope_lib.describe_rope(student.config.rope_scaling_dict),
    }
    print(f"restored student written to {out}")
    if config.eval.enabled:
        summary.update(evaluate_run(config, tokenizer, teacher, student, frozen, student_params, docs=eval_docs))
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def evaluate_run(config, tokenizer, teacher, student, frozen, student_params, docs=None) -> dict:
    """Teacher, scaled (untrained) and restored student side by side -> <workdir>/report.*"""
    from lard_jax.evaluation import runner as eval_runner

    if docs is None:
        docs = eval_runner.heldout_token_docs(config.eval.source, tokenizer, config.data.text_field)
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


# Keys that may change between a run and its resumption (run length, logging, test hooks).
# train.steps may change only with train.extend=True (check_resumable).
_RESUME_FREE_KEYS = {
    "train.extend",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.crash_after_step",
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


def _init_trainable(frozen, mask, lora, config, mesh):
    trainable_dtype = dtype_of(config.model.trainable_dtype)
    selected_shardings = trainer.select(jax.tree_util.tree_map(lambda x: x.sharding, frozen), mask)
    fn = lambda f: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.astype(trainable_dtype), trainer.init_trainable(f, mask, lora, jax.random.PRNGKey(config.seed))
    )
    out_shardings = selected_shardings if not lora.enabled else None
    trainable = jax.jit(fn, out_shardings=out_shardings)(frozen)
    if lora.enabled:
        trainable = jax.device_put(trainable, sharding_lib.replicated(mesh))
    return trainable
