"""A pure Flax (linen) LLaMA family: Llama-2 (MHA), Llama-3 / Mistral (GQA), optional q/k/v bias.

The same module serves as teacher and student: they differ only in `LlamaConfig.rope_scaling`.
Every attention layer sows its post-RoPE q, k and its v into the `intermediates` collection
(`intermediates/model/layers_{i}/self_attn/{q,k,v}`); the relation-distillation loss reads them.
Sowing costs nothing unless the caller makes `intermediates` mutable.

Parameter names mirror Hugging Face's (`model/layers_0/self_attn/q_proj/kernel`), with kernels
stored as [in, out] (Hugging Face stores [out, in]); `lard_jax.hf` converts between the two.
Mistral's sliding window is not implemented: at the lengths LinearARD trains (4096) Mistral-7B's
window (4096) never cuts anything off, and long-context evaluation uses full attention.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lard_jax import attention as attn_lib
from lard_jax import rope as rope_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _freeze(value):
    """Dicts/lists -> sorted tuples, so a config holding a rope dict stays hashable (jit static args)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, tuple) and value and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in value):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def dtype_of(name) -> Any:
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a LLaMA-family model (field names follow transformers)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # transformers-format dict; stored frozen (see rope_scaling_dict)
    attention_bias: bool = False  # Llama's flag: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2 style: bias on q, k, v only
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "xla"  # lard_jax.attention.IMPLS: auto | xla (dense) | cudnn | blockwise | pallas_tpu
    lora_dropout: float = 0.0  # training only: dropout on the input of unmerged LoRA factors (LoraDense)

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in attn_lib.IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {attn_lib.IMPLS}")
        dtype_of(self.dtype), dtype_of(self.param_dtype)
        scaling = self.rope_scaling
        if isinstance(scaling, tuple):
            scaling = _thaw(scaling)
        scaling = rope_lib.normalize_rope_scaling(scaling)
        set_("rope_scaling", _freeze(scaling) if scaling is not None else None)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else _thaw(self.rope_scaling)

    def replace(self, **changes) -> "LlamaConfig":
        if "rope_scaling" in changes and isinstance(changes["rope_scaling"], Mapping):
            changes["rope_scaling"] = dict(changes["rope_scaling"])
        return dataclasses.replace(self, **changes)

    def rope_frequencies(self, seq_len: int) -> tuple[np.ndarray, float]:
        return rope_lib.rope_frequencies(
            self.rope_scaling_dict, head_dim=self.head_dim, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings, seq_len=seq_len)

    def num_params(self) -> int:
        e, h, kv, d, m = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                          self.head_dim, self.intermediate_size)
        attn = e * h * d * 2 + e * kv * d * 2
        layer = attn + 3 * e * m + 2 * e
        emb = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + e


