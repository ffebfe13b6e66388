"""Long-context probes generated on the fly: passkey retrieval and RULER-style synthetic tasks.

Prompts follow the published generators so scores are comparable in spirit:
- passkey: Mohtashami & Jaggi (2023) "Landmark Attention", as used by PI / YaRN / LongLoRA:
  the repeated "The grass is green. ..." haystack, one pass-key line at a chosen depth; scored
  1 when the first number in the greedy continuation equals the key.
- RULER (Hsieh et al. 2024, scripts/data/synthetic/{niah,variable_tracking,
  common_words_extraction,freq_words_extraction}.py and constants.py): same templates and
  answer prefixes, same task parameters (niah values of 7 digits, 4 keys / values / queries for
  the multi variants, vt 1 chain x 4 hops with one in-context example, cwe 10 words x 30 vs 3
  repeats, fwe zeta(2.0) word counts). Scored by RULER's `string_match_all`: the fraction of
  reference strings found (case-insensitively) in the prediction.

Differences from RULER, on purpose: the haystack is the repeated noise text or sentences the
caller passes as `filler` (RULER's essay haystack is Paul Graham essays we do not ship); for
NIAH the first answer needle sits at `depth` and the other needles at random depths (RULER
draws all depths at random); niah_multikey_2 / _3 build the haystack from distractor needles
of the same type (RULER's "needle" haystack), so there `filler` is unused; cwe uses pronounceable
pseudo-words instead of the wonderwords list.

`length` counts the prompt (with bos) plus the tokens the task is allowed to generate, as in
RULER's `max_seq_length`. Each generator returns a dict with `prompt_ids`, `answers`,
`max_new_tokens`, `task`, `depth` and `length` (the prompt's actual token count).

`make_passkey_window` / `passkey_windows` are the same passkey text as a teacher-forced example
of exactly `length` byte tokens that ends with its answer: what the tiny teacher trains on and is
scored by (argmax at the answer positions) in experiments/pretrain_teacher.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lard_jax.evaluation import stats

__all__ = [
    "NOISE_HAYSTACK",
    "TASKS",
    "make_passkey",
    "make_passkey_window",
    "passkey_windows",
    "make_niah_single",
    "make_niah_multikey",
    "make_niah_multikey_2",
    "make_niah_multikey_3",
    "make_niah_multivalue",
    "make_niah_multiquery",
    "make_variable_tracking",
    "make_common_words",
    "make_frequent_words",
    "score_prediction",
    "evaluate_synthetic",
    "depth_length_grid",
    "RULER_LENGTHS",
    "STANDARD_DEPTHS",
]

# RULER's evaluation lengths and the usual needle-in-a-haystack depth grid (0%, 10%, ..., 100%).
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
STANDARD_DEPTHS = tuple(round(0.1 * i, 1) for i in range(11))

NOISE_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
_NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assigned the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)

# Needle keys are adjective-noun pairs, like RULER's wonderwords keys ("abundant-fiction").
_ADJECTIVES = (
    "abundant agreeable ancient bitter brave bright calm careful cheerful clever curious damp "
    "daring eager early elegant faint fancy fierce gentle gifted glossy grumpy hollow honest "
    "humble icy jolly keen lively loud lucky mellow modern narrow nimble noisy odd plain polite "
    "proud quiet rapid rare rough rustic shy silent sleepy sturdy swift tame tidy vivid wary witty"
).split()
_NOUNS = (
    "anchor apple badge basket beacon blanket bottle bridge button cabin candle canyon carpet "
    "castle cellar chimney circle cloud comet compass cottage crystal desert dragon engine "
    "feather fiction forest fountain garden glacier guitar harbor helmet island jacket kettle "
    "ladder lantern lawn meadow mirror monkey needle orchard pencil pepper pillow planet pocket "
    "puzzle rabbit ribbon river saddle shadow signal summit teapot thunder tunnel valley violin "
    "wagon whistle window"
).split()
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

_NIAH_NEW_TOKENS, _VT_NEW_TOKENS, _CWE_NEW_TOKENS, _FWE_NEW_TOKENS = 128, 50, 120, 50


# ----------------------------------------------------------------------------- shared helpers


def _fit(render: Callable[[int], str], tokenizer: Any, budget: int, add_bos: bool, task: str) -> tuple[int, list[int]]:
    """The largest filler count n whose rendered prompt fits in `budget` tokens, and its ids.

    `render` must be deterministic in n; the token count is measured on the whole prompt because
    subword tokenisation of joined text is not the sum of its parts.
    """
    cache: dict[int, list[int]] = {}

    def ids(n: int) -> list[int]:
        if n not in cache:
            cache[n] = tokenizer.encode(render(n), add_bos=add_bos)
        return cache[n]

    if len(ids(0)) > budget:
        raise ValueError(f"{task}: the prompt alone is {len(ids(0))} tokens, over the budget of {budget}")
    probe = 8
    per_unit = max((len(ids(probe)) - len(ids(0))) / probe, 1.0 / probe)  # a unit is at least part of a token
    low, high = 0, max(probe, int((budget - len(ids(0))) / per_unit * 1.1) + 1)
    while len(ids(high)) <= budget:
        if high > max(1 << 20, 64 * budget):  # the prompt stopped growing with n: a render that ignores it
            raise ValueError(f"{task}: the prompt does not grow with its filler count (still <= {budget} tokens)")
        low, high = high, high * 2
    # len(ids(low)) <= budget < len(ids(high)). The count grows almost linearly in n (the units
    # repeat), so interpolation lands within a unit or two of the answer: a few encodes of the
    # whole prompt instead of a bisection's dozen. Whenever an interpolated guess fails to halve
    # the bracket the next guess bisects, so the bracket at least halves every two or three encodes.
    bisect = False
    while high - low > 1:
        if bisect:
            middle = (low + high) // 2
        else:
            n_low, n_high = len(ids(low)), len(ids(high))
            middle = low + int((budget - n_low) * (high - low) / max(n_high - n_low, 1))
            middle = min(max(middle, low + 1), high - 1)
        width = high - low
        if len(ids(middle)) <= budget:
            low = middle
            if not bisect and middle + 1 < high:  # most often the answer: test the next unit at once
                if len(ids(middle + 1)) > budget:
                    high = middle + 1
                else:
                    low = middle + 1
        else:
            high = middle
            if not bisect and middle - 1 > low:  # or the unit before
                if len(ids(middle - 1)) <= budget:
                    low = middle - 1
                else:
                    high = middle - 1
        bisect = not bisect and (high - low) * 2 > width
    return low, ids(low)


def _filler_units(filler: Sequence[str] | None, count: int) -> list[str]:
    units = list(filler) if filler else [NOISE_HAYSTACK]
    return [units[i % len(units)] for i in range(count)]


def _joiner(filler: Sequence[str] | None) -> str:
    # RULER joins its repeated noise by newlines and essay sentences by spaces.
    return " " if filler else "\n"


def _example_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**63 - 1))


def _random_number(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _random_word_key(rng: np.random.Generator) -> str:
    return f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"


def _random_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _random_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "numbers":
        return _random_number(rng, 7)
    if kind == "words":
        return _random_word_key(rng)
    if kind == "uuids":
        return _random_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r} (numbers, words, uuids)")


def _distinct(count: int, draw: Callable[[], str]) -> list[str]:
    values: dict[str, None] = {}  # insertion-ordered set
    while len(values) < count:
        values.setdefault(draw(), None)
    return list(values)


def _insert_at(units: list[str], items: Sequence[str], fractions: Sequence[float]) -> list[str]:
    """`units` with each item inserted at fraction f of the way through (0 = start, 1 = end)."""
    placed = sorted(zip((int(round(f * len(units))) for f in fractions), range(len(items))))
    out = list(units)
    for shift, (position, item_index) in enumerate(placed):
        out.insert(position + shift, items[item_index])
    return out


def _result(task: str, prompt_ids: list[int], answers: list[str], max_new_tokens: int, depth: float | None) -> dict:
    return {
        "task": task,
        "prompt_ids": prompt_ids,
        "answers": answers,
        "max_new_tokens": max_new_tokens,
        "depth": depth,
        "length": len(prompt_ids),
    }


# ----------------------------------------------------------------------------- passkey


_PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _passkey_needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def make_passkey(
    rng: np.random.Generator,
    tokenizer: Any,
    length: int,
    depth: float = 0.5,
    filler: Sequence[str] | None = None,
    *,
    num_digits: int = 5,
    add_bos: bool = True,
) -> dict:
    """A pass key of `num_digits` random digits hidden at `depth` of a haystack of `length` tokens."""
    key = _random_number(rng, num_digits)
    needle = _passkey_needle(key)
    question = _PASSKEY_QUESTION
    max_new_tokens = num_digits + 10

    def render(n: int) -> str:
        units = _filler_units(filler, n)
        split = int(round(depth * n))
        return "\n".join([_PASSKEY_INTRO, " ".join(units[:split]), needle, " ".join(units[split:]), question])

    _, prompt_ids = _fit(render, tokenizer, length - max_new_tokens, add_bos, "passkey")
    return _result("passkey", prompt_ids, [key], max_new_tokens, depth)


def _noise_chars(n_chars: int, from_end: bool) -> str:
    """Exactly n_chars of the repeated NOISE_HAYSTACK; ends (from_end) or starts on a sentence boundary."""
    block = NOISE_HAYSTACK + " "
    text = block * (n_chars // len(block) + 1)
    return text[len(text) - n_chars :] if from_end else text[:n_chars]


def make_passkey_window(
    rng: np.random.Generator, tokenizer: Any, length: int, *, num_digits: int = 5, add_bos: bool = True
) -> dict:
    """A passkey example of exactly `length` tokens that ends with its answer, for training and
    teacher-forced scoring: noise sentences, the needle at a uniformly random depth (whole
    sentences after it), then "What is the pass key? The pass key is NNNNN." (no intro).

    Needs a tokenizer with one token per ASCII character (lard_jax.tokenizer.ByteTokenizer): the
    haystack is cut to the character. Returns `_result`'s dict (task "passkey_window", no tokens to
    generate; `depth`: the fraction of the noise before the needle) plus `answer_positions`:
    prompt_ids[answer_positions] are the key's digits, and a model retrieves the key when its
    argmax at answer_positions - 1 predicts them all."""
    key = _random_number(rng, num_digits)
    needle = _passkey_needle(key) + " "
    question = f"{_PASSKEY_QUESTION} {key}."
    budget = length - int(add_bos) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"passkey_window: length={length} is too short for a passkey prompt ({length - budget})")
    # Whole sentences after the needle, a sentence-aligned tail of noise before it: the key's
    # depth is uniform over the prompt.
    suffix = _noise_chars(int(rng.integers(0, budget + 1)), from_end=False)
    suffix = suffix[: suffix.rfind(". ") + 2] if ". " in suffix else ""
    prefix = _noise_chars(budget - len(suffix), from_end=True)
    ids = list(tokenizer.encode(prefix + needle + suffix + question, add_bos=add_bos))
    if len(ids) != length:
        raise ValueError(
            f"passkey_window: {len(ids)} tokens instead of {length}; it needs a tokenizer with one token "
            "per ASCII character (lard_jax.tokenizer.ByteTokenizer)"
        )
    out = _result("passkey_window", ids, [key], 0, len(prefix) / max(budget, 1))
    out["answer_positions"] = list(range(length - 1 - num_digits, length - 1))  # the final "." follows the key
    return out


def passkey_windows(seed: int, count: int, length: int, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """`count` passkey windows (`make_passkey_window`, drawn in turn from one generator seeded by
    `seed`): (ids [count, length] int32, answer_positions [count, num_digits])."""
    rng = np.random.default_rng(seed)
    examples = [make_passkey_window(rng, tokenizer, length) for _ in range(count)]
    ids = np.asarray([e["prompt_ids"] for e in examples], np.int32).reshape(count, length)
    return ids, np.asarray([e["answer_positions"] for e in examples]).reshape(count, -1)


# ----------------------------------------------------------------------------- needle in a haystack


def _make_niah(
    task: str,
    rng: np.random.Generator,
    tokenizer: Any,
    length: int,
    depth: float,
    filler: Sequence[str] | None,
    *,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    key_type: str = "words",
    value_type: str = "numbers",
    haystack: str = "filler",
    add_bos: bool = True,
) -> dict:
    num_keys = max(num_keys, num_queries)  # as RULER: every query needs its own key
    keys = _distinct(num_keys, lambda: _random_value(rng, key_type))
    distractors = _DistractorNeedles(rng, keys, key_type, value_type) if haystack == "needles" else None
    values = [_distinct(num_values, lambda: _random_value(rng, value_type)) for _ in keys]
    queried = sorted(rng.choice(num_keys, size=num_queries, replace=False).tolist())
    needles, is_answer = [], []
    for k, key in enumerate(keys):
        for value in values[k]:
            needles.append(_NIAH_NEEDLE.format(type_needle_v=value_type, key=key, value=value))
            is_answer.append(k in queried)
    # The first answer needle goes at `depth`; every other needle at a random depth.
    first_answer = is_answer.index(True)
    fractions = rng.uniform(0.0, 1.0, size=len(needles))
    fractions[first_answer] = depth

    template, type_needle_v = _NIAH_TEMPLATE, value_type
    if num_queries * num_values == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_needle_v = value_type[:-1]
    query_keys = [keys[k] for k in queried]
    query = ", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1 else query_keys[0]

    def render(n: int) -> str:
        if distractors is not None:  # RULER haystack "needle": nothing but other needles of the same type
            context = "\n".join(_insert_at(distractors.first(n), needles, fractions))
        else:
            context = _joiner(filler).join(_insert_at(_filler_units(filler, n), needles, fractions))
        return template.format(type_needle_v=type_needle_v, context=context, query=query)

    _, prompt_ids = _fit(render, tokenizer, length - _NIAH_NEW_TOKENS, add_bos, task)
    answers = [value for k in queried for value in values[k]]
    return _result(task, prompt_ids, answers, _NIAH_NEW_TOKENS, depth)


def make_niah_single(rng, tokenizer, length, depth=0.5, filler=None, *, value_type="numbers", add_bos=True) -> dict:
    """RULER niah_single_1 (numbers) / niah_single_3 (value_type="uuids")."""
    return _make_niah("niah_single", rng, tokenizer, length, depth, filler, value_type=value_type, add_bos=add_bos)


def make_niah_multikey(rng, tokenizer, length, depth=0.5, filler=None, *, num_keys=4, add_bos=True) -> dict:
    """RULER niah_multikey_1: four needles with different keys, one of them asked for."""
    return _make_niah("niah_multikey", rng, tokenizer, length, depth, filler, num_keys=num_keys, add_bos=add_bos)


def make_niah_multikey_2(rng, tokenizer, length, depth=0.5, filler=None, *, add_bos=True) -> dict:
    """RULER niah_multikey_2: the haystack is made only of distractor needles (word keys, number
    values, the same sentence), the asked-for needle at `depth`. `filler` is unused."""
    del filler
    return _make_niah("niah_multikey_2", rng, tokenizer, length, depth, None, haystack="needles", add_bos=add_bos)


def make_niah_multikey_3(rng, tokenizer, length, depth=0.5, filler=None, *, add_bos=True) -> dict:
    """RULER niah_multikey_3: like multikey_2 with UUID keys and UUID values. `filler` is unused."""
    del filler
    return _make_niah(
        "niah_multikey_3",
        rng,
        tokenizer,
        length,
        depth,
        None,
        key_type="uuids",
        value_type="uuids",
        haystack="needles",
        add_bos=add_bos,
    )


class _DistractorNeedles:
    """An endless, deterministic list of needles whose keys differ from the real ones: the first
    n are the same whatever n the prompt fitting tries."""

    def __init__(self, rng, real_keys, key_type, value_type):
        self._rng = np.random.default_rng(_example_seed(rng))
        self._real = set(real_keys)
        self._types = (key_type, value_type)
        self._made: list[str] = []

    def first(self, n: int) -> list[str]:
        key_type, value_type = self._types
        while len(self._made) < n:
            key = _random_value(self._rng, key_type)
            if key in self._real:
                continue
            value = _random_value(self._rng, value_type)
            self._made.append(_NIAH_NEEDLE.format(type_needle_v=value_type, key=key, value=value))
        return self._made[:n]


def make_niah_multivalue(rng, tokenizer, length, depth=0.5, filler=None, *, num_values=4, add_bos=True) -> dict:
    """RULER niah_multivalue: four values for the one key asked for; all must be recalled."""
    return _make_niah("niah_multivalue", rng, tokenizer, length, depth, filler, num_values=num_values, add_bos=add_bos)


def make_niah_multiquery(rng, tokenizer, length, depth=0.5, filler=None, *, num_queries=4, add_bos=True) -> dict:
    """RULER niah_multiquery: four keys asked for at once."""
    return _make_niah(
        "niah_multiquery", rng, tokenizer, length, depth, filler, num_queries=num_queries, add_bos=add_bos
    )


# ----------------------------------------------------------------------------- aggregation tasks


def _variable_chain(
    rng: np.random.Generator, num_hops: int, name_length: int, value: str
) -> tuple[list[str], list[str]]:
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    names = _distinct(num_hops + 1, lambda: "".join(rng.choice(letters, size=name_length)))
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, statements


def _vt_prompt(units: list[str], statements: list[str], fractions: Sequence[float], value: str, num_hops: int) -> str:
    context = "\n".join(_insert_at(units, statements, fractions)).replace(". \n", ".\n")
    return _VT_TEMPLATE.format(context=context, query=value, num_v=num_hops + 1)


def make_variable_tracking(
    rng, tokenizer, length, depth=None, filler=None, *, num_hops: int = 4, icl: bool = True, add_bos: bool = True
) -> dict:
    """RULER vt: one chain VAR A = 12345, VAR B = VAR A, ... spread through the noise; name them all.

    `depth` is unused (RULER spreads the chain at random). With `icl`, one short solved example
    comes first, as RULER does.
    """
    del depth
    value = _random_number(rng, 5)
    names, statements = _variable_chain(rng, num_hops, 5, value)
    fractions = np.sort(rng.uniform(0.0, 1.0, size=len(statements)))  # chain order is kept
    prefix = ""
    if icl:
        icl_value = _random_number(rng, 5)
        icl_names, icl_statements = _variable_chain(rng, num_hops, 3, icl_value)
        icl_units = _filler_units(filler, 5)
        icl_fractions = np.sort(rng.uniform(0.0, 1.0, size=len(icl_statements)))
        prefix = _vt_prompt(icl_units, icl_statements, icl_fractions, icl_value, num_hops) + " ".join(icl_names) + "\n"

    def render(n: int) -> str:
        return prefix + _vt_prompt(_filler_units(filler, n), statements, fractions, value, num_hops)

    _, prompt_ids = _fit(render, tokenizer, length - _VT_NEW_TOKENS, add_bos, "variable_tracking")
    return _result("variable_tracking", prompt_ids, names, _VT_NEW_TOKENS, None)


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
    return _distinct(count, lambda: "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))))


def _cwe_list(rng: np.random.Generator, words: list[str], num_common: int, common_repeats: int, rare_repeats: int):
    common, rare = words[:num_common], words[num_common:]
    listed = common * common_repeats + rare * rare_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), common


def make_common_words(
    rng, tokenizer, length, depth=None, filler=None, *, num_common: int = 10, add_bos: bool = True
) -> dict:
    """RULER cwe: a numbered word list where 10 words repeat 30x and the rest 3x; name the 10.

    `depth` and `filler` are unused (the list is the haystack). Below 4096 tokens the repeats drop
    to 6x / 1x and the in-context example shrinks, as in RULER.
    """
    del depth, filler
    short = length < 4096
    common_repeats, rare_repeats = (6, 1) if short else (30, 3)
    icl_words, icl_common_repeats, icl_rare_repeats = (20, 3, 1) if short else (40, 10, 3)
    seed = _example_seed(rng)
    pool_rng = np.random.default_rng([seed, 0])
    icl_list, icl_answer = _cwe_list(
        pool_rng, _pseudo_words(pool_rng, icl_words), num_common, icl_common_repeats, icl_rare_repeats
    )
    icl = _CWE_TEMPLATE.format(context=icl_list) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(icl_answer))

    def example(n: int) -> tuple[str, list[str]]:
        example_rng = np.random.default_rng([seed, 1])  # the same draws for every n tried
        words = [w for w in _pseudo_words(example_rng, num_common + n) if w not in icl_answer]
        listed, common = _cwe_list(example_rng, words, num_common, common_repeats, rare_repeats)
        return icl + "\n" + _CWE_TEMPLATE.format(context=listed), common

    count, prompt_ids = _fit(lambda n: example(n)[0], tokenizer, length - _CWE_NEW_TOKENS, add_bos, "common_words")
    return _result("common_words", prompt_ids, example(count)[1], _CWE_NEW_TOKENS, None)


def _zeta(alpha: float, terms: int = 10_000) -> float:
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k**-alpha) + terms ** (1 - alpha) / (alpha - 1))  # tail by the integral


def make_frequent_words(
    rng, tokenizer, length, depth=None, filler=None, *, alpha: float = 2.0, add_bos: bool = True
) -> dict:
    """RULER fwe: coded 6-letter words with zeta(alpha) frequencies; name the 3 most frequent.

    The most frequent "word" is '...', noise the prompt says to ignore. `depth` and `filler` are unused.
    """
    del depth, filler
    vocab_size = max(length // 50, 8)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = _distinct(vocab_size, lambda: "".join(rng.choice(letters, size=6)))
    vocab[0] = "..."
    seed = _example_seed(rng)
    zeta = _zeta(alpha)
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)

    def render(n: int) -> str:
        counts = (n * ranks**-alpha / zeta).astype(int)
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        np.random.default_rng(seed).shuffle(words)
        return _FWE_TEMPLATE.format(context=" ".join(words))

    count, prompt_ids = _fit(render, tokenizer, length - _FWE_NEW_TOKENS, add_bos, "frequent_words")
    counts = (count * ranks[:4] ** -alpha / zeta).astype(int)
    if not counts[1] > counts[2] > counts[3] > 0:
        raise ValueError(f"frequent_words: length {length} is too short for three distinct frequencies")
    return _result("frequent_words", prompt_ids, vocab[1:4], _FWE_NEW_TOKENS, None)


# ----------------------------------------------------------------------------- scoring


TASKS: dict[str, Callable[..., dict]] = {
    "passkey": make_passkey,
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multikey_2": make_niah_multikey_2,
    "niah_multikey_3": make_niah_multikey_3,
    "niah_multivalue": make_niah_multivalue,
    "niah_multiquery": make_niah_multiquery,
    "variable_tracking": make_variable_tracking,
    "common_words": make_common_words,
    "frequent_words": make_frequent_words,
}
_DEPTHLESS = {"variable_tracking", "common_words", "frequent_words"}


def score_prediction(task: str, prediction_text: str, answers: Sequence[str]) -> float:
    """passkey: 1.0 when the first number predicted is the key; others: RULER string_match_all."""
    # RULER's postprocess_pred: control characters become newlines, then strip.
    prediction = re.sub(r"[\x00-\x1f]", "\n", prediction_text).strip()
    if task == "passkey":
        numbers = re.findall(r"\d+", prediction)
        return float(bool(numbers) and numbers[0] == answers[0])
    if not answers:
        raise ValueError(f"{task}: no reference answers to score against")
    lowered = prediction.lower()
    return sum(answer.lower() in lowered for answer in answers) / len(answers)


def evaluate_synthetic(
    generate_fn: Callable[[list[int], int], list[int]],
    tokenizer: Any,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    n: int,
    seed: int,
    *,
    filler: Sequence[str] | None = None,
    progress: bool = True,
    examples_cache: dict | None = None,
) -> dict:
    """Scores `n` generated examples per (length, depth) with the caller's greedy decoder:
    `generate_fn(prompt_ids, max_new_tokens)`, or, when it has one, its `batch(prompts,
    max_new_tokens)` with every prompt of a length at once (adapters.generate_fn_for).

    Returns {"task", "n", "mean", "by_length": {length: score}, "by_length_depth": {length: {depth:
    score}}, "by_length_n": {length: prompts}, "by_length_ci": {length: [lo, hi]} (95%: Wilson for
    0/1 scores, else the bootstrap; lard_jax.evaluation.stats)}; tasks without a depth (vt, cwe,
    fwe) have an empty "by_length_depth". Example i at
    (length, depth) is drawn from its own seed, so results do not depend on which others ran.

    `examples_cache`: a dict the caller keeps across calls with the same tokenizer (several models
    on the same prompts; keys are (task, seed, length, depth, i, filler), plain values, so it can
    be pickled for a later process): each prompt is built and tokenised once (at 32K tokens that
    is most of a small model's evaluation time).
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    task_depths: list[float | None] = [None] if task in _DEPTHLESS else list(depths)
    task_index = list(TASKS).index(task)
    grid = [(length, depth, i) for length in lengths for depth in task_depths for i in range(n)]
    scores: dict[int, dict[Any, list[float]]] = {}

    def example_at(length, depth, i):
        depth_key = -1 if depth is None else int(round(depth * 1000))
        key = (task, seed, int(length), depth_key, i, None if filler is None else tuple(filler))
        if examples_cache is not None and key in examples_cache:
            return examples_cache[key]
        rng = np.random.default_rng([seed, task_index, length, depth_key + 1, i])
        example = TASKS[task](rng, tokenizer, length, depth, filler)
        if examples_cache is not None:
            examples_cache[key] = example
        return example

    def record(length, depth, example, generated):
        score = score_prediction(task, tokenizer.decode(generated), example["answers"])
        scores.setdefault(int(length), {}).setdefault(depth, []).append(score)

    batch = getattr(generate_fn, "batch", None)
    if batch is None:
        for length, depth, i in tqdm(grid, desc=task, disable=not progress):
            example = example_at(length, depth, i)
            record(length, depth, example, generate_fn(list(example["prompt_ids"]), example["max_new_tokens"]))
    else:  # all prompts of one length together (the same results: every row decodes as it would alone)
        bar = tqdm(total=len(grid), desc=task, disable=not progress)
        for length in lengths:
            cells = [(d, i) for ln, d, i in grid if ln == length]
            examples = [example_at(length, d, i) for d, i in cells]
            for new_tokens in sorted({e["max_new_tokens"] for e in examples}):
                chosen = [k for k, e in enumerate(examples) if e["max_new_tokens"] == new_tokens]
                outputs = batch([list(examples[k]["prompt_ids"]) for k in chosen], new_tokens)
                for k, generated in zip(chosen, outputs):
                    record(length, cells[k][0], examples[k], generated)
                bar.update(len(chosen))
        bar.close()
    by_length_depth = {
        length: {float(d): float(np.mean(s)) for d, s in per_depth.items()}
        for length, per_depth in scores.items()
        if task not in _DEPTHLESS
    }
    flat = {length: [x for s in per.values() for x in s] for length, per in scores.items()}
    by_length = {length: float(np.mean(xs)) for length, xs in flat.items()}
    return {
        "task": task,
        "n": n,
        "mean": float(np.mean(list(by_length.values()))),
        "by_length": by_length,
        "by_length_depth": by_length_depth,
        "by_length_n": {length: len(xs) for length, xs in flat.items()},  # prompts behind each mean
        "by_length_ci": {length: stats.interval(xs) for length, xs in flat.items()},  # 95%, stats.interval
    }


def depth_length_grid(
    generate_fn: Callable[[list[int], int], list[int]],
    tokenizer: Any,
    tasks: Sequence[str] = ("niah_single", "niah_multikey", "niah_multikey_2", "niah_multikey_3"),
    lengths: Sequence[int] = RULER_LENGTHS,
    depths: Sequence[float] = STANDARD_DEPTHS,
    n: int = 1,
    seed: int = 0,
    *,
    filler: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """The standard NIAH sweep: every task at every (length, depth), `n` examples per cell.
    {task: evaluate_synthetic's result}; "by_length_depth" is what report.py draws as a heatmap."""
    return {
        task: evaluate_synthetic(
            generate_fn, tokenizer, task, lengths, depths, n, seed, filler=filler, progress=progress
        )
        for task in tasks
    }
