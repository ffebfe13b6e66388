"""A pure Flax (linen) LLaMA family: Llama-2 (MHA), Llama-3 / Mistral (GQA), optional q/k/v bias.

The same module serves as teacher and student: they differ only in `LlamaConfig.rope_scaling`.
Every attention layer sows its post-RoPE q, k and its v into the `intermediates` collection
(`intermediates/model/layers_{i}/self_attn/{q,k,v}`, or stacked under `model/layers` with
scan_layers); `collect_qkv` reads either. Sowing costs nothing unless `intermediates` is mutable.

Two parameter layouts: per layer (`model/layers_0/...`, a Python loop; what lard_jax.hf reads and
writes) and stacked (`LlamaConfig.scan_layers`: `model/layers/...` with a leading layer axis, one
nn.scan over a remat'd block); `stack_layers` / `unstack_layers` convert any tree holding them.
`paired_decoder` runs teacher and student layer by layer in one pass (the fused relation loss).

Sharding: each parameter declares its logical axis names where it is created (`_declare`), and
`param_logical_axes` reads those declarations for any parameter tree (lard_jax.sharding turns them
into NamedShardings); `LlamaForCausalLM.init` still returns plain arrays. The hidden states between
decoder blocks (embedding output, each block's output, the final norm's input) are constrained to
HIDDEN_AXES inside `lard_jax.sharding.use_mesh(mesh, rules)`; elsewhere the constraints are no-ops.

Parameter names mirror Hugging Face's (`model/layers_0/self_attn/q_proj/kernel`), with kernels
stored as [in, out] (Hugging Face stores [out, in]); `lard_jax.hf` converts between the two.
Mistral's sliding window is not implemented: at the lengths LinearARD trains (4096) Mistral-7B's
window (4096) never cuts anything off, and long-context evaluation uses full attention.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lard_jax import attention as attn_lib
from lard_jax import layer_scan as layer_scan_lib
from lard_jax import partitioning
from lard_jax import rope as rope_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_no_batch_attention")
# How paired_decoder's layer scan is differentiated: "compute_dtype" (lard_jax.layer_scan: each
# layer's weight gradient leaves the backward scan in the compute dtype, then is cast to the stacks'
# dtype) or "jax" (JAX's own scan transpose: one accumulator of the stacks' dtype for the whole backward)
SCAN_GRADS = ("compute_dtype", "jax")


def _freeze(value):
    """Dicts/lists -> sorted tuples, so a config holding a rope dict stays hashable (jit static args)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in value)
    ):
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
    scan_layers: bool = False  # decoder layers under nn.scan, parameters stacked on a leading layer axis
    scan_grads: str = "compute_dtype"  # training only: one of SCAN_GRADS (paired_decoder's stacked layers)

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.scan_grads not in SCAN_GRADS:
            raise ValueError(f"unknown scan_grads {self.scan_grads!r}; expected one of {SCAN_GRADS}")
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

    def replace(self, **changes) -> LlamaConfig:
        if "rope_scaling" in changes and isinstance(changes["rope_scaling"], Mapping):
            changes["rope_scaling"] = dict(changes["rope_scaling"])
        return dataclasses.replace(self, **changes)

    def rope_frequencies(self, seq_len: int) -> tuple[np.ndarray, float]:
        return rope_lib.rope_frequencies(
            self.rope_scaling_dict,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            seq_len=seq_len,
        )

    def num_params(self) -> int:
        e, h, kv, d, m = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.intermediate_size,
        )
        attn = e * h * d * 2 + e * kv * d * 2
        layer = attn + 3 * e * m + 2 * e
        emb = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + e


# ----------------------------------------------------------------------------------------------
# Logical axis names. Each parameter declares its axes where it is created (`_declare`, e.g.
# q_proj/kernel ("embed", "q_heads")); nn.scan puts LAYER_AXIS in front of the stacked ones.
# lard_jax.sharding maps the names to mesh axes by rules. LlamaForCausalLM.init hands out plain
# arrays; `declared_axes` reads the declarations, `param_logical_axes` applies them to any tree.
LAYER_AXIS = "layers"  # logical name of the leading axis of stacked (scan_layers) parameters; never sharded
LORA_FACTORS = ("lora_a", "lora_b")  # made by lard_jax.trainable, not by the model: replicated
HIDDEN_AXES = ("batch", "length", "activation_embed")  # the hidden states between decoder blocks


def _declare(init, axes: tuple[str | None, ...]):
    """`init` with the parameter's logical axis names attached (flax boxes the value at init).
    rules=() keeps flax from constraining the value while unboxing it: lard_jax.sharding places
    parameters, and init stays independent of whatever mesh or rules are in effect."""
    return nn.with_logical_partitioning(init, axes, rules=())


def constrain_hidden(x):
    """Hidden states [B, T, E] constrained to HIDDEN_AXES under the mesh and rules in effect
    (lard_jax.sharding.use_mesh); a no-op outside them (one device, eager, a plain jit)."""
    return partitioning.constrain(x, HIDDEN_AXES)


# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", _declare(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply; do the same.
        return (weight.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LoraDense(nn.Dense):
    """nn.Dense, plus PEFT's unmerged LoRA path when the params hold `lora_a` [in, r] and `lora_b`
    [r, out] next to the kernel: y = x W + b + dropout(x) A B. The trainer passes B already
    multiplied by alpha / r (lard_jax.trainable.student_params), so the scale stays a training
    hyperparameter. Inverted dropout at rate `lora_dropout`, only in training: with an explicit
    `dropout_key` (what LlamaModel passes down, derived from its `dropout_rng`), else with a
    "dropout" rng in the apply; without either (evaluation) the path is deterministic. Like PEFT
    with float32 adapters, the LoRA path runs in the factors' dtype and is cast back to the output's."""

    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs, dropout_key=None):
        y = super().__call__(inputs)
        if not self.has_variable("params", "lora_a"):
            return y
        a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
        x = inputs.astype(a.dtype)
        if self.lora_dropout > 0:
            if dropout_key is None and self.has_rng("dropout"):
                dropout_key = self.make_rng("dropout")
            if dropout_key is not None:
                x = lora_dropout(x, dropout_key, self.lora_dropout)
        return (y.astype(a.dtype) + (x @ a) @ b).astype(y.dtype)


def lora_dropout(x, key, rate: float):
    """Inverted dropout: keep each element with probability 1 - rate and divide by 1 - rate."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _dense(features, use_bias, cfg: LlamaConfig, name, axes: tuple[str, str]):
    """A projection whose kernel [in, out] has logical `axes` and whose bias has axes[-1]."""
    return LoraDense(
        features,
        use_bias=use_bias,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=_declare(nn.initializers.normal(0.02), axes),
        bias_init=_declare(nn.initializers.zeros_init(), axes[-1:]),
        lora_dropout=cfg.lora_dropout,
        name=name,
    )


class TokenEmbed(nn.Embed):
    """nn.Embed (same parameter, same values) whose lookup gathers the table's embed axis first, as
    FSDP gathers a weight before its use, and returns hidden states constrained to HIDDEN_AXES:
    looked up from a table sharded over embed, they would need a full reshuffle to the batch
    sharding (XLA's partitioner replicates them first). Both constraints are no-ops outside a mesh."""

    def __call__(self, inputs):
        table = partitioning.constrain(self.embedding, ("vocab", None))
        (table,) = nn.dtypes.promote_dtype(table, dtype=self.dtype, inexact=False)  # as nn.Embed
        return constrain_hidden(jnp.take(table, inputs, axis=0))


def _sub_key(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


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
    `dropout_key`: this layer's LoRA-dropout key (q, k, v, o draw fold_in(key, 0..3)).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, dropout_key=None):
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias
        q_heads, kv_heads = ("embed", "q_heads"), ("embed", "kv_heads")
        q = _dense(h * d, bias, cfg, "q_proj", q_heads)(x, _sub_key(dropout_key, 0)).reshape(b, t, h, d)
        k = _dense(kv * d, bias, cfg, "k_proj", kv_heads)(x, _sub_key(dropout_key, 1)).reshape(b, t, kv, d)
        v = _dense(kv * d, bias, cfg, "v_proj", kv_heads)(x, _sub_key(dropout_key, 2)).reshape(b, t, kv, d)
        q = rope_lib.apply_rope(q, cos, sin)
        k = rope_lib.apply_rope(k, cos, sin)
        self.sow("intermediates", "q", q)
        self.sow("intermediates", "k", k)
        self.sow("intermediates", "v", v)
        if cache is not None and cache_index is not None:
            out = attn_lib.decode_attention(q, k, v, cache[0], cache[1], cache_index)
        else:
            # cuDNN's residuals named only where the policy keeps them: elsewhere the plain call
            out = attn_lib.attention(
                q, k, v, mask=mask, impl=cfg.attention_impl, name_residuals=cfg.remat == "dots_no_batch_attention"
            )
        out = _dense(cfg.hidden_size, cfg.attention_bias, cfg, "o_proj", ("q_heads", "embed"))(
            out.reshape(b, t, h * d), _sub_key(dropout_key, 3)
        )
        return out if cache is None else (out, (k, v))


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "gate_proj", ("embed", "mlp"))(x)
        up = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up_proj", ("embed", "mlp"))(x)
        return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down_proj", ("mlp", "embed"))(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One block. `scanned` (the body of LlamaModel's nn.scan): returns (x, per-layer output) with
    the output = the input tokens' (k, v) [B, t, KV, D] when a cache is given, else None; the
    scan stacks them and LlamaModel writes all layers into the cache at once (a scan that returned
    each layer's whole updated cache would copy the cache at every decoding step)."""

    config: LlamaConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, dropout_key=None):
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))
        attn = LlamaAttention(cfg, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, mask, cache, cache_index, dropout_key
        )
        attn, new_kv = attn if cache is not None else (attn, None)
        x = x + attn
        x = constrain_hidden(x + LlamaMLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x)))
        self.sow("intermediates", "hidden", x)  # LongReD's hidden-state distillation reads these
        if self.scanned:  # the new tokens' (k, v), stacked by the scan and written once (LlamaModel)
            return x, new_kv
        return x if cache is None else (x, new_kv)


