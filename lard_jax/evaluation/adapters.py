"""What evaluation tasks need from a model and the held-out text: functions over one model
(logits, per-token log-probs, greedy generation with a KV cache, relation inputs) and held-out
cloze items.

The functions run programs compiled once and shared between models: each is jitted with the
parameters and the RoPE inverse frequencies as arguments (never constants in the executable),
cached per `lard_jax.generate.program_config(model.config)` (the config with what does not change
the forward fixed), and fed a few fixed shapes (`bucket_length`'s ladder of widths; rows per call
a power of two up to `MAX_TOKENS_PER_CALL` tokens). So the teacher, the RoPE-scaled student and the
restored student of one architecture evaluate with the same executables, and a task compiles
once per length bucket. `lard_jax.compile_cache.enable_compilation_cache(workdir)` keeps them for
the next process.

Shared by lard_jax.evaluation.tasks (the tasks) and runner (which runs them side by side); both
import from here, so neither imports the other's internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax.evaluation import multiple_choice
from lard_jax.generate import bucket_length, program_config, rope_inv_freq_for_lengths
from lard_jax.model import LlamaConfig, LlamaForCausalLM, relation_inputs

# Rows of one forward: at most this many tokens (a power of two of rows, at least one), so the
# [rows, width, vocab] float32 logits stay a few GB at any width.
MAX_TOKENS_PER_CALL = 16384


def _bucket(model: LlamaForCausalLM, length: int, multiple: int | None = None) -> int:
    """The padded width of `length` tokens (the RoPE frequencies are computed for the unpadded
    length and passed in, so padding is exact for every rope type, length-dependent ones too)."""
    del model
    return bucket_length(length, multiple)


def rows_per_call(width: int) -> int:
    cap = max(1, MAX_TOKENS_PER_CALL // max(int(width), 1))
    return 1 << (cap.bit_length() - 1)


@functools.lru_cache(maxsize=32)
def _forward_programs(cfg: LlamaConfig):
    """(logits, token_scores) jitted for one program config; params and frequencies are arguments."""
    model = LlamaForCausalLM(cfg)

    def logits(params, input_ids, freq):
        return model.apply({"params": params}, input_ids, rope_inv_freq=freq)

    def token_scores(params, input_ids, targets, freq):
        # log softmax at the targets only, in float32 on the device: no [B, T, V] array to the host
        out = logits(params, input_ids, freq).astype(jnp.float32)
        picked = jnp.take_along_axis(out, targets[..., None], axis=-1)[..., 0]
        log_probs = picked - jax.nn.logsumexp(out, axis=-1)
        return log_probs, jnp.argmax(out, axis=-1) == targets

    return jax.jit(logits), jax.jit(token_scores)


@functools.lru_cache(maxsize=32)
def _qkv_program(cfg: LlamaConfig):
    model = LlamaForCausalLM(cfg)
    return jax.jit(lambda params, ids, freq: relation_inputs(model, params, ids, rope_inv_freq=freq)[1])


def _in_buckets(cfg: LlamaConfig, input_ids: np.ndarray, extra: Sequence[np.ndarray], run: Callable):
    """Run `run(ids, *extra, freq)` over `input_ids` [B, T] (and same-shaped `extra` arrays) right-
    padded to the bucket width and split into calls of a power of two of rows (padding rows are
    zeros, dropped); returns each output's numpy rows [B, T, ...] (the padding cut off)."""
    b, t = input_ids.shape
    width = bucket_length(t)
    rows = min(rows_per_call(width), 1 << max(b - 1, 0).bit_length())
    # frequencies for the unpadded length: what the model computes from a [B, T] input
    freq = rope_inv_freq_for_lengths(cfg, np.full(rows, t))
    outputs: list[list[np.ndarray]] | None = None
    for first in range(0, b, rows):
        arrays = []
        for a in (input_ids, *extra):
            padded = np.zeros((rows, width), a.dtype)
            part = a[first : first + rows]
            padded[: part.shape[0], :t] = part
            arrays.append(padded)
        out = run(*arrays, freq)
        out = out if isinstance(out, tuple) else (out,)
        n = min(rows, b - first)
        got = [np.asarray(o)[:n, :t] for o in out]
        outputs = [[g] for g in got] if outputs is None else [acc + [g] for acc, g in zip(outputs, got)]
    return [np.concatenate(o, axis=0) for o in outputs]


