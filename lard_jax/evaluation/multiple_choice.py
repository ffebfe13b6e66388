"""Short-text benchmarks scored the way lm-evaluation-harness scores them, from local JSONL files.

Each example becomes (context, continuation) requests; a request's score is the summed
log-likelihood of the continuation tokens given the context. Conventions copied from the harness
(lm_eval/models/huggingface.py and the task YAMLs), because reported numbers depend on them:

- context and continuation are tokenised as in `_encode_pair`: trailing spaces of the context
  move to the continuation, the pair is encoded as one string, and the continuation tokens are
  what follows the context's own encoding. No bos by default (the harness's `add_bos_token=False`
  for causal models); an empty context is replaced by the bos (else eos) token.
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
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from lard_jax.data import jsonl_records
from lard_jax.evaluation.perplexity import LogitsFn, token_log_probs

__all__ = ["Example", "TASK_READERS", "read_task", "loglikelihoods", "score_examples", "score_task"]


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


# ----------------------------------------------------------------------------- scoring


def _encode_pair(tokenizer: Any, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness `_encode_pair` (plus its empty-context rule)."""
    if context == "":
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return [prefix], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    context_ids = tokenizer.encode(context, add_bos=add_bos)
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return context_ids, continuation_ids


def loglikelihoods(
    logits_fn: LogitsFn,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    add_bos: bool = False,
    max_length: int | None = None,
    pad_to_multiple: int = 32,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, whether greedy decoding reproduces it) for each request.

    Rows are right-padded (harmless for a causal model) to a multiple of `pad_to_multiple` so a
    jitted `logits_fn` compiles for few shapes; `max_length` truncates from the left as the harness does.
    """
    encoded = [_encode_pair(tokenizer, c, x, add_bos) for c, x in requests]
    rows = []
    for context_ids, continuation_ids in encoded:
        tokens = (context_ids + continuation_ids)[:-1]
        if max_length is not None:
            tokens = tokens[-max_length:]
        rows.append((tokens, continuation_ids))
    # Longest first, like the harness: similar lengths share a batch, so less padding.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    pad_id = getattr(tokenizer, "pad_id", None) or 0
    for first in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not progress):
        batch = order[first : first + batch_size]
        width = max(len(rows[i][0]) for i in batch)
        width = -(-width // pad_to_multiple) * pad_to_multiple
        input_ids = np.full((len(batch), width), pad_id, np.int32)
        for row, i in enumerate(batch):
            input_ids[row, : len(rows[i][0])] = rows[i][0]
        logits = logits_fn(input_ids)
        for row, i in enumerate(batch):
            tokens, continuation = rows[i]
            positions = slice(len(tokens) - len(continuation), len(tokens))
            continuation_logits = np.asarray(logits[row, positions])
            log_probs = token_log_probs(continuation_logits, np.asarray(continuation))
            greedy = bool(np.all(continuation_logits.argmax(-1) == np.asarray(continuation)))
            results[i] = (float(log_probs.sum()), greedy)
    return results


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
