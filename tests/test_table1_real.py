"""experiments/table1_real.py's bookkeeping on CPU: the prompt cache a later call reuses, and the
row clock that adds up a row's seconds over calls."""

import json

from experiments import table1_real
from lard_jax.evaluation import synthetic
from lard_jax.tokenizer import ByteTokenizer


class _ShiftedBytes(ByteTokenizer):
    """Another tokenizer (ids shifted by one): its fingerprint differs from ByteTokenizer's."""

    def encode(self, text, add_bos=False):
        return [i + 1 for i in super().encode(text, add_bos=add_bos)]


def test_prompt_cache_round_trip_and_tokenizer_fingerprint(tmp_path):
    path = str(tmp_path / "prompts.pkl.gz")
    tok = ByteTokenizer()
    echo = lambda ids, n: list(ids[-n:])  # noqa: E731  (a deterministic stand-in for a model)

    first = table1_real.PromptCache(path, tok)
    out = synthetic.evaluate_synthetic(
        echo, tok, "passkey", [300, 400], [0.5], 2, 0, progress=False, examples_cache=first.examples
    )
    assert len(first.examples) == 4
    first.save()

    again = table1_real.PromptCache(path, tok)  # a later process with the same tokenizer
    assert again.examples.keys() == first.examples.keys()
    assert all(again.examples[k]["prompt_ids"] == first.examples[k]["prompt_ids"] for k in first.examples)
    built = []
    original = synthetic.TASKS["passkey"]
    synthetic.TASKS["passkey"] = lambda *a: built.append(a) or original(*a)
    try:
        out_again = synthetic.evaluate_synthetic(
            echo, tok, "passkey", [300, 400], [0.5], 2, 0, progress=False, examples_cache=again.examples
        )
    finally:
        synthetic.TASKS["passkey"] = original
    assert not built and out_again["by_length"] == out["by_length"]

    other = table1_real.PromptCache(path, _ShiftedBytes())  # another tokenizer: the file is not used
    assert other.examples == {}


def test_row_clock_adds_seconds_over_calls(tmp_path):
    path = str(tmp_path / "row" / "train_seconds.json")
    with table1_real.RowClock(path, every_s=0.01) as clock:
        pass
    first = clock.total_at_exit
    with open(path) as f:
        assert json.load(f)["seconds"] == first
    with table1_real.RowClock(path, every_s=0.01) as clock:
        pass
    assert clock.before == first and clock.total_at_exit >= first


class _BosBytes(ByteTokenizer):
    """The byte ids, but another bos id: prompts built with bos differ, the plain ids do not."""

    def encode(self, text, add_bos=False):
        ids = super().encode(text, add_bos=False)
        return ([250] + ids) if add_bos else ids


def test_prompt_cache_fingerprint_sees_the_bos(tmp_path):
    path = str(tmp_path / "p.pkl.gz")
    cache = table1_real.PromptCache(path, ByteTokenizer())
    cache.examples[("passkey", 0, 300, 500, 0, None)] = {"prompt_ids": [1, 2, 3]}
    cache.save()
    assert len(table1_real.PromptCache(path, ByteTokenizer()).examples) == 1
    assert table1_real.PromptCache(path, _BosBytes()).examples == {}