def remat_policy(cfg: LlamaConfig):
    """The jax.checkpoint policy of cfg.remat (None for "full"); only meaningful when remat != "none"."""
    return {
        "none": None,
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        # + cuDNN attention's output and statistics (attention.with_named_residuals): no attention
        # forward rerun in the backward, for about 1 GiB more on Llama-2-7B at T 4096
        "dots_no_batch_attention": jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            jax.checkpoint_policies.save_only_these_names(attn_lib.RESIDUALS_NAME),
        ),
    }[cfg.remat]


def _remat_layer(cfg: LlamaConfig, in_scan: bool):
    """The block under cfg.remat. `prevent_cse` only inside a scan may be False (JAX's advice: there
    XLA cannot merge the backward's recomputation with the forward). In the Python loop it stays
    True: without the barrier XLA may CSE the recomputation into the forward and keep every
    activation, which is remat in name only (on an H200 the loop layout with remat "full" ran two
    attention forwards per layer, not three, before this barrier: docs/bench_restore_step.md)."""
    if cfg.remat == "none":
        return LlamaDecoderLayer
    return nn.remat(LlamaDecoderLayer, policy=remat_policy(cfg), prevent_cse=not in_scan)


def _scanned_layers(cfg: LlamaConfig):
    """nn.scan over the (remat'd) block: params (and sown intermediates) stacked on axis 0; the
    cache and the per-layer dropout keys are scanned over, everything else broadcast."""
    return nn.scan(
        _remat_layer(cfg, in_scan=True),
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        length=cfg.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: LAYER_AXIS},  # stacked parameters' axes: ("layers", ...)
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
    )


def positions_from_segments(segment_ids):
    """Positions restart at 0 at every new segment of a packed row."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def rope_and_mask(
    cfg: LlamaConfig,
    batch: int,
    seq_len: int,
    positions=None,
    segment_ids=None,
    attention_mask=None,
    rope_inv_freq=None,
):
    """(cos, sin, mask) that every layer of a forward uses (LlamaModel and paired_decoder)."""
    if positions is None:
        positions = (
            positions_from_segments(segment_ids)
            if segment_ids is not None
            else jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        )
    # Static sequence length: dynamic-NTK and longrope pick their frequencies from it, as
    # transformers does from max(position_ids) + 1 on an unpadded batch.
    inv_freq, attn_scaling = cfg.rope_frequencies(seq_len=seq_len)
    if rope_inv_freq is not None:  # [B, D/2]: per-row frequencies (attention scaling does not vary)
        inv_freq = jnp.asarray(rope_inv_freq, jnp.float32)[:, None, :]
    cos, sin = rope_lib.rope_cos_sin(positions, inv_freq, attn_scaling)
    # the dense [T, T] matrix is built inside attention only by the dense implementations
    mask = attn_lib.prepare_mask(
        segment_ids, attention_mask, seq_len, impl=cfg.attention_impl, dtype=cfg.dtype, head_dim=cfg.head_dim
    )
    return cos, sin, mask


def layer_dropout_keys(dropout_rng, num_layers: int):
    """[L] per-layer LoRA-dropout keys: fold_in(dropout_rng, i), the same in loop, scan and paired form."""
    return jax.vmap(lambda i: jax.random.fold_in(dropout_rng, i))(jnp.arange(num_layers))


class LlamaModel(nn.Module):
    """With `cache` ({"k", "v"}: [layers, B, KV, C, D]) returns (x, embed, new cache): the input
    tokens' keys/values are written at [0, T) (prefill, `cache_index` None) or at cache_index[b] +
    [0, T) per row (decode). `rope_inv_freq` [B, D/2] overrides the config's frequencies per row
    (generation's dynamic-NTK / longrope schedule). `dropout_rng`: the root of the LoRA-dropout keys
    (layer i uses fold_in(dropout_rng, i)); without it a "dropout" rng of the apply serves as root.
    With `config.scan_layers` the layers run under nn.scan with parameters stacked
    (`model/layers/...` with a leading layer axis; stack_layers / unstack_layers convert)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        attention_mask=None,
        cache=None,
        cache_index=None,
        rope_inv_freq=None,
        dropout_rng=None,
    ):
        cfg = self.config
        b, t = input_ids.shape
        embed = TokenEmbed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype_of(cfg.dtype),
            param_dtype=dtype_of(cfg.param_dtype),
            embedding_init=_declare(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed_tokens",
        )
        x = embed(input_ids)
        cos, sin, mask = rope_and_mask(cfg, b, t, positions, segment_ids, attention_mask, rope_inv_freq)
        if dropout_rng is None and cfg.lora_dropout > 0 and self.has_rng("dropout"):
            dropout_rng = self.make_rng("dropout")
        keys = None if dropout_rng is None else layer_dropout_keys(dropout_rng, cfg.num_hidden_layers)
        if cfg.scan_layers:
            layers = _scanned_layers(cfg)(cfg, scanned=True, name=STACKED)
            kv = None if cache is None else (cache["k"], cache["v"])
            x, new_kv = layers(x, cos, sin, mask, kv, cache_index, keys)
            if cache is not None:  # new_kv: [L, B, t, KV, D] each
                cache = {
                    "k": _cache_write_all(cache["k"], new_kv[0], cache_index),
                    "v": _cache_write_all(cache["v"], new_kv[1], cache_index),
                }
        else:
            layer_cls = _remat_layer(cfg, in_scan=False)
            for i in range(cfg.num_hidden_layers):
                key = None if keys is None else keys[i]
                if cache is None:
                    x = layer_cls(cfg, name=f"layers_{i}")(x, cos, sin, mask, None, None, key)
                    continue
                x, (k, v) = layer_cls(cfg, name=f"layers_{i}")(
                    x, cos, sin, mask, (cache["k"][i], cache["v"][i]), cache_index, key
                )
                cache = {
                    "k": _cache_write(cache["k"], i, k, cache_index),
                    "v": _cache_write(cache["v"], i, v, cache_index),
                }
        x = RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="norm")(constrain_hidden(x))
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


