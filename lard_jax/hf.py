"""Hugging Face import/export: the door through which checkpoints come in and restored students go out.

    model, params = load_pretrained("/ckpt/Llama-2-7b-hf")                      # teacher
    student, student_params = load_pretrained("/ckpt/Llama-2-7b-hf",
                                              rope_scaling={"rope_type": "linear", "factor": 8.0})
    save_pretrained("/out/hf_student", student, student_params)

Reads `config.json` and `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`) without torch, through memory maps: with `mesh=` each tensor goes
straight onto its NamedSharding, each device reading only its slice, so a 7B checkpoint never
needs two full copies in host memory. Accepts both config styles: transformers 4
(`rope_scaling` + `rope_theta`) and transformers 5 (`rope_parameters`). Writes the transformers 4
style, which both versions read.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax import gguf as gguf_lib
from lard_jax import rope as rope_lib
from lard_jax import safetensors_io
from lard_jax.errors import UserError
from lard_jax.model import LlamaConfig, LlamaForCausalLM, dtype_of

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
_SHARD_BYTES = 4 << 30
_KEEP = object()


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read as a LLaMA-family model."""


# ----------------------------------------------------------------------------------------------
# config.json <-> LlamaConfig
def _dtype_name(dtype) -> str:
    return {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}[
        jnp.dtype(dtype)
    ]


def rope_from_hf_config(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict or None) from either config style."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and "type" not in params:
        params = None  # per-layer-type dicts (Gemma-style) are not Llama-like
    theta = hf.get("rope_theta") or (params or {}).get("rope_theta") or 10000.0
    # rope_scaling_from_hf_config also applies transformers' precedence for a top-level
    # original_max_position_embeddings (the Phi-3 / longrope case).
    return float(theta), rope_lib.rope_scaling_from_hf_config(hf)


