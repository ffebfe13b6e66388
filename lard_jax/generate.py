"""Greedy decoding with a KV cache: one prefill, then one token per step from the cache.

`greedy_generate(model, params, prompts, max_new_tokens)` batches prompts of different lengths
(right padding: row b's prompt fills [0, P_b), its i-th new token goes at position P_b + i, so
every row keeps its own positions and cache write index), runs the prompt once through the model
(any `attention_impl`; only the last prompt position's logits are formed), then a `lax.scan` of
single-token steps against the cache. Shapes are static: the prompt width and the cache length are
rounded up to `bucket`, so one compile serves every batch in the same (batch, width, cache,
max_new_tokens) bucket. The cache is {"k", "v"} of [layers, batch, kv_heads, cache_len, head_dim]
in the compute dtype (GQA: kv_heads, not query heads). Generation runs max_new_tokens steps; with
`eos_id` each row's output is cut after its first eos.

RoPE whose frequencies depend on the length (transformers' `dynamic_rope_update`, 5.x): HF's
cached generate recomputes the frequencies from max(position_ids) + 1 of each forward and only
when that grows past what it has seen (dynamic) / past original_max_position_embeddings
(longrope), and keeps the keys already in the cache as they were rotated. So the prompt's keys are
rotated with the frequencies for the prompt length P, and the token fed at position P + i with
those for length P + i + 1. We do exactly that, per row, by passing per-row inverse frequencies
(`rope_inv_freq`) to the model at prefill and at every step: for a single prompt this is
token-for-token HF's `generate(do_sample=False)` (tests/test_generate.py). Two HF behaviours we do
not copy, on purpose: in a left-padded HF *batch* the length is the batch maximum, so a short row
gets the long row's frequencies (ours: each row its own, so batched == one by one); and HF's
dynamic module keeps its grown frequencies across generate calls unless a later prompt is shorter
than max_position_embeddings (ours: every call starts fresh, as a fresh HF model does). A full
recomputation without cache (`greedy_generate_recompute`) rotates every key with the current
length's frequencies instead, so for these two rope types it can differ from cached decoding once
the length passes the threshold -- in HF as here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax.model import LlamaConfig, LlamaForCausalLM, dtype_of

__all__ = [
    "greedy_generate",
    "greedy_generate_recompute",
    "linear_memory_model",
    "rope_inv_freq_for_lengths",
    "LENGTH_DEPENDENT_ROPE",
]

LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.lru_cache(maxsize=4096)
def _inv_freq(cfg: LlamaConfig, seq_len: int | None) -> np.ndarray:
    return cfg.rope_frequencies(seq_len=seq_len)[0]


def rope_inv_freq_for_lengths(cfg: LlamaConfig, lengths) -> np.ndarray:
    """float32 [..., head_dim // 2]: the inverse frequencies transformers uses for a forward whose
    max(position_ids) + 1 is each of `lengths` (constant unless the rope type is length dependent)."""
    lengths = np.asarray(lengths, np.int64)
    rope = (cfg.rope_scaling_dict or {}).get("rope_type")
    if rope not in LENGTH_DEPENDENT_ROPE:
        return np.broadcast_to(_inv_freq(cfg, None), lengths.shape + (cfg.head_dim // 2,)).astype(np.float32)
    flat = [_inv_freq(cfg, int(n)) for n in lengths.reshape(-1)]
    return (
        np.stack(flat).reshape(lengths.shape + (cfg.head_dim // 2,))
        if flat
        else np.zeros(lengths.shape + (cfg.head_dim // 2,), np.float32)
    )


def linear_memory_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same model (same params) with attention_impl "auto" instead of the dense "xla": cuDNN,
    Pallas or blockwise attention, none of which forms a [T, T] matrix. Used for evaluation at
    length (long prefills, perplexity by one forward); other implementations are kept."""
    if model.config.attention_impl != "xla":
        return model
    return LlamaForCausalLM(model.config.replace(attention_impl="auto"))


def _decoding_config(cfg: LlamaConfig) -> LlamaConfig:
    return cfg.replace(remat="none") if cfg.remat != "none" else cfg


@functools.lru_cache(maxsize=64)
def _compiled_generate(cfg: LlamaConfig, batch: int, width: int, cache_len: int, new_tokens: int):
    model = LlamaForCausalLM(cfg)
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cache_len, cfg.head_dim)

    def run(params, tokens, lengths, freq_prefill, freq_decode):
        cache = {"k": jnp.zeros(shape, dtype_of(cfg.dtype)), "v": jnp.zeros(shape, dtype_of(cfg.dtype))}
        logits, cache = model.apply(
            {"params": params}, tokens, cache=cache, rope_inv_freq=freq_prefill, logits_at=(lengths - 1)[:, None]
        )
        first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

        def step(carry, freq):
            token, cache, index = carry  # token goes to position `index` (= valid cache entries)
            logits, cache = model.apply(
                {"params": params},
                token[:, None],
                positions=index[:, None],
                cache=cache,
                cache_index=index,
                rope_inv_freq=freq,
            )
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (nxt, cache, index + 1), nxt

        _, rest = jax.lax.scan(step, (first, cache, lengths), freq_decode)
        return jnp.concatenate([first[None], rest], axis=0).T  # [B, new_tokens]

    return jax.jit(run)