def _cache_write_all(buf, new, cache_index):
    """buf [L, B, KV, C, D] with every layer's rows written from new [L, B, t, KV, D] (the scanned
    form): at [0, t) when cache_index is None, else at cache_index[b] + [0, t) for row b. One
    update of the whole buffer (in place under jit), not one per layer."""
    new = new.astype(buf.dtype)
    if cache_index is None:
        return jax.lax.dynamic_update_slice(buf, new.transpose(0, 1, 3, 2, 4), (0, 0, 0, 0, 0))
    b, t = new.shape[1:3]
    rows = jnp.arange(b)[:, None]
    cols = jnp.asarray(cache_index)[:, None] + jnp.arange(t)[None, :]
    return buf.at[:, rows, :, cols].set(new.transpose(1, 2, 0, 3, 4))  # advanced indices first: [B, t, L, KV, D]


class LlamaForCausalLM(nn.Module):
    """`apply({"params": p}, input_ids)` -> float32 logits [batch, seq, vocab]."""

    config: LlamaConfig

    @nn.nowrap
    def init_with_output(self, *args, **kwargs):
        """nn.Module.init_with_output (what `init` and `lazy_init` call) with the logical-axis boxes
        of the parameters taken off: every parameter tree in lard_jax is plain arrays. The
        declarations stay readable through `declared_axes`."""
        out, variables = super().init_with_output(*args, **kwargs)
        return out, nn.unbox(variables)

    @nn.compact
    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        attention_mask=None,
        cache=None,
        cache_index=None,
        rope_inv_freq=None,
        logits_at=None,
        dropout_rng=None,
    ):
        """`cache`/`cache_index`/`rope_inv_freq`/`dropout_rng`: see LlamaModel; with a cache returns
        (logits, cache). `logits_at` [B, n] int: logits only at those positions ([B, n, V]; prefill
        needs one row)."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        out = LlamaModel(cfg, name="model")(
            input_ids,
            positions,
            segment_ids,
            attention_mask,
            cache=cache,
            cache_index=cache_index,
            rope_inv_freq=rope_inv_freq,
            dropout_rng=dropout_rng,
        )
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
        init = _declare(nn.initializers.normal(0.02), ("embed", "vocab"))
        return self.param("kernel", init, (embed_dim, self.vocab_size), self.param_dtype)


# ----------------------------------------------------------------------------------------------
# intermediates
def _layer_entries(intermediates):
    """Per layer, the `intermediates` sub-tree of that layer (loop: layers_i; scan: slices of layers)."""
    model = intermediates["model"]
    if STACKED in model:
        stacked = model[STACKED]
        n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)]
    layers = sorted((k for k in model if k.startswith("layers_")), key=lambda s: int(s.split("_")[1]))
    return [model[k] for k in layers]


def collect_qkv(intermediates) -> list[dict]:
    """Per layer {q, k, v} from the `intermediates` collection of one apply (layer order); either layout."""
    return [{name: e["self_attn"][name][0] for name in ("q", "k", "v")} for e in _layer_entries(intermediates)]


def stacked_qkv(intermediates) -> dict | None:
    """{q, k, v} stacked over layers ([L, B, T, H, D]) from the `intermediates` of a scanned model's
    apply (scan_layers), as nn.scan sowed them; None for the per-layer layout. What
    losses.relation_loss takes to run its layers under one lax.map (no per-layer slicing)."""
    model = intermediates["model"]
    if STACKED not in model:
        return None
    return {name: model[STACKED]["self_attn"][name][0] for name in ("q", "k", "v")}


def collect_hidden(intermediates) -> list:
    """Per layer output hidden states [B, T, E] from the `intermediates` collection; either layout."""
    return [e["hidden"][0] for e in _layer_entries(intermediates)]


def relation_inputs(model: LlamaForCausalLM, params, input_ids, **kwargs):
    """(logits, [per-layer {q, k, v}]) with q, k post-RoPE: what the relation loss compares."""
    logits, state = model.apply({"params": params}, input_ids, mutable=["intermediates"], **kwargs)
    return logits, collect_qkv(state["intermediates"])


def init_params(config: LlamaConfig, rng, seq_len: int = 8):
    model = LlamaForCausalLM(config)
    return model, model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


# ----------------------------------------------------------------------------------------------
# logical axes of parameter trees, from the declarations (`_declare`) made where parameters are created
# A tiny model with every optional parameter switched on (q/k/v/o and MLP biases, an untied lm_head):
# its parameters are every name the model can create. A new optional parameter needs its flag here.
_AXES_PROBE = LlamaConfig(
    vocab_size=8,
    hidden_size=8,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=8,
    attention_bias=True,
    mlp_bias=True,
)
_LAYER_KEY = "layers_0"  # per-layer paths are looked up with their layer index replaced by 0


@functools.lru_cache(maxsize=1)
def declared_axes() -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Parameter path (`("model", "layers_0", "self_attn", "q_proj", "kernel")`) -> the logical axes
    it is created with, for both layouts (per layer `layers_0`, stacked `layers`). Read off an
    abstract init that keeps flax's boxes (nothing is computed); cached: it is a fact about the code.
    Raises ValueError for a parameter created without `_declare`."""
    table = {}
    ids = jnp.zeros((1, 1), jnp.int32)
    for scan in (False, True):
        model = LlamaForCausalLM(_AXES_PROBE.replace(scan_layers=scan))
        # nn.Module's own init_with_output: LlamaForCausalLM's drops the boxes this reads
        boxed = jax.eval_shape(lambda m=model: nn.Module.init_with_output(m, jax.random.PRNGKey(0), ids)[1])
        for path, box in flax.traverse_util.flatten_dict(flax.core.unfreeze(boxed["params"])).items():
            if not isinstance(box, nn.Partitioned):
                raise ValueError(
                    f"parameter {'/'.join(path)} is created without logical axes; wrap its init in _declare"
                )
            table[path] = tuple(box.names)
    return table