def config_from_hf(
    hf: dict,
    *,
    rope_scaling=_KEEP,
    dtype=jnp.float32,
    param_dtype=None,
    max_position_embeddings=None,
    source="config.json",
) -> LlamaConfig:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not known and model_type not in SUPPORTED_ARCHITECTURES.values():
        raise CheckpointError(
            f"{source}: architecture {archs or model_type!r} is not Llama-like; use a checkpoint of one of "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = known[0] if known else model_type
    missing = [k for k in _REQUIRED_KEYS if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {missing}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (LLaMA uses silu)")
    theta, scaling = rope_from_hf_config(hf)
    if rope_scaling is not _KEEP:
        scaling = rope_lib.normalize_rope_scaling(rope_scaling)
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=max_position_embeddings or hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=bool(hf.get("attention_bias", False)) if model_type != "qwen2" else False,
        qkv_bias=model_type == "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=_dtype_name(dtype),
        param_dtype=_dtype_name(param_dtype or dtype),
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    qwen = cfg.qkv_bias and not cfg.attention_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling_dict,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.param_dtype,
        "initializer_range": 0.02,
    }
    if not qwen:
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    return out


# ----------------------------------------------------------------------------------------------
# tensor names
def hf_tensor_names(cfg: LlamaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF tensor name -> (our param path, transposed?)."""
    names = {
        "model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), False),
        "model.norm.weight": (("model", "norm", "weight"), False),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    bias = cfg.attention_bias or cfg.qkv_bias
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}", ("model", f"layers_{i}")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{hf}.self_attn.{proj}.weight"] = (ours + ("self_attn", proj, "kernel"), True)
            if bias and (proj != "o_proj" or cfg.attention_bias):
                names[f"{hf}.self_attn.{proj}.bias"] = (ours + ("self_attn", proj, "bias"), False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{hf}.mlp.{proj}.weight"] = (ours + ("mlp", proj, "kernel"), True)
            if cfg.mlp_bias:
                names[f"{hf}.mlp.{proj}.bias"] = (ours + ("mlp", proj, "bias"), False)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{hf}.{norm}.weight"] = (ours + (norm, "weight"), False)
    return names


def _set_path(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _checkpoint_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: no weight_map; re-download or re-save the checkpoint")
        files = {}
        for name, fname in weight_map.items():
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise CheckpointError(
                    f"{index}: lists shard {fname}, which does not exist in {path}; "
                    "download the missing shard(s) or re-save the checkpoint"
                )
            files[name] = full
        return files
    if os.path.exists(single):
        return {name: single for name in safetensors_io.read_header(single)[0]}
    others = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if len(others) == 1:
        full = os.path.join(path, others[0])
        return {name: full for name in safetensors_io.read_header(full)[0]}
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise CheckpointError(
            f"{path}: only PyTorch pickle weights found; convert them to safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(
        f"{path}: no weights (no model.safetensors, model.safetensors.index.json or other "
        "*.safetensors file); point config.model.checkpoint at a Hugging Face checkpoint "
        "directory with safetensors weights"
    )


def resolve_checkpoint(spec) -> str:
    """A checkpoint spec -> the path to read: a Hugging Face directory, or a .gguf file for
    `x.gguf`, a directory holding one .gguf and no safetensors, or `pkg:DISTNAME` (the .gguf
    inside that installed package). See lard_jax.gguf."""
    return gguf_lib.resolve_checkpoint(spec)


def _gguf_path(spec) -> str | None:
    path = gguf_lib.resolve_checkpoint(spec)
    return path if gguf_lib.is_gguf_path(path) else None


def read_hf_config(path: str) -> dict:
    if (gguf_path := _gguf_path(path)) is not None:
        return gguf_lib.hf_config(gguf_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def load_pretrained(
    path: str,
    *,
    rope_scaling=_KEEP,
    dtype=jnp.float32,
    param_dtype=None,
    max_position_embeddings=None,
    mesh=None,
    rules=None,
    **model_overrides,
):
    """Load a local Hugging Face LLaMA-family checkpoint: returns (model, params).

    rope_scaling: a transformers-format dict (e.g. {"rope_type": "linear", "factor": 8.0}) that
      replaces the checkpoint's; `None` or {"rope_type": "default"} means native RoPE. Omit it
      to keep the checkpoint's own scaling.
    dtype: compute dtype; param_dtype: storage dtype of the parameters (defaults to dtype).
    mesh, rules: place each tensor straight onto NamedSharding(mesh, spec from the parameter's
      logical axes and `rules`, see lard_jax.sharding); without a mesh, tensors go to the default
      device one at a time.
    model_overrides: other LlamaConfig fields (remat, attention_impl).
    """
    if (gguf_path := _gguf_path(path)) is not None:  # a llama.cpp file: lard_jax.gguf dequantizes it
        return _load_gguf(
            gguf_path,
            rope_scaling=rope_scaling,
            dtype=dtype,
            param_dtype=param_dtype,
            max_position_embeddings=max_position_embeddings,
            mesh=mesh,
            rules=rules,
            **model_overrides,
        )
    hf = read_hf_config(path)
    cfg = config_from_hf(
        hf,
        rope_scaling=rope_scaling,
        dtype=dtype,
        param_dtype=param_dtype,
        max_position_embeddings=max_position_embeddings,
        source=os.path.join(path, "config.json"),
    )
    if model_overrides:
        cfg = cfg.replace(**model_overrides)
    model = LlamaForCausalLM(cfg)
    files = _checkpoint_files(path)
    expected = hf_tensor_names(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}")
    unexpected = [
        n
        for n in files
        if n not in expected
        and not _IGNORED_TENSORS.match(n)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if unexpected:
        raise CheckpointError(
            f"{path}: tensor(s) not part of a {cfg.num_hidden_layers}-layer LLaMA model, e.g. {unexpected[:3]}"
        )
    shapes, shardings = _shapes_and_shardings(model, mesh, rules)
    store_dtype = dtype_of(cfg.param_dtype)
    opened: dict[str, dict] = {}
    params: dict = {}
    for name, (our_path, transpose) in expected.items():
        fname = files[name]
        if fname not in opened:
            opened[fname] = safetensors_io.open_tensors(fname)
        tensor = opened[fname][name]
        if transpose:
            tensor = tensor.T
        want = _get_path(shapes, our_path).shape
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(
                f"{fname}: tensor {name} has shape {tuple(tensor.T.shape if transpose else tensor.shape)}, "
                f"config.json implies {tuple(want[::-1] if transpose else want)}"
            )
        _set_path(params, our_path, _to_device(tensor, store_dtype, shardings and _get_path(shardings, our_path)))
    return model, params


def _to_device(tensor: np.ndarray, dtype, sharding):
    if sharding is None:
        return jnp.asarray(np.asarray(tensor).astype(dtype))
    return jax.make_array_from_callback(tensor.shape, sharding, lambda idx: np.asarray(tensor[idx]).astype(dtype))


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(path: str, model: LlamaForCausalLM, params, *, max_shard_bytes: int = _SHARD_BYTES) -> None:
    """Write `path/` (config.json + safetensors) that transformers' AutoModelForCausalLM loads."""
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    names = hf_tensor_names(cfg)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, (our_path, transpose) in names.items():
        try:
            leaf = _get_path(params, our_path)
        except KeyError:
            raise ValueError(f"params has no {'/'.join(our_path)} (needed for {name})") from None
        tensor = _to_host(leaf)
        tensor = np.ascontiguousarray(tensor.T if transpose else tensor)
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    is_main = jax.process_index() == 0
    if is_main:
        safetensors_io.save_sharded(shards, path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)


def num_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def _load_gguf(
    path,
    *,
    rope_scaling,
    dtype,
    param_dtype=None,
    max_position_embeddings=None,
    mesh=None,
    rules=None,
    **model_overrides,
):
    """load_pretrained for a .gguf file (same arguments): tensors dequantized one at a time by
    lard_jax.gguf, placed (and sharded) as they come, so one float32 copy at most is alive."""
    path = os.fspath(path)
    cfg = config_from_hf(
        gguf_lib.hf_config(path),
        rope_scaling=rope_scaling,
        dtype=dtype,
        param_dtype=param_dtype,
        max_position_embeddings=max_position_embeddings,
        source=path,
    )
    if model_overrides:
        cfg = cfg.replace(**model_overrides)
    model = LlamaForCausalLM(cfg)
    expected = hf_tensor_names(cfg)
    present = gguf_lib.tensor_names(path)
    missing = [n for n in expected if n not in present]
    if missing:
        first = missing[0]
        raise UserError(f"{path}: {len(missing)} tensor(s) missing, e.g. {gguf_lib._gguf_name(first)} ({first})")
    unexpected = [n for n in present if n not in expected]
    if unexpected:
        raise UserError(
            f"{path}: tensor {gguf_lib._gguf_name(unexpected[0])} is not part of a "
            f"{cfg.num_hidden_layers}-layer Llama model as the metadata describes it"
        )
    shapes, shardings = _shapes_and_shardings(model, mesh, rules)
    store = dtype_of(cfg.param_dtype)
    params: dict = {}
    for name, tensor in gguf_lib.iter_tensors(path):
        our_path, transpose = expected[name]
        want = tuple(_get_path(shapes, our_path).shape)
        hf_want = want[::-1] if transpose else want
        if tuple(tensor.shape) != hf_want:
            raise UserError(
                f"{path}: tensor {gguf_lib._gguf_name(name)} has shape {tuple(tensor.shape)} (as {name}), "
                f"the metadata implies {hf_want}"
            )
        if transpose:
            tensor = tensor.T
        leaf = gguf_lib._place(tensor, store, shardings and _get_path(shardings, our_path))
        del tensor  # the float32 copy goes before the next tensor is dequantized
        _set_path(params, our_path, leaf)
    return model, params


def param_shapes(model: LlamaForCausalLM):
    """The model's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def _shapes_and_shardings(model: LlamaForCausalLM, mesh, rules):
    """The parameter tree's shapes (nothing allocated) and, with a mesh, each parameter's
    NamedSharding from its declared logical axes and `rules` (else None)."""
    shapes = param_shapes(model)
    if mesh is None:
        return shapes, None
    from lard_jax import sharding as sharding_lib

    return shapes, sharding_lib.param_shardings(shapes, mesh, rules)
