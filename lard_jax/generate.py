"""Greedy decoding with a KV cache: one prefill, then one token per step from the cache.

`greedy_generate(model, params, prompts, max_new_tokens)` batches prompts of different lengths
(right padding: row b's prompt fills [0, P_b), its i-th new token goes at position P_b + i, so
every row keeps its own positions and cache write index), runs the prompt once through the model
(any `attention_impl`; only the last prompt position's logits are formed), then a loop of
single-token steps against the cache. Shapes are static and few: the prompt width and the cache
length are rounded up to a fixed ladder of lengths (`bucket_length`: powers of two and 1.5 x
powers of two), the decode loop's trip count is an argument (one compiled loop serves every
max_new_tokens up to its output cap), and parameters and RoPE frequencies are arguments of programs
cached per `program_config` -- so the prefill compiles once per (batch, width, cache) bucket and the
decode loop once per (batch, cache) bucket, shared by every model with an equal program config
(teacher, RoPE-scaled and restored students of one architecture). The cache is {"k", "v"} of
[layers, batch, kv_heads, cache_len, head_dim] in the compute dtype (GQA: kv_heads, not query
heads). The decode loop is a `while_loop` that runs until max_new_tokens tokens or until every
row of the batch has produced a stop token (`eos_id`: one id or several, an int32 argument padded
with -1, so one compiled loop serves every eos); each row's output is cut after its first stop
token, so the result is the full-length decode's cut there (a row that stopped keeps decoding,
ignored, while others run). Without `eos_id` every row gets max_new_tokens tokens.

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
    "bucket_length",
    "program_config",
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


# ------------------------------------------------------------------------------ compiled programs
# Evaluation compiles few programs and reuses them across models: parameters and RoPE frequencies
# are arguments (never constants baked into the executable), programs are cached per
# `program_config(config)` and the sequence lengths are rounded up to a fixed ladder of buckets.

MIN_BUCKET = 64


def bucket_length(n: int, multiple: int | None = None, *, minimum: int = MIN_BUCKET) -> int:
    """The padded width for `n` tokens. `multiple` None: the fixed ladder minimum * {1, 1.5, 2, 3,
    4, 6, ...} (powers of two and 1.5 x powers of two: 64, 96, 128, 192, ..., 8192, 12288, 16384,
    ...): every length maps to one of few shapes (at most 2 per octave), at most 50% of padding,
    and a power of two (the usual evaluation lengths) is its own bucket. An int: round up to a
    multiple of it (the older behaviour)."""
    n = int(n)
    if multiple is not None:
        return _round_up(max(n, 1), int(multiple))
    size = int(minimum)
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def program_config(cfg: LlamaConfig) -> LlamaConfig:
    """The key of the compiled evaluation programs of a model: its config with everything that
    does not change an inference forward whose RoPE inverse frequencies come in as an argument set
    to fixed values. Remat and LoRA dropout are training-only; with the frequencies passed in
    (`rope_inv_freq`), the rope type, theta and max_position_embeddings enter the forward only
    through the attention scaling (yarn's / longrope's temperature, independent of the length),
    so every rope whose scaling is 1 (default, linear, dynamic, llama3) maps to the same program:
    teacher, scaled and restored student share executables. A config with scaling != 1 keeps its
    rope fields (its own programs). Hashable (a frozen dataclass), equal only when the programs are."""
    cfg = cfg.replace(remat="none", lora_dropout=0.0)
    _, scaling = cfg.rope_frequencies(seq_len=None)
    if scaling == 1.0:
        cfg = cfg.replace(rope_scaling=None, rope_theta=10000.0, max_position_embeddings=4096)
    return cfg


# Stop ids are padded with -1 (never an argmax) to a fixed count, so eos / no eos / a few eos ids
# all run the same compiled decode loop.
MIN_STOP_IDS = 4


def _stop_ids(eos_id: int | Sequence[int] | None) -> np.ndarray:
    """int32 [S]: the stop ids padded with -1 to S = max(MIN_STOP_IDS, next power of two)."""
    ids = [] if eos_id is None else [int(eos_id)] if np.ndim(eos_id) == 0 else [int(e) for e in eos_id]
    if any(e < 0 for e in ids):
        raise ValueError(f"greedy_generate: eos ids must be >= 0, got {ids}")
    out = np.full(max(MIN_STOP_IDS, _pow2_at_least(len(ids))), -1, np.int32)
    out[: len(ids)] = ids
    return out


@functools.lru_cache(maxsize=32)
def _decoding_programs(cfg: LlamaConfig):
    """(prefill, decode), jitted once per program config; jax compiles each per argument shape:
    prefill per (batch, prompt width, cache length), decode per (batch, cache length, output cap)
    (and stop-id count, MIN_STOP_IDS unless more ids are given). The decode loop's trip count and
    stop ids are traced arguments; it returns (tokens [B, cap], tokens produced: a scalar, at most
    `steps`; fewer when every row stopped early)."""
    model = LlamaForCausalLM(cfg)

    def prefill(params, tokens, lengths, freq, *, cache_len: int):
        shape = (cfg.num_hidden_layers, tokens.shape[0], cfg.num_key_value_heads, cache_len, cfg.head_dim)
        cache = {"k": jnp.zeros(shape, dtype_of(cfg.dtype)), "v": jnp.zeros(shape, dtype_of(cfg.dtype))}
        logits, cache = model.apply(
            {"params": params}, tokens, cache=cache, rope_inv_freq=freq, logits_at=(lengths - 1)[:, None]
        )
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    def decode(params, first, cache, lengths, freq_decode, steps, stop_ids):
        # freq_decode [cap - 1, B, D/2]: row i - 1 for the token fed at step i; `steps` (traced):
        # the tokens wanted, so one program serves every max_new_tokens up to cap; stop_ids [S]
        # (traced, -1 = none): the loop ends once every row has produced one of them. Entries of
        # `out` past the last step stay 0; a row's entries after its first stop id are decoded on
        # (while other rows run) and ignored by the caller.
        out = jnp.zeros((freq_decode.shape[0] + 1, first.shape[0]), jnp.int32).at[0].set(first)

        def stopped(token):
            return jnp.any(token[:, None] == stop_ids[None, :], axis=-1)

        def running(carry):
            i, _, _, _, done = carry
            return (i < steps) & ~jnp.all(done)

        def step(carry):
            i, token, cache, out, done = carry
            index = lengths + i - 1  # the token fed goes to position P + i - 1 (= valid cache entries)
            logits, cache = model.apply(
                {"params": params},
                token[:, None],
                positions=index[:, None],
                cache=cache,
                cache_index=index,
                rope_inv_freq=freq_decode[i - 1],
            )
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return i + 1, nxt, cache, out.at[i].set(nxt), done | stopped(nxt)

        produced, _, _, out, _ = jax.lax.while_loop(
            running, step, (jnp.asarray(1, jnp.int32), first, cache, out, stopped(first))
        )
        return out.T, produced  # [B, cap], tokens produced (the prefill's included)

    donate = () if jax.default_backend() == "cpu" else (2,)  # the cache is updated in place
    return jax.jit(prefill, static_argnames=("cache_len",)), jax.jit(decode, donate_argnums=donate)


def greedy_generate(
    model: LlamaForCausalLM,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | Sequence[int] | None = None,
    batch_size: int = 8,
    bucket: int | None = None,
) -> list[list[int]]:
    """Greedy continuation of every prompt: a list of max_new_tokens new ids per prompt, cut after
    the first `eos_id` if given (an int, or several ids: cut after the first of any). Prompts run
    `batch_size` at a time (a short last batch is padded with copies so the compiled shape repeats;
    a single short batch to a power of two); a batch's decode loop stops as soon as every row has
    produced an eos (the output is the same as decoding all max_new_tokens and cutting).

    Shapes: the prompt width and the cache length are `bucket_length(..., bucket)` (the fixed
    ladder by default, or multiples of an int `bucket`); the prefill compiles once per (rows,
    width, cache) and the decode loop once per (rows, cache, output cap = max(128, next power of
    two of max_new_tokens)), for any model whose `program_config` is equal (parameters, RoPE
    frequencies, the step count and the eos ids are arguments)."""
    return _greedy_generate(
        model, params, prompts, max_new_tokens, eos_id=eos_id, batch_size=batch_size, bucket=bucket
    )[0]


def _greedy_generate(
    model: LlamaForCausalLM,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | Sequence[int] | None = None,
    batch_size: int = 8,
    bucket: int | None = None,
) -> tuple[list[list[int]], list[int]]:
    """greedy_generate's (outputs, tokens produced by each batch's decode: max_new_tokens unless
    every row of the batch stopped earlier)."""
    if max_new_tokens < 1:
        return [[] for _ in prompts], []
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    stop_ids = _stop_ids(eos_id)
    stop_set = {int(e) for e in stop_ids if e >= 0}
    cfg = _decoding_config(model.config)
    prefill, decode = _decoding_programs(program_config(cfg))
    cap = max(128, _pow2_at_least(max_new_tokens))
    out: list[list[int]] = []
    produced: list[int] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        rows = batch_size if len(prompts) > batch_size else min(batch_size, _pow2_at_least(len(chunk)))
        chunk_rows = chunk + [chunk[0]] * (rows - len(chunk))
        lengths = np.array([len(p) for p in chunk_rows], np.int32)
        width = bucket_length(int(lengths.max()), bucket)
        cache_len = bucket_length(int(lengths.max()) + max_new_tokens, bucket)
        tokens = np.zeros((rows, width), np.int32)
        for r, p in enumerate(chunk_rows):
            tokens[r, : len(p)] = p
        freq_prefill = rope_inv_freq_for_lengths(cfg, lengths)
        # the token fed at step i sits at position P + i: HF's length for that forward is P + i + 1
        steps = lengths[None, :] + np.arange(cap - 1)[:, None] + 1
        freq_decode = rope_inv_freq_for_lengths(cfg, np.minimum(steps, lengths[None, :] + max_new_tokens))
        token, cache = prefill(params, tokens, lengths, freq_prefill, cache_len=cache_len)
        new, count = decode(params, token, cache, lengths, freq_decode, np.int32(max_new_tokens), stop_ids)
        new, count = np.asarray(new), int(count)
        produced.append(count)
        for r in range(len(chunk)):
            ids = new[r, :max_new_tokens].tolist()
            cut = next((k for k, t in enumerate(ids) if t in stop_set), None)
            if cut is not None:
                ids = ids[: cut + 1]
            # every row either stopped within the tokens produced or the loop ran all of them
            assert cut is not None and cut < count or count == max_new_tokens, (cut, count)
            out.append(ids)
    return out, produced


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