def _normalized_path(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_LAYER_KEY if n.startswith("layers_") and n[7:].isdigit() else n for n in names)


def _axes_of(names: tuple[str, ...], leaf) -> tuple[str | None, ...]:
    """The declared axes of the parameter at path `names` (matched by path suffix, so sub-trees and
    trees with extra outer keys work; the leaf's rank picks the layout when the path cannot)."""
    ndim = len(leaf.shape) if _is_array(leaf) else None
    if names and names[-1] in LORA_FACTORS:
        return (None,) * (np.ndim(leaf) if ndim is None else ndim)
    key = _normalized_path(names)
    found = {
        axes
        for path, axes in declared_axes().items()
        if key and (path[-len(key) :] == key or key[-len(path) :] == path) and (ndim is None or len(axes) == ndim)
    }
    if len(found) != 1:
        why = "no parameter of the model" if not found else f"ambiguous: {sorted(found, key=str)}"
        raise KeyError(f"no logical axes for parameter {'/'.join(names)} ({why})")
    return found.pop()


def param_logical_axes(params) -> Any:
    """A tree like `params` whose leaves are tuples of logical axis names, as the model declares them
    (stacked `model/layers/...` parameters get LAYER_AXIS in front). `params` may hold arrays or
    ShapeDtypeStructs, be either layout, a sub-tree (the trainable projections) or hold LoRA factors
    (`lora_a`/`lora_b`: every axis None, i.e. replicated). An unknown parameter is a KeyError."""

    def axes(path, leaf):
        return _axes_of(tuple(getattr(p, "key", str(p)) for p in path), leaf)

    return jax.tree_util.tree_map_with_path(axes, params)


# ----------------------------------------------------------------------------------------------
# parameter layouts: per layer (`layers_0`, `layers_1`, ...: what lard_jax.hf reads and writes)
# and stacked (`layers` with a leading layer axis: what scan_layers=True uses)
STACKED = "layers"


def _is_layer_dict(x) -> bool:
    return isinstance(x, Mapping) and ("layers_0" in x or STACKED in x)


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _stack_leaves(*xs):
    if not _is_array(xs[0]):  # e.g. a boolean mask tree: one value for all layers
        if any(x != xs[0] for x in xs[1:]):
            raise ValueError(f"cannot stack differing non-array leaves {xs[:4]}")
        return xs[0]
    sharding = getattr(xs[0], "sharding", None)
    out = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype, sharding=out)
    if out is not None and isinstance(xs[0], jax.Array):
        return jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*xs)
    if isinstance(xs[0], np.ndarray):
        return np.stack(xs)
    return jnp.stack(xs)


def _unstack_leaf(x, i):
    if not _is_array(x):
        return x
    sharding = getattr(x, "sharding", None)
    out = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=out)
    if out is not None and isinstance(x, jax.Array):
        return jax.jit(lambda a: a[i], out_shardings=out)(x)
    return x[i]


def _map_layer_dicts(tree, fn):
    """fn applied to every dict in `tree` (any pytree: params, optax states, TrainState dicts) that
    holds `layers_0...` or `layers`; the rest of the tree is kept as it is."""
    if _is_layer_dict(tree):
        return fn(tree)
    return jax.tree_util.tree_map(
        lambda x: fn(x) if _is_layer_dict(x) else x, tree, is_leaf=lambda x: _is_layer_dict(x) and x is not tree
    )


def is_stacked(params) -> bool:
    """Whether `params` (or any tree holding them) is in the stacked layout."""
    found = []
    _map_layer_dicts(params, lambda d: found.append(STACKED in d) or d)
    return any(found)