# ----------------------------------------------------------------------------------------------
# Logical axis names, keyed by the parameter's name inside its module. One table, read by
# lard_jax.sharding to build NamedShardings; kept here because it is a fact about this model.
PARAM_LOGICAL_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("q_proj", "kernel"): ("embed", "q_heads"),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("o_proj", "kernel"): ("q_heads", "embed"),
    ("q_proj", "bias"): ("q_heads",),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "bias"): ("embed",),
    ("input_layernorm", "weight"): ("norm",),
    ("post_attention_layernorm", "weight"): ("norm",),
    ("norm", "weight"): ("norm",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


def param_logical_axes(params) -> Any:
    """A tree like `params` whose leaves are tuples of logical axis names."""
    def axes(path, leaf):
        names = tuple(getattr(p, "key", str(p)) for p in path)
        key = names[-2:]
        if key in PARAM_LOGICAL_AXES:
            return PARAM_LOGICAL_AXES[key]
        if names[-1] in ("lora_a", "lora_b"):
            return (None,) * np.ndim(leaf)
        raise KeyError(f"no logical axes known for parameter {'/'.join(names)}")
    return jax.tree_util.tree_map_with_path(axes, params)


# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply; do the same.
        return (weight.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LoraDense(nn.Dense):
    """nn.Dense, plus PEFT's unmerged LoRA path when the params hold `lora_a` [in, r] and `lora_b`
    [r, out] next to the kernel: y = x W + b + dropout(x) A B. The trainer passes B already
    multiplied by alpha / r (lard_jax.trainable.student_params), so the scale stays a training
    hyperparameter. Inverted dropout at rate `lora_dropout`, only when the apply has a "dropout"
    rng (training); without one (evaluation) the path is deterministic. Like PEFT with float32
    adapters, the LoRA path runs in the factors' dtype and is cast back to the output's."""
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs):
        y = super().__call__(inputs)
        if not self.has_variable("params", "lora_a"):
            return y
        a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
        x = inputs.astype(a.dtype)
        if self.lora_dropout > 0 and self.has_rng("dropout"):
            x = lora_dropout(x, self.make_rng("dropout"), self.lora_dropout)
        return (y.astype(a.dtype) + (x @ a) @ b).astype(y.dtype)


def lora_dropout(x, key, rate: float):
    """Inverted dropout: keep each element with probability 1 - rate and divide by 1 - rate."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _dense(features, use_bias, cfg: LlamaConfig, name):
    return LoraDense(features, use_bias=use_bias, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                     kernel_init=nn.initializers.normal(0.02), lora_dropout=cfg.lora_dropout, name=name)


def attention_mask_matrix(segment_ids, attention_mask, seq_len):
    """Boolean [B, 1, T, T] mask: causal, same segment, real key; the diagonal is always kept so
    padded query rows stay finite (their outputs are ignored by every loss)."""
    return attn_lib.dense_mask(segment_ids, attention_mask, seq_len)


class LlamaAttention(nn.Module):
    """`mask`: None (causal), an attention.MaskInfo, or a dense [B, 1, T, T] bool matrix.

    KV cache (lard_jax.generate): with `cache` = this layer's (k, v) cache [B, KV, C, D] the call
    returns (out, (k, v)), the new tokens' post-RoPE keys/values [B, t, KV, D] for the caller to
    store. `cache_index` None = prefill (the cache is empty: ordinary attention over x); else [B]
    int, the number of valid cache entries per row, and x's tokens attend to those plus themselves.
    """
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias
        q = _dense(h * d, bias, cfg, "q_proj")(x).reshape(b, t, h, d)
        k = _dense(kv * d, bias, cfg, "k_proj")(x).reshape(b, t, kv, d)
        v = _dense(kv * d, bias, cfg, "v_proj")(x).reshape(b, t, kv, d)
        q = rope_lib.apply_rope(q, cos, sin)
        k = rope_lib.apply_rope(k, cos, sin)
        self.sow("intermediates", "q", q)
        self.sow("intermediates", "k", k)
        self.sow("intermediates", "v", v)
        if cache is not None and cache_index is not None:
            out = attn_lib.decode_attention(q, k, v, cache[0], cache[1], cache_index)
        else:
            out = attn_lib.attention(q, k, v, mask=mask, impl=cfg.attention_impl)
        out = _dense(cfg.hidden_size, cfg.attention_bias, cfg, "o_proj")(out.reshape(b, t, h * d))
        return out if cache is None else (out, (k, v))


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))
        attn = LlamaAttention(cfg, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask, cache, cache_index)
        attn, new_kv = attn if cache is not None else (attn, None)
        x = x + attn
        x = x + LlamaMLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
        self.sow("intermediates", "hidden", x)  # LongReD's hidden-state distillation reads these
        return x if cache is None else (x, new_kv)


def _remat_layer(cfg: LlamaConfig):
    if cfg.remat == "none":
        return LlamaDecoderLayer
    policy = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[cfg.remat]
    return nn.remat(LlamaDecoderLayer, policy=policy, prevent_cse=False)


def positions_from_segments(segment_ids):
    """Positions restart at 0 at every new segment of a packed row."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class LlamaModel(nn.Module):
    """With `cache` ({"k", "v"}: [layers, B, KV, C, D]) returns (x, embed, new cache): the input
    tokens' keys/values are written at [0, T) (prefill, `cache_index` None) or at cache_index[b] +
    [0, T) per row (decode). `rope_inv_freq` [B, D/2] overrides the config's frequencies per row
    (generation's dynamic-NTK / longrope schedule)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None, cache=None,
                 cache_index=None, rope_inv_freq=None):
        cfg = self.config
        b, t = input_ids.shape
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype),
                         param_dtype=dtype_of(cfg.param_dtype), embedding_init=nn.initializers.normal(0.02),
                         name="embed_tokens")
        x = embed(input_ids)
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(t), (b, t)))
        # Static sequence length: dynamic-NTK and longrope pick their frequencies from it, as
        # transformers does from max(position_ids) + 1 on an unpadded batch.
        inv_freq, attn_scaling = cfg.rope_frequencies(seq_len=t)
        if rope_inv_freq is not None:  # [B, D/2]: per-row frequencies (attention scaling does not vary)
            inv_freq = jnp.asarray(rope_inv_freq, jnp.float32)[:, None, :]
        cos, sin = rope_lib.rope_cos_sin(positions, inv_freq, attn_scaling)
        mask = None
        if segment_ids is not None or attention_mask is not None:
            # the dense [T, T] matrix is built inside attention only by the dense implementations
            mask = attn_lib.MaskInfo(segment_ids, attention_mask)
        layer_cls = _remat_layer(cfg)
        for i in range(cfg.num_hidden_layers):
            if cache is None:
                x = layer_cls(cfg, name=f"layers_{i}")(x, cos, sin, mask)
                continue
            x, (k, v) = layer_cls(cfg, name=f"layers_{i}")(x, cos, sin, mask, (cache["k"][i], cache["v"][i]),
                                                           cache_index)
            cache = {"k": _cache_write(cache["k"], i, k, cache_index), "v": _cache_write(cache["v"], i, v, cache_index)}
        x = RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="norm")(x)
        return (x, embed) if cache is None else (x, embed, cache)


def _cache_write(buf, layer, new, cache_index):
    """buf [L, B, KV, C, D] with layer `layer`'s rows written from new [B, t, KV, D]: at [0, t) when
    cache_index is None, else at cache_index[b] + [0, t) for row b."""
    new = new.astype(buf.dtype)
    if cache_index is None:
        return jax.lax.dynamic_update_slice(buf, new.transpose(0, 2, 1, 3)[None], (layer, 0, 0, 0, 0))
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    cols = jnp.asarray(cache_index)[:, None] + jnp.arange(t)[None, :]
    return buf.at[layer, rows, :, cols].set(new)  # advanced indices first: [B, t, KV, D]


class LlamaForCausalLM(nn.Module):
    """`apply({"params": p}, input_ids)` -> float32 logits [batch, seq, vocab]."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None, cache=None,
                 cache_index=None, rope_inv_freq=None, logits_at=None):
        """`cache`/`cache_index`/`rope_inv_freq`: see LlamaModel; with a cache returns (logits, cache).
        `logits_at` [B, n] int: logits only at those positions ([B, n, V]; prefill needs one row)."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        out = LlamaModel(cfg, name="model")(input_ids, positions, segment_ids, attention_mask, cache=cache,
                                            cache_index=cache_index, rope_inv_freq=rope_inv_freq)
        x, embed = out[:2]
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[..., None], axis=1)
        if cfg.tie_word_embeddings:
            kernel = embed.embedding.T
        else:
            kernel = LMHead(cfg.vocab_size, dtype_of(cfg.param_dtype), name="lm_head")(x.shape[-1])
        logits = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
        return logits if cache is None else (logits, out[2])


class LMHead(nn.Module):
    """Holds the untied output projection [embed, vocab]; the matmul happens in the caller with a
    float32 accumulator (bf16 logits over a 128K vocabulary lose the tail of the softmax)."""

    vocab_size: int
    param_dtype: Any

    @nn.compact
    def __call__(self, embed_dim):
        return self.param("kernel", nn.initializers.normal(0.02), (embed_dim, self.vocab_size), self.param_dtype)


def collect_qkv(intermediates) -> list[dict]:
    """Per layer {q, k, v} from the `intermediates` collection of one apply (layer order)."""
    model = intermediates["model"]
    layers = sorted((k for k in model if k.startswith("layers_")), key=lambda s: int(s.split("_")[1]))
    return [{name: model[k]["self_attn"][name][0] for name in ("q", "k", "v")} for k in layers]


def collect_hidden(intermediates) -> list:
    """Per layer output hidden states [B, T, E] from the `intermediates` collection."""
    model = intermediates["model"]
    layers = sorted((k for k in model if k.startswith("layers_")), key=lambda s: int(s.split("_")[1]))
    return [model[k]["hidden"][0] for k in layers]


def relation_inputs(model: LlamaForCausalLM, params, input_ids, **kwargs):
    """(logits, [per-layer {q, k, v}]) with q, k post-RoPE: what the relation loss compares."""
    logits, state = model.apply({"params": params}, input_ids, mutable=["intermediates"], **kwargs)
    return logits, collect_qkv(state["intermediates"])


def init_params(config: LlamaConfig, rng, seq_len: int = 8):
    model = LlamaForCausalLM(config)
    return model, model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
