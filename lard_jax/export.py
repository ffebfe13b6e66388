"""hf_student/: the restored student in Hugging Face format (`export_student`, called by the pipeline).

A safetensors teacher: the checkpoint's own files, same names, same shard layout, frozen tensors
byte-identical, trained tensors (student_params where `mask` is True, LoRA already merged)
replaced, config.json's RoPE and max_position_embeddings set to the student's, every other file
copied. Each file keeps the mode its counterpart in the checkpoint has.

A GGUF teacher: there are no float tensors to keep, so every tensor is written from the parameters,
in bfloat16 unless config.model.export_dtype says otherwise (float32 doubles the size: 517 MB for
a 135M model), with config.json, generation_config.json and tokenizer files built from the GGUF's
metadata (no PyTorch needed).

config.model.export_dtype: "checkpoint" (safetensors: each trained tensor in its checkpoint dtype;
GGUF: bfloat16), "float32", "bfloat16" or "float16".

README.md is the student's own card (lard_jax.model_card), with the teacher's card, if it had one,
below it and attributed. Its evaluation section is filled in after evaluation by
`model_card.add_report(out, report_json, native_len=...)`.

Nothing is written before every tensor that comes from memory has been checked finite in the
dtype it will be stored in (a NaN/Inf raises ExportError naming the tensor), and the files go into
a staging folder beside `out` that replaces `out` only once complete: a failed export leaves `out`
as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lard_jax import gguf as gguf_lib
from lard_jax import hf, model_card, safetensors_io
from lard_jax.errors import UserError
from lard_jax.plan import EXPORT_DTYPES, TOKENIZER_FILES, ConfigError, _gguf_path, export_dtype_of  # noqa: F401

__all__ = ["EXPORT_DTYPES", "ExportError", "export_student", "hf_config_with_rope"]

_NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_SHARD_BYTES = 4 << 30
_GGUF_DEFAULT = "bfloat16"


class ExportError(UserError):
    """The trained student cannot be exported (a NaN/Inf tensor); nothing was written."""


def hf_config_with_rope(raw: dict, student_cfg) -> dict:
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


# ----------------------------------------------------------------------------------------------
# checks before anything is written
def _nonfinite(value, dtype=None) -> int:
    """NaN/Inf count of `value` (a jax or numpy array; every process takes part), cast to `dtype` first."""
    x = jnp.asarray(value) if not isinstance(value, jax.Array) else value
    if dtype is not None:
        x = x.astype(jnp.dtype(dtype))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return 0
    return int(jnp.sum(~jnp.isfinite(x)))


def _check_finite(items, out: str, config) -> None:
    """items: (HF tensor name, value, dtype it will be stored in). Raises ExportError on the first bad one."""
    for name, value, dtype in items:
        bad = _nonfinite(value, dtype)
        if not bad:
            continue
        raw = _nonfinite(value)
        if raw:
            raise ExportError(
                f"{out}: not written: tensor {name} holds {raw} NaN/Inf value(s), training diverged; rerun in a "
                f"new config.workdir with a lower config.train.lr (now {config.train.lr:g})"
            )
        raise ExportError(
            f"{out}: not written: tensor {name} has {bad} value(s) beyond the range of {np.dtype(dtype).name}, "
            "the dtype it would be stored in; pass --config.model.export_dtype=float32"
        )


# ----------------------------------------------------------------------------------------------
def export_student(
    config,
    student,
    student_params,
    mask,
    tokenizer,
    out: str,
    *,
    train_tokens: int | None = None,
    command: str | None = None,
) -> None:
    """Write `out/` (see the module docstring). student_params / mask: hf.py's per-layer layout
    (trainer.per_layer_for_export); for a GGUF teacher student_params holds every tensor.
    train_tokens, command: for the model card (default: from the config, and this process's
    command line when it is experiments.restore)."""
    out = os.path.normpath(os.fspath(out))
    ckpt = config.model.checkpoint
    export_dtype = export_dtype_of(config)
    main = jax.process_index() == 0
    gguf_path = _gguf_path(ckpt)
    writer = _export_gguf if gguf_path is not None else _export_safetensors
    stage = os.path.join(os.path.dirname(out) or ".", f".{os.path.basename(out)}.partial")
    if main:
        shutil.rmtree(stage, ignore_errors=True)  # a crashed export's leftovers
    try:
        card_inputs = writer(
            config, student, student_params, mask, tokenizer, out, stage, export_dtype, gguf_path=gguf_path, main=main
        )
        if main:
            card_source = os.path.join(str(ckpt), "README.md")
            if command is not None:
                card_inputs["command"] = command
            card = model_card.write_card(stage, config, student.config, train_tokens=train_tokens, **card_inputs)
            if gguf_path is None and os.path.isfile(card_source):
                _same_mode(card, card_source)
            _swap_in(stage, out)
    except BaseException:
        if main:
            shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_in(stage: str, out: str) -> None:
    """Replace `out` with the complete `stage` folder (the previous export goes only once the new one is in)."""
    old = None
    if os.path.lexists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _same_mode(target: str, source: str) -> None:
    os.chmod(target, stat.S_IMODE(os.stat(source).st_mode))


# ----------------------------------------------------------------------------------------------
# a safetensors teacher: its files with the trained tensors replaced
def _export_safetensors(config, student, student_params, mask, tokenizer, out, stage, export_dtype, *, gguf_path, main):
    ckpt = config.model.checkpoint
    names = hf.hf_tensor_names(student.config)
    trained = {n: v for n, v in names.items() if bool(hf._get_path(mask, v[0]))}
    files = sorted(set(hf._checkpoint_files(ckpt).values()))
    sources = {f: safetensors_io.open_tensors(f, check_finite=False) for f in files}
    target = {}  # trained tensor -> the dtype it is stored in
    for src in sources.values():
        for name in src:
            if name in trained:
                target[name] = src[name].dtype if export_dtype == "checkpoint" else _NUMPY[export_dtype]
    _check_finite([(n, hf._get_path(student_params, trained[n][0]), dtype) for n, dtype in target.items()], out, config)
    if main:
        os.makedirs(stage)
    total_changed = False
    for fname, source in sources.items():
        tensors = {}
        for name in source:
            if name in trained:
                our_path, transpose = trained[name]
                value = hf._to_host(hf._get_path(student_params, our_path))  # every process takes part
                value = value.T if transpose else value
                total_changed |= target[name] != source[name].dtype
                tensors[name] = np.ascontiguousarray(value.astype(target[name]))
            elif main:
                tensors[name] = np.asarray(source[name])
        if main:
            dest = os.path.join(stage, os.path.relpath(fname, ckpt))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            safetensors_io.save_file(tensors, dest, source.metadata(), mode=stat.S_IMODE(os.stat(fname).st_mode))
        del tensors
    if not main:
        return {}
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        dest = os.path.join(stage, os.path.basename(index))
        with open(index) as f:
            index_json = json.load(f)
        if total_changed and isinstance(index_json.get("metadata"), dict) and "total_size" in index_json["metadata"]:
            index_json["metadata"]["total_size"] = sum(
                safetensors_io.open_tensors(os.path.join(stage, os.path.relpath(f, ckpt)), check_finite=False)[n].nbytes
                for f in files
                for n in sources[f]
            )
            with open(dest, "w") as f:
                json.dump(index_json, f, indent=2)
            _same_mode(dest, index)
        else:
            shutil.copy2(index, dest)
    copied = []
    for entry in sorted(os.listdir(ckpt)):
        src = os.path.join(ckpt, entry)
        if (
            entry.startswith(".")
            or not os.path.isfile(src)
            or entry in ("config.json", "README.md")  # written below: the student's
            or entry.endswith(_WEIGHT_SUFFIXES)
        ):
            continue
        shutil.copy2(src, os.path.join(stage, entry))
        copied.append(entry)
    with open(os.path.join(ckpt, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(hf_config_with_rope(raw, student.config), f, indent=2)
    _same_mode(os.path.join(stage, "config.json"), os.path.join(ckpt, "config.json"))
    if not any(n in copied for n in TOKENIZER_FILES):  # the checkpoint had none: ship the one the run used
        _save_run_tokenizer(tokenizer, stage, student.config.max_position_embeddings)
    dtypes = sorted({np.dtype(d).name for d in target.values()})
    how = "their checkpoint dtype" if export_dtype == "checkpoint" else "model.export_dtype"
    return {
        "teacher_hf_config": raw,
        "export_dtypes": f"trained tensors {', '.join(dtypes)} ({how}); all others as the checkpoint stores them",
    }


def _save_run_tokenizer(tokenizer, out: str, max_positions: int) -> None:
    from lard_jax.tokenizer import GGUFTokenizer, save_tokenizer_files

    if isinstance(tokenizer, GGUFTokenizer):
        tokenizer.save_pretrained(out, model_max_length=max_positions)
    elif hasattr(tokenizer, "save_pretrained"):  # ByteTokenizer
        tokenizer.save_pretrained(out)
    elif hasattr(getattr(tokenizer, "hf_tokenizer", None), "backend_tokenizer"):
        save_tokenizer_files(tokenizer.hf_tokenizer, out, model_max_length=max_positions)
    elif hasattr(getattr(tokenizer, "hf_tokenizer", None), "save_pretrained"):  # a slow-only tokenizer
        tokenizer.hf_tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# a GGUF teacher: every tensor from the parameters
def _export_gguf(config, student, student_params, mask, tokenizer, out, stage, export_dtype, *, gguf_path, main):
    del mask  # every tensor is written
    cfg = student.config
    dtype = _NUMPY[_GGUF_DEFAULT if export_dtype == "checkpoint" else export_dtype]
    names = hf.hf_tensor_names(cfg)
    leaves = {}
    for name, (our_path, transpose) in names.items():
        try:
            leaves[name] = (hf._get_path(student_params, our_path), transpose)
        except KeyError:
            raise ValueError(f"student_params has no {'/'.join(our_path)} (needed for {name})") from None
    _check_finite([(n, leaf, dtype) for n, (leaf, _) in leaves.items()], out, config)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, (leaf, transpose) in leaves.items():
        tensor = hf._to_host(leaf)  # every process takes part
        tensor = np.ascontiguousarray((tensor.T if transpose else tensor).astype(dtype))
        if size and size + tensor.nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if not main:
        return {}
    os.makedirs(stage)
    safetensors_io.save_sharded(shards, stage)
    del shards
    teacher = gguf_lib.hf_config(gguf_path)
    hf_cfg = hf.config_to_hf(cfg)
    hf_cfg["torch_dtype"] = dtype.name
    hf_cfg.update({k: teacher[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in teacher})
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    from lard_jax.tokenizer import write_gguf_side_files

    if config.data.get("tokenizer", ""):  # the run used another tokenizer: ship that one
        _save_run_tokenizer(tokenizer, stage, cfg.max_position_embeddings)
        gen = {k: teacher[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in teacher}
        with open(os.path.join(stage, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
    else:
        write_gguf_side_files(gguf_path, stage, model_max_length=cfg.max_position_embeddings)
    return {
        "teacher_hf_config": teacher,
        "teacher_card": None,
        "teacher_about": _gguf_about(gguf_path),
        "name": os.path.splitext(os.path.basename(gguf_path))[0],
        "license": _gguf_field(gguf_path, "general.license"),
        "export_dtypes": f"every tensor {dtype.name} (dequantized from the GGUF; model.export_dtype to change)",
    }


def _gguf_field(path: str, key: str):
    try:
        value = gguf_lib._open(path).get(key)
    except UserError:
        return None
    return value if isinstance(value, str) and value.strip() else None


def _gguf_about(path: str) -> str:
    parts = [os.path.basename(path)]
    name, org = _gguf_field(path, "general.name"), _gguf_field(path, "general.organization")
    if name:
        parts.append(f"general.name {name!r}" + (f" by {org}" if org else ""))
    return ", ".join(parts)