def stack_layers(tree, *, delete_source: bool = False):
    """Per-layer tree (`layers_0`, `layers_1`, ...) -> stacked (`layers`, leading layer axis). Works on
    any tree holding such dicts (params, trainable trees, masks, optimizer states, ShapeDtypeStructs);
    a stacked tree comes back unchanged. Sharded leaves keep their mesh and spec, with the layer axis
    unsharded in front (what lard_jax.sharding assigns to stacked parameters). `delete_source`: free
    each per-layer buffer once its stack exists (peak extra memory: one stacked parameter kind)."""

    def fn(d):
        if STACKED in d:
            return d
        n = 0
        while f"layers_{n}" in d:
            n += 1
        per_layer = [d[f"layers_{i}"] for i in range(n)]
        flat = [flax.traverse_util.flatten_dict(flax.core.unfreeze(p)) for p in per_layer]
        if any(f.keys() != flat[0].keys() for f in flat[1:]):
            raise ValueError("cannot stack layers with different parameter names")
        stacked = {}
        for k in flat[0]:
            leaves = [f[k] for f in flat]
            stacked[k] = _stack_leaves(*leaves)
            if delete_source:
                for leaf in leaves:
                    if isinstance(leaf, jax.Array) and leaf is not stacked[k]:
                        leaf.delete()
        out = {k: v for k, v in d.items() if not (k.startswith("layers_") and k[7:].isdigit())}
        out[STACKED] = flax.traverse_util.unflatten_dict(stacked)
        return out

    return _map_layer_dicts(tree, fn)


def unstack_layers(tree, num_layers: int | None = None):
    """Stacked tree (`layers`) -> per-layer (`layers_0`, ...), the layout lard_jax.hf reads and writes;
    a per-layer tree comes back unchanged. `num_layers` is needed only for trees without arrays
    under `layers` (e.g. a boolean mask)."""

    def fn(d):
        if STACKED not in d:
            return d
        stacked = d[STACKED]
        arrays = [x for x in jax.tree_util.tree_leaves(stacked) if _is_array(x)]
        n = num_layers if num_layers is not None else (arrays[0].shape[0] if arrays else None)
        if n is None:
            raise ValueError("unstack_layers: pass num_layers for a tree without arrays")
        out = {k: v for k, v in d.items() if k != STACKED}
        for i in range(n):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: _unstack_leaf(x, i), stacked)
        return out

    return _map_layer_dicts(tree, fn)


# ----------------------------------------------------------------------------------------------
# the paired decoder: teacher and student layer by layer in one pass
def _apply_layer(cfg: LlamaConfig, params, x, cos, sin, mask, dropout_key=None):
    """One block, functionally: (x_next, {q, k, v}) with q, k post-RoPE."""
    x, state = LlamaDecoderLayer(cfg).apply(
        {"params": params}, x, cos, sin, mask, None, None, dropout_key, mutable=["intermediates"]
    )
    inter = state["intermediates"]["self_attn"]
    return x, {r: inter[r][0] for r in ("q", "k", "v")}


def final_logits(cfg: LlamaConfig, params, x):
    """LlamaForCausalLM's head on the last block's output x: final norm, then float32 logits."""
    x = RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)).apply(
        {"params": params["model"]["norm"]}, x
    )
    kernel = params["model"]["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def _layer_slice(stack, i):
    """Layer i of a stacked parameter tree: a static slice for a Python int, else a dynamic one."""
    if isinstance(i, int):
        return jax.tree_util.tree_map(lambda a: a[i], stack)
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), stack)


_RECOMPUTED_VIEWS = frozenset({"dynamic_slice", "slice", "squeeze", "reshape", "convert_element_type"})


def _save_all_but_views(prim, *_, **__) -> bool:
    """A jax.checkpoint policy for remat "none" around a block that slices its layer's parameters
    out of the stacks: every residual is saved except slices, reshapes and casts, which the
    backward redoes from their inputs (no matmul), so no layer's parameters (nor their casts to the
    compute dtype) are copied into the residuals."""
    return prim.name not in _RECOMPUTED_VIEWS


_DENSE_LEAVES = frozenset({"kernel", "bias"})


def _compute_view(dtype, path, leaf):
    """What a stacked layer's differentiated leaf is computed with: a Dense projection's (`*_proj`)
    kernel or bias is cast to the compute dtype by Flax's Dense (promote_dtype), so its gradient is
    that cast's; anything else (LoRA factors, norms) is used as stored."""
    names = [getattr(k, "key", None) for k in path]
    if len(names) >= 2 and names[-1] in _DENSE_LEAVES and str(names[-2]).endswith("_proj"):
        return leaf.astype(dtype)
    return leaf


