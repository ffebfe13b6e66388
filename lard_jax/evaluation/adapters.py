"""What evaluation tasks need from a model and the held-out text: jitted closures over one model
(logits, greedy generation with a KV cache, relation inputs) and held-out cloze items.

Shared by lard_jax.evaluation.tasks (the tasks) and runner (which runs them side by side); both
import from here, so neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax.evaluation import multiple_choice
from lard_jax.model import LlamaForCausalLM, relation_inputs

# RoPE types whose frequencies depend on the (static) sequence length: padding a batch would
# change the model, so their inputs are never padded to a bucket.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _bucket(model: LlamaForCausalLM, length: int, multiple: int = 64) -> int:
    rope = model.config.rope_scaling_dict or {}
    if rope.get("rope_type") in _LENGTH_DEPENDENT_ROPE:
        return length
    return -(-length // multiple) * multiple


def logits_fn_for(model: LlamaForCausalLM, params) -> Callable[[np.ndarray], np.ndarray]:
    """input_ids [B, T] -> float32 logits [B, T, V] (right-padded to a bucket, causal so harmless)."""
    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids))

    def fn(input_ids):
        input_ids = np.asarray(input_ids, np.int32)
        t = input_ids.shape[1]
        width = _bucket(model, t)
        padded = np.zeros((input_ids.shape[0], width), np.int32)
        padded[:, :t] = input_ids
        return np.asarray(apply(params, padded))[:, :t]

    fn.max_length = model.config.max_position_embeddings  # harness-style scoring truncates to it
    return fn


def generate_fn_for(model: LlamaForCausalLM, params) -> Callable[[list[int], int], list[int]]:
    """Greedy decoding with a KV cache (lard_jax.generate.greedy_generate): one prefill, then one
    cached step per new token; one compile per (prompt, cache) length bucket. Token for token the
    same as transformers' generate(do_sample=False) (tests/test_generate.py)."""
    from lard_jax.generate import greedy_generate, linear_memory_model

    model = linear_memory_model(model)  # long prompts: no [T, T] attention matrix in the prefill

    def fn(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return greedy_generate(model, params, [prompt_ids], max_new_tokens)[0]

    return fn


def qkv_fn_for(model: LlamaForCausalLM, params):
    fn = jax.jit(lambda p, ids: relation_inputs(model, p, ids)[1])
    return lambda ids: fn(params, jnp.asarray(ids, jnp.int32))


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
