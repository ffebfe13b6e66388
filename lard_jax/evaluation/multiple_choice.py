"""Short-text benchmarks scored the way lm-evaluation-harness scores them, from local JSONL files.

Each example becomes (context, continuation) requests; a request's score is the summed
log-likelihood of the continuation tokens given the context. The conventions are the harness's
(lm-eval 0.4.13: lm_eval/models/huggingface.py and the task YAMLs), because reported numbers
depend on them:

- context and continuation are tokenised as in `_encode_pair`: trailing spaces of the context
  move to the continuation, the pair is encoded as one string, and the continuation tokens are
  what follows the context's own encoding. Special tokens as the tokenizer adds them by default
  (lm-eval >= 0.4.9's `add_bos_token=None`: a bos for LLaMA-style and the byte tokenizer, none for
  Qwen2-style), none when the text already starts with the bos text; `add_bos="always"|"never"`
  overrides. An empty context is replaced by the bos (else eos) token.
- (context + continuation) is left-truncated to the model's maximum length (`max_length`; by
  default what `logits_fn.max_length` says), keeping the whole continuation, as the harness does.
- `acc`: argmax of the summed log-likelihoods; `acc_norm`: argmax of log-likelihood divided by
  the character length of the choice text (without the leading space delimiter).
- LAMBADA (lambada_openai): context = text up to the last space, continuation = " " + last word;
  `acc` = every continuation token is the greedy prediction; `ppl` = exp(-mean over examples of
  the continuation log-likelihood).
- HellaSwag: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
  (falls back to `ctx` when ctx_a/ctx_b are absent), choices = preprocess(ending).
- PIQA: "Question: {goal}\\nAnswer:" with choices sol1, sol2.
- ARC: "Question: {question}\\nAnswer:" with choices.text; gold = choices.label.index(answerKey)
  (the AI2 layout with question.stem / question.choices is read too).
- WinoGrande (partial scoring): one context per option, sentence[:blank] + option; the shared
  continuation is " " + the sentence after the blank. Only `acc` is reported, as in the harness.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lard_jax.data import jsonl_records
from lard_jax.evaluation.perplexity import LogitsFn, token_log_probs

__all__ = [
    "Example",
    "TASK_READERS",
    "BOS_MODES",
    "read_task",
    "encode",
    "encode_requests",
    "rolling_requests",
    "score_token_requests",
    "scorer_from_logits",
    "loglikelihoods",
    "score_examples",
    "score_task",
]


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: a (context, continuation) request per choice and the index of the right one."""

    requests: list[tuple[str, str]]
    gold: int
    norm_lengths: list[int]  # characters of each choice text, the harness's acc_norm divisor


# ----------------------------------------------------------------------------- task formats


def _field(record: dict, name: str, where: str, kind: type | tuple = str) -> Any:
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (fields: {', '.join(sorted(record))})")
    value = record[name]
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field {name!r} has type {type(value).__name__}")
    return value


def _label_index(value: Any, num_choices: int, where: str, *, base: int = 0) -> int:
    try:
        index = int(value) - base
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {value!r} is not an integer") from None
    if not 0 <= index < num_choices:
        raise ValueError(f"{where}: label {value!r} is out of range for {num_choices} choices")
    return index


def _multiple_choice(context: str, choices: Sequence[str], gold: int) -> Example:
    return Example(
        requests=[(context, " " + choice) for choice in choices],  # harness target_delimiter " "
        gold=gold,
        norm_lengths=[len(choice) for choice in choices],
    )