def logits_fn_for(model: LlamaForCausalLM, params) -> Callable[[np.ndarray], np.ndarray]:
    """input_ids [B, T] -> float32 logits [B, T, V] (right-padded to a bucket, causal so harmless).

    The function also carries `token_scores(input_ids, targets) -> (log_probs float32 [B, T],
    greedy bool [B, T])`: log softmax(logits)[t, targets[t]] and argmax == target, computed on the
    device (perplexity and multiple choice use it: only [B, T] numbers come back), and
    `max_length`, the model's max_position_embeddings (harness-style scoring truncates to it)."""
    cfg = model.config
    forward, scores = _forward_programs(program_config(cfg))

    def fn(input_ids):
        input_ids = np.asarray(input_ids, np.int32)
        return _in_buckets(cfg, input_ids, (), lambda ids, freq: forward(params, ids, freq))[0]

    def token_scores(input_ids, targets):
        input_ids = np.asarray(input_ids, np.int32)
        targets = np.asarray(targets, np.int32)
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets {targets.shape} must have the shape of input_ids {input_ids.shape}")
        log_probs, greedy = _in_buckets(
            cfg, input_ids, (targets,), lambda ids, tgt, freq: scores(params, ids, tgt, freq)
        )
        return log_probs, greedy

    fn.max_length = cfg.max_position_embeddings
    fn.token_scores = token_scores
    return fn


def generate_fn_for(
    model: LlamaForCausalLM, params, *, batch_size: int = 8, eos_id: int | Sequence[int] | None = None
) -> Callable[[list[int], int], list[int]]:
    """Greedy decoding with a KV cache (lard_jax.generate.greedy_generate): one prefill, then one
    cached step per new token; programs compiled once per length bucket and shared between models
    of one program config. Token for token the same as transformers' generate(do_sample=False)
    (tests/test_generate.py). `fn(prompt_ids, max_new_tokens)` decodes one prompt;
    `fn.batch(prompts, max_new_tokens)` decodes many, `batch_size` rows at a time (each row as it
    would alone: its own positions and cache).

    `eos_id` (the tokenizer's, or None): each output is cut after its first eos and a batch stops
    decoding once every row has one (the same compiled loop for any eos). None (the default)
    decodes all max_new_tokens. The synthetic tasks score the decoded text of everything generated
    (special tokens skipped), so text a model writes after its eos counts there without `eos_id`
    and not with it: scores can differ (EvalSpec.stop_at_eos chooses)."""
    from lard_jax.generate import greedy_generate, linear_memory_model

    model = linear_memory_model(model)  # long prompts: no [T, T] attention matrix in the prefill

    def fn(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return greedy_generate(model, params, [prompt_ids], max_new_tokens, eos_id=eos_id)[0]

    def batch(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_generate(model, params, prompts, max_new_tokens, eos_id=eos_id, batch_size=batch_size)

    fn.batch = batch
    fn.eos_id = eos_id
    return fn


def qkv_fn_for(model: LlamaForCausalLM, params):
    """input_ids [B, T] -> per layer {q, k, v} (q, k after RoPE); one program per program config."""
    cfg = model.config
    fn = _qkv_program(program_config(cfg))

    def qkv(ids):
        ids = np.asarray(ids, np.int32)
        return fn(params, ids, rope_inv_freq_for_lengths(cfg, np.full(ids.shape[0], ids.shape[1])))

    return qkv


def cloze_examples(
    token_docs: Sequence[Sequence[int]],
    tokenizer,
    *,
    context_len: int,
    cont_len: int,
    n: int,
    choices: int = 4,
    seed: int = 0,
) -> list[multiple_choice.Example]:
    """Held-out multiple choice: a context from a document, its true continuation and
    `choices - 1` continuations taken from other documents (chance = 1 / choices)."""
    rng = np.random.default_rng(seed)
    docs = [np.asarray(d) for d in token_docs if len(d) >= context_len + cont_len]
    if len(docs) < choices:
        raise ValueError(
            f"cloze: need {choices} held-out documents of >= {context_len + cont_len} tokens, found {len(docs)}"
        )
    examples = []
    for _ in range(n):
        picks = rng.choice(len(docs), choices, replace=False)
        spans = []
        for d in picks:
            start = int(rng.integers(0, len(docs[d]) - context_len - cont_len + 1))
            spans.append(
                (docs[d][start : start + context_len], docs[d][start + context_len : start + context_len + cont_len])
            )
        context = tokenizer.decode(spans[0][0].tolist())
        conts = [tokenizer.decode(c.tolist()) for _, c in spans]
        order = rng.permutation(choices)
        requests = [(context, conts[k]) for k in order]
        examples.append(
            multiple_choice.Example(
                requests=requests,
                gold=int(np.where(order == 0)[0][0]),
                norm_lengths=[max(len(conts[k]), 1) for k in order],
            )
        )
    return examples