def paired_decoder(
    teacher_cfg: LlamaConfig,
    student_cfg: LlamaConfig,
    teacher_params,
    student_params,
    input_ids,
    *,
    layer_fn,
    layers=None,
    segment_ids=None,
    attention_mask=None,
    dropout_rng=None,
    return_hidden: bool = False,
    layer_fn_saves: tuple[str, ...] = (),
):
    """Teacher and student decoders run together, layer by layer: at layer l each block reads its own
    hidden state, and `layer_fn(teacher_qkv, student_qkv)` -> dict of scalars (e.g. that layer's
    relation KL) runs right there; its values are summed over `layers` (None = all; repeats count
    repeatedly), so the relation loss never waits for a whole forward.

    What runs where (both layouts; issue 22 part 3, tests/test_scan_cost.py):
      * the teacher block plainly: it is never differentiated, so nothing of it is recomputed; the
        backward keeps its q/k/v for the relation kernel: T·(H + 2·KV)·D values per layer (Llama-2-7B
        at T = 4096 in bf16: 96 MiB per layer, 3 GiB over 32 layers);
      * the student block under `jax.checkpoint` with the student's remat policy (as LlamaModel
        remats it), and `layer_fn` with it when `layer_fn_saves` names the checkpoint_name(s) under
        which layer_fn leaves what its backward needs from its forward (the relation kernel's row
        LSEs, losses.kernel_residual_names): the policy then also saves those, so the backward
        reruns the student block (its remat) but not layer_fn's forward, and the student's q/k/v
        are not kept. Without names `layer_fn` runs outside the checkpoint and the backward keeps the
        student's q/k/v as well (another 3 GiB on Llama-2-7B).
    Per added layer that is exactly what the loop layout's unfused step runs. (Until issue 22 the
    scanned form put the whole pair step under one jax.checkpoint with the student's policy: with
    remat "full" the backward reran the teacher's q/k/v projections and the relation forward, 6.4
    GFLOP/token more on Llama-2-7B at T = 4096, 9% of the step's matmuls, to keep only the two
    hidden states per layer.)

    Stacked parameters (scan_layers) run under one lax.scan over layers [0, top - 1) and the top
    selected layer after it, outside the loop, where XLA drops what the loss does not read (its
    attention, o_proj and MLP, forward and backward, as in the loop layout; 1.3 GFLOP/token on
    Llama-2-7B): a scan body cannot be pruned for its last iteration alone. The stacks are not
    scanned over (`xs`, whose slice [:top - 1] would copy every stack) but indexed inside the
    step, for the student inside its checkpoint, so its parameter slices are recomputed rather than
    saved per layer (with remat "none" the policy saves all but slices, reshapes and casts); the
    stacks' gradients accumulate in place (XLA updates the layer's slice of the accumulator). Left
    to the scan: layer 0's q/k/v input gradients (the loop layout drops them; 0.1 GFLOP/token on
    Llama-2-7B). With `scan_grads` "compute_dtype" (the default) the scan is lard_jax.layer_scan:
    each layer is sliced before its checkpoint, its weight gradients leave the backward scan in the
    compute dtype and are cast to the stacks' dtype after it (the same numbers; on Llama-2-7B at
    T = 4096 the compiled step falls from 50.11 to 46.99 GiB, below the loop's 48.28, deviceless
    H200 compile); "jax" keeps JAX's own scan transpose, whose float32 accumulator for the stacks is
    live beside every layer's residuals. Per-layer parameters run as a Python loop (XLA sees every layer; the FLOP
    accounting of lard_jax.flops holds unchanged). Layers above the highest selected one are
    skipped. LoRA-dropout keys are those LlamaModel derives from the same `dropout_rng`.

    Returns (sums, hidden) with hidden = (teacher x, student x) after the last run block when
    `return_hidden` (then every layer runs), else None."""
    n = student_cfg.num_hidden_layers
    counts = [0] * n
    for l in range(n) if layers is None else layers:
        counts[int(l) % n] += 1
    if not any(counts):
        raise ValueError("no layers selected")
    top = n if return_hidden else max(i for i, c in enumerate(counts) if c) + 1
    b, t = input_ids.shape
    embed = lambda cfg, p: TokenEmbed(  # noqa: E731
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
    ).apply({"params": p["model"]["embed_tokens"]}, input_ids)
    t_x, s_x = embed(teacher_cfg, teacher_params), embed(student_cfg, student_params)
    t_cos, t_sin, mask = rope_and_mask(teacher_cfg, b, t, None, segment_ids, attention_mask)
    s_cos, s_sin, _ = rope_and_mask(student_cfg, b, t, None, segment_ids, attention_mask)
    rope = {"t_cos": t_cos, "t_sin": t_sin, "s_cos": s_cos, "s_sin": s_sin, "mask": mask}
    keys = None if dropout_rng is None else layer_dropout_keys(dropout_rng, n)
    remat = student_cfg.remat != "none"

    def layer_vals(t_qkv, s_qkv, static_count, count):
        """layer_fn's values times the layer's weight: `static_count` (an int, known when tracing)
        or, when that is None, the traced `count` (lax.cond skips the loss where it is 0)."""
        if static_count is not None:
            vals = layer_fn(t_qkv, s_qkv) if static_count else None
            if vals is not None and static_count != 1:
                vals = {k: v * static_count for k, v in vals.items()}
            return vals
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(layer_fn, t_qkv, s_qkv))
        return jax.lax.cond(
            count > 0,
            lambda a, c: {k: v * c for k, v in layer_fn(*a).items()},
            lambda a, c: zeros,
            (t_qkv, s_qkv),
            count.astype(jnp.float32),
        )

    def add(acc, vals):
        if vals is None:
            return acc
        return vals if acc is None else jax.tree_util.tree_map(jnp.add, acc, vals)

    t_layers, s_layers = teacher_params["model"], student_params["model"]
    stacked = STACKED in s_layers
    saves = tuple(layer_fn_saves)
    if remat:
        policy = remat_policy(student_cfg) or jax.checkpoint_policies.nothing_saveable
    else:  # stacked: a checkpoint only to slice the parameters inside it (see the docstring)
        policy = _save_all_but_views if stacked else None
    if policy is not None and saves:
        policy = jax.checkpoint_policies.save_from_both_policies(
            policy, jax.checkpoint_policies.save_only_these_names(*saves)
        )

    def student_step(get, static_count, in_scan, ctx):
        """The student block of one layer (its parameters `get(s_in)`) and, when `saves` names
        layer_fn's residuals, layer_fn too: the part under the student's remat policy."""

        def f(s_in, s_x, key, t_qkv, count):
            s_x, s_qkv = _apply_layer(student_cfg, get(s_in), s_x, ctx["s_cos"], ctx["s_sin"], ctx["mask"], key)
            if saves:
                return s_x, None, layer_vals(t_qkv, s_qkv, static_count, count)
            return s_x, s_qkv, None

        # prevent_cse off only inside the scan's body; the loop's layers and the top layer after the
        # scan keep the barrier (see _remat_layer)
        return f if policy is None else jax.checkpoint(f, policy=policy, prevent_cse=not in_scan)

    def step(t_x, s_x, t_p, s_in, get, key, static_count, count, in_scan=False, ctx=None):
        ctx = rope if ctx is None else ctx
        # the teacher block is never differentiated
        t_x, t_qkv = _apply_layer(teacher_cfg, t_p, t_x, ctx["t_cos"], ctx["t_sin"], ctx["mask"])
        student = student_step(get, static_count, in_scan, ctx)
        s_x, s_qkv, vals = student(s_in, s_x, key, t_qkv if saves else None, count)
        if not saves:
            vals = layer_vals(t_qkv, s_qkv, static_count, count)
        return t_x, s_x, vals

    sums = None
    if stacked:
        t_stack, s_stack = t_layers[STACKED], s_layers[STACKED]

        def layer_step(t_x, s_x, i, static_count, count):
            if isinstance(i, int):
                key = None if keys is None else keys[i]
                get = functools.partial(_layer_slice, i=i)
                return step(t_x, s_x, _layer_slice(t_stack, i), s_stack, get, key, static_count, count)
            key = None if keys is None else jax.lax.dynamic_index_in_dim(keys, i, 0, keepdims=False)
            get = lambda s_in: _layer_slice(*s_in)  # noqa: E731
            return step(t_x, s_x, _layer_slice(t_stack, i), (s_stack, i), get, key, static_count, count, in_scan=True)

        n_scan = top if return_hidden else top - 1  # the top layer runs after the loop (only its q/k/v are live)
        if n_scan:
            static = 1 if all(c == 1 for c in counts[:n_scan]) else None
            probe = jax.eval_shape(lambda: layer_step(t_x, s_x, 0, 1, None)[2])
            acc0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), probe)
            counts_xs = jnp.asarray(counts[:n_scan], jnp.int32)
            if student_cfg.scan_grads == "compute_dtype":

                def pair_step(layer, ctx, t_x, diff, x):
                    (s_x, acc), (count, key) = diff, x
                    t_p, s_p = layer
                    t_x, s_x, vals = step(t_x, s_x, t_p, s_p, lambda p: p, key, static, count, True, ctx)
                    return t_x, (s_x, jax.tree_util.tree_map(jnp.add, acc, vals))

                key_xs = None if keys is None else keys[:n_scan]
                t_x, (s_x, sums) = layer_scan_lib.layer_scan(
                    pair_step,
                    (t_stack, s_stack),
                    rope,
                    t_x,
                    (s_x, acc0),
                    (counts_xs, key_xs),
                    length=n_scan,
                    view=lambda path, a: _compute_view(  # path[0]: 0 the teacher's stacks, 1 the student's
                        dtype_of((teacher_cfg, student_cfg)[path[0].idx].dtype), path, a
                    ),
                )
            else:

                def body(carry, xs):
                    (t_x, s_x, acc), (i, count) = carry, xs
                    t_x, s_x, vals = layer_step(t_x, s_x, i, static, count)
                    return (t_x, s_x, jax.tree_util.tree_map(jnp.add, acc, vals)), None

                xs = (jnp.arange(n_scan, dtype=jnp.int32), counts_xs)
                (t_x, s_x, sums), _ = jax.lax.scan(body, (t_x, s_x, acc0), xs)
        if n_scan < top:
            t_x, s_x, vals = layer_step(t_x, s_x, top - 1, counts[top - 1], None)
            sums = add(sums, vals)
    else:
        for i in range(top):
            key = None if keys is None else keys[i]
            name = f"layers_{i}"
            t_x, s_x, vals = step(t_x, s_x, t_layers[name], s_layers[name], lambda p: p, key, counts[i], None)
            sums = add(sums, vals)
    return sums, ((t_x, s_x) if return_hidden else None)