def greedy_generate(
    model: LlamaForCausalLM,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    batch_size: int = 8,
    bucket: int = 64,
) -> list[list[int]]:
    """Greedy continuation of every prompt: a list of max_new_tokens new ids per prompt (cut after
    the first `eos_id` if given). Prompts run `batch_size` at a time (a short last batch is padded
    with copies so the compiled shape repeats)."""
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    cfg = _decoding_config(model.config)
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        rows = len(chunk) if len(prompts) <= batch_size else batch_size
        chunk_rows = chunk + [chunk[0]] * (rows - len(chunk))
        lengths = np.array([len(p) for p in chunk_rows], np.int32)
        width = _round_up(int(lengths.max()), bucket)
        cache_len = _round_up(int(lengths.max()) + max_new_tokens, bucket)
        tokens = np.zeros((rows, width), np.int32)
        for r, p in enumerate(chunk_rows):
            tokens[r, : len(p)] = p
        freq_prefill = rope_inv_freq_for_lengths(cfg, lengths)
        # the token fed at step i sits at position P + i: HF's length for that forward is P + i + 1
        steps = lengths[None, :] + np.arange(max_new_tokens - 1)[:, None] + 1
        freq_decode = rope_inv_freq_for_lengths(cfg, steps)
        fn = _compiled_generate(cfg, rows, width, cache_len, max_new_tokens)
        new = np.asarray(
            fn(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(freq_prefill), jnp.asarray(freq_decode))
        )
        for r in range(len(chunk)):
            ids = new[r].tolist()
            if eos_id is not None and eos_id in ids:
                ids = ids[: ids.index(eos_id) + 1]
            out.append(ids)
    return out


@functools.lru_cache(maxsize=64)
def _compiled_next_token(cfg: LlamaConfig):
    model = LlamaForCausalLM(cfg)

    @jax.jit
    def next_token(params, ids, pos, freq):
        logits = model.apply({"params": params}, ids, rope_inv_freq=freq, logits_at=jnp.reshape(pos - 1, (1, 1)))
        return jnp.argmax(logits[0, 0])

    return next_token


def greedy_generate_recompute(
    model: LlamaForCausalLM, params, prompt: Sequence[int], max_new_tokens: int, *, bucket: int = 64
) -> list[int]:
    """Reference greedy decoding without a cache: every step runs the whole sequence again (one
    compile per length bucket), with the frequencies of the current length (HF's use_cache=False)."""
    cfg = _decoding_config(model.config)
    next_token = _compiled_next_token(cfg)
    total = len(prompt) + max_new_tokens
    buf = np.zeros((1, _round_up(total, bucket)), np.int32)
    buf[0, : len(prompt)] = prompt
    out = []
    for i in range(max_new_tokens):
        pos = len(prompt) + i
        freq = rope_inv_freq_for_lengths(cfg, [pos])
        tok = int(next_token(params, jnp.asarray(buf), jnp.int32(pos), jnp.asarray(freq)))
        out.append(tok)
        buf[0, pos] = tok
    return out