def _hellaswag_preprocess(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py: brackets are WikiHow artifacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(record: dict, where: str) -> Example:
    if "ctx_a" in record and "ctx_b" in record:
        ctx = _field(record, "ctx_a", where) + " " + _field(record, "ctx_b", where).capitalize()
    else:
        ctx = _field(record, "ctx", where)
    label = record.get("activity_label")
    query = _hellaswag_preprocess(f"{label}: {ctx}" if isinstance(label, str) and label else ctx)
    endings = _field(record, "endings", where, list)
    if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: 'endings' must be a list of at least two strings")
    gold = _label_index(_field(record, "label", where, (int, str)), len(endings), where)
    return _multiple_choice(query, [_hellaswag_preprocess(e) for e in endings], gold)


def _piqa(record: dict, where: str) -> Example:
    context = f"Question: {_field(record, 'goal', where)}\nAnswer:"
    choices = [_field(record, "sol1", where), _field(record, "sol2", where)]
    return _multiple_choice(context, choices, _label_index(_field(record, "label", where, (int, str)), 2, where))


def _arc(record: dict, where: str) -> Example:
    question = _field(record, "question", where, (str, dict))
    if isinstance(question, dict):  # AI2's original layout
        texts = [c.get("text") for c in _field(question, "choices", where, list)]
        labels = [c.get("label") for c in question["choices"]]
        question = _field(question, "stem", where)
    else:
        choices = _field(record, "choices", where, dict)
        texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        raise ValueError(f"{where}: 'choices' must hold matching 'text' and 'label' lists")
    answer = _field(record, "answerKey", where)
    if answer not in labels:
        raise ValueError(f"{where}: answerKey {answer!r} is not one of the labels {labels}")
    return _multiple_choice(f"Question: {question}\nAnswer:", texts, labels.index(answer))


def _winogrande(record: dict, where: str) -> Example:
    sentence = _field(record, "sentence", where)
    if "_" not in sentence:
        raise ValueError(f"{where}: sentence has no '_' blank")
    blank = sentence.index("_")
    options = [_field(record, "option1", where), _field(record, "option2", where)]
    gold = _label_index(_field(record, "answer", where, (int, str)), 2, where, base=1)
    continuation = " " + sentence[blank + 1 :].strip()
    return Example(
        requests=[(sentence[:blank] + option, continuation) for option in options],
        gold=gold,
        norm_lengths=[len(continuation)] * 2,
    )


def _lambada(record: dict, where: str) -> Example:
    text = _field(record, "text", where)
    if " " not in text.strip():
        raise ValueError(f"{where}: 'text' needs at least two words")
    context, last_word = text.rsplit(" ", 1)
    return Example(requests=[(context, " " + last_word)], gold=0, norm_lengths=[len(last_word)])


TASK_READERS: dict[str, Callable[[dict, str], Example]] = {
    "lambada": _lambada,
    "lambada_openai": _lambada,
    "lambada_standard": _lambada,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "winogrande": _winogrande,
}


def read_task(task_name: str, path: str | os.PathLike, *, limit: int | None = None) -> list[Example]:
    """Parses a task's JSONL file; any malformed line raises ValueError naming file and line."""
    if task_name not in TASK_READERS:
        raise ValueError(f"unknown task {task_name!r}; known: {', '.join(sorted(TASK_READERS))}")
    reader = TASK_READERS[task_name]
    path = os.fspath(path)
    examples = []
    for line_number, record in _jsonl_records(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(reader(record, f"{path}:{line_number}"))
    if not examples:
        raise ValueError(f"{path}: empty file (no {task_name} examples)")
    return examples


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path!r}")
    return jsonl_records(path)


# ----------------------------------------------------------------------------- tokenisation

BOS_MODES = ("tokenizer", "always", "never")


def bos_mode(add_bos: str | bool | None) -> str:
    """ "tokenizer" | "always" | "never" from a mode name or the older bool (True/False)."""
    if add_bos is None:
        return "tokenizer"
    if isinstance(add_bos, bool):
        return "always" if add_bos else "never"
    if add_bos not in BOS_MODES:
        raise ValueError(f"add_bos must be one of {BOS_MODES} (or a bool), got {add_bos!r}")
    return add_bos


def _bos_text(tokenizer: Any) -> str | None:
    """The bos token as text (what the harness compares a string's start with), if known."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return getattr(hf, "bos_token", None)
    names, bos = getattr(tokenizer, "special_tokens", None), getattr(tokenizer, "bos_id", None)
    if names is not None and bos is not None and bos < len(names):
        return names[bos]
    return None


def encode(tokenizer: Any, text: str, add_bos: str | bool | None = "tokenizer") -> list[int]:
    """Token ids of `text` under a bos convention.

    "tokenizer": special tokens exactly as the tokenizer adds them by default (for a Hugging Face
    tokenizer `add_special_tokens=True`: a bos for LLaMA-style tokenizers, nothing for Qwen2/GPT-2
    style ones; the byte tokenizer adds its bos, like its saved Hugging Face form), except when the
    text already starts with the bos token's text; this is lm-evaluation-harness >= 0.4.9's default
    (`add_bos_token=None`). "always": one bos in front (again not when the text starts with the
    bos text, as the harness's `add_bos_token=True`). "never": no special tokens.
    """
    mode = bos_mode(add_bos)
    bos_text = _bos_text(tokenizer)
    specials = not (bos_text and text.startswith(bos_text))  # the harness's has_bos_prefix rule
    if mode != "tokenizer":
        return list(tokenizer.encode(text, add_bos=mode == "always" and specials))
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return list(hf.encode(text, add_special_tokens=specials, verbose=False))
    return list(tokenizer.encode(text, add_bos=specials and getattr(tokenizer, "bos_id", None) is not None))


def prefix_token_id(tokenizer: Any) -> int:
    """The token an empty context (and the first rolling window) conditions on: bos, else eos."""
    bos = getattr(tokenizer, "bos_id", None)
    prefix = bos if bos is not None else getattr(tokenizer, "eos_id", None)
    if prefix is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to condition an empty context on")
    return int(prefix)


def _encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos: str | bool | None = "tokenizer"
) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness `loglikelihood` + `_encode_pair` for a causal model."""
    if context == "":
        continuation_ids = list(tokenizer.encode(continuation, add_bos=False))
        prefix = prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation, add_bos)
    context_ids = encode(tokenizer, context, add_bos)
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return context_ids, continuation_ids


def encode_requests(
    tokenizer: Any, requests: Sequence[tuple[str, str]], add_bos: str | bool | None = "tokenizer"
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for each (context, continuation) string pair."""
    return [_encode_pair(tokenizer, context, continuation, add_bos) for context, continuation in requests]


def rolling_requests(token_ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The harness's `loglikelihood_rolling` windows (context length 1, disjoint) as token requests.

    Every token of `token_ids` is predicted exactly once: the first chunk of `max_length` tokens
    from `prefix_id` alone, each later chunk of up to `max_length` tokens after the
    `max_length + 1 - len(chunk)` tokens before it, so each model call reads `max_length` tokens.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    stream = [int(prefix_id)] + [int(t) for t in token_ids]  # stream[i] is predicted from stream[:i]
    out = []
    for first in range(1, len(stream), max_length):
        last = min(first + max_length, len(stream))
        out.append((stream[max(0, last - 1 - max_length) : first], stream[first:last]))
    return out


# ----------------------------------------------------------------------------- scoring

# (input_ids int32 [B, W], spans [(row, first, last, target ids)]) -> [(sum log-prob, greedy)] per span
BatchScorer = Callable[[np.ndarray, list[tuple[int, int, int, np.ndarray]]], list[tuple[float, bool]]]


def scorer_from_logits(logits_fn: LogitsFn) -> BatchScorer:
    """A BatchScorer over a `logits_fn`: log-probs in float64 on the host, scored positions only;
    with the function's `token_scores(input_ids, targets)` (lard_jax.evaluation.adapters'
    logits_fn_for) the log-probs and greedy matches are formed on the device (float32 log softmax)
    and only [B, W] numbers come back instead of [B, W, V] logits."""
    token_scores = getattr(logits_fn, "token_scores", None)

    def score_on_device(input_ids, spans):
        targets = np.zeros(np.shape(input_ids), np.int32)
        for row, first, last, span_targets in spans:
            targets[row, first:last] = span_targets
        log_probs, greedy = token_scores(input_ids, targets)
        return [
            (float(np.asarray(log_probs[row, first:last], np.float64).sum()), bool(np.all(greedy[row, first:last])))
            for row, first, last, _ in spans
        ]

    if token_scores is not None:
        return score_on_device

    def score(input_ids, spans):
        logits = logits_fn(input_ids)
        out = []
        for row, first, last, targets in spans:
            span_logits = np.asarray(logits[row, first:last])
            log_probs = token_log_probs(span_logits, targets)
            out.append((float(log_probs.sum()), bool(np.all(span_logits.argmax(-1) == targets))))
        return out

    return score


def round_up_bucket(multiple: int) -> Callable[[int], int]:
    return lambda width: -(-width // multiple) * multiple


def score_token_requests(
    scorer: BatchScorer,
    token_requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    bucket: Callable[[int], int] = round_up_bucket(32),
    pad_id: int = 0,
    pad_batch: bool = False,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, whether greedy decoding reproduces it) per (context, continuation) ids.

    As the harness: the model reads (context + continuation)[:-1], left-truncated to the last
    `max_length` tokens (None: no truncation); requests are taken longest first so similar lengths
    share a batch; rows are right-padded (harmless for a causal model) to `bucket(longest row)`, and
    with `pad_batch` every batch has `batch_size` rows, so a jitted model compiles once per bucket.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive or None, got {max_length}")
    rows = []
    for context, continuation in token_requests:
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs a non-empty context and continuation (in tokens)")
        if max_length is not None and len(continuation) > max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds the maximum length {max_length}")
        sequence = context + continuation
        if max_length is not None:
            sequence = sequence[-(max_length + 1) :]
        rows.append((sequence[:-1], np.asarray(continuation, np.int64)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for first in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        batch = order[first : first + batch_size]
        width = bucket(len(rows[batch[0]][0]))
        input_ids = np.full((batch_size if pad_batch else len(batch), width), pad_id, np.int32)
        spans = []
        for row, i in enumerate(batch):
            tokens, continuation = rows[i]
            input_ids[row, : len(tokens)] = tokens
            spans.append((row, len(tokens) - len(continuation), len(tokens), continuation))
        for i, result in zip(batch, scorer(input_ids, spans)):
            results[i] = result
    return results


def loglikelihoods(
    logits_fn: LogitsFn,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    add_bos: str | bool | None = "tokenizer",
    max_length: int | None = None,
    pad_to_multiple: int = 32,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, whether greedy decoding reproduces it) for each request.

    add_bos: "tokenizer" (default, as the harness: the tokenizer's own special tokens), "always"
      or "never" (see `encode`); a bool means "always"/"never".
    max_length: left-truncate each (context + continuation) to this many model inputs, as the
      harness does at the model's maximum length. None or 0: `logits_fn.max_length` when the
      function carries one (`lard_jax.eval_runner.logits_fn_for` sets the model's
      max_position_embeddings), else no truncation.
    Rows are right-padded to a multiple of `pad_to_multiple` so a jitted `logits_fn` compiles for few shapes.
    """
    if not max_length:
        max_length = getattr(logits_fn, "max_length", None) or None
    pad_id = getattr(tokenizer, "pad_id", None) or 0
    return score_token_requests(
        scorer_from_logits(logits_fn),
        encode_requests(tokenizer, requests, add_bos),
        batch_size=batch_size,
        max_length=max_length,
        bucket=round_up_bucket(pad_to_multiple),
        pad_id=pad_id,
        progress=progress,
    )


def score_examples(
    task_name: str,
    examples: Sequence[Example],
    logits_fn: LogitsFn,
    tokenizer: Any,
    **loglikelihood_options: Any,
) -> dict[str, float]:
    """Metrics for already-parsed examples (see the module docstring for which ones per task)."""
    requests = [r for example in examples for r in example.requests]
    scores = loglikelihoods(logits_fn, tokenizer, requests, **loglikelihood_options)
    if task_name.startswith("lambada"):
        return {
            "acc": float(np.mean([greedy for _, greedy in scores])),
            "ppl": math.exp(-float(np.mean([ll for ll, _ in scores]))),
            "n": len(examples),
        }
    correct, correct_norm, cursor = [], [], 0
    for example in examples:
        lls = np.array([ll for ll, _ in scores[cursor : cursor + len(example.requests)]])
        cursor += len(example.requests)
        correct.append(int(np.argmax(lls)) == example.gold)
        correct_norm.append(int(np.argmax(lls / np.array(example.norm_lengths))) == example.gold)
    metrics = {"acc": float(np.mean(correct))}
    if task_name != "winogrande":
        metrics["acc_norm"] = float(np.mean(correct_norm))
    metrics["n"] = len(examples)
    return metrics


def score_task(
    task_name: str,
    path: str | os.PathLike,
    logits_fn: LogitsFn,
    tokenizer: Any,
    *,
    limit: int | None = None,
    **loglikelihood_options: Any,
) -> dict[str, float]:
    """Reads `path` in the task's format and scores it; options go to `loglikelihoods`."""
    examples = read_task(task_name, path, limit=limit)
    return score_examples(task_name, examples, logits_fn, tokenizer, **loglikelihood_options)
