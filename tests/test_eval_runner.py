"""The evaluation entry point on a tiny random model: every column and file of the report."""

import json

import numpy as np
import pytest

from configs import eval as eval_config
from experiments import evaluate
from lard_jax.evaluation import runner as eval_runner
from lard_jax.pipeline import ConfigError
from lard_jax.tokenizer import ByteTokenizer
from tests.tiny import save_tiny_teacher


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_tiny_teacher(d, seed=21, max_position_embeddings=64)
    rng = np.random.default_rng(22)
    words = "north south east west wind rain snow sun moon star".split()
    with open(d / "heldout.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n")
    return d


def test_evaluate_entry_point_writes_full_report(checkpoint, tmp_path):
    c = eval_config.get_config()
    c.workdir = str(tmp_path / "eval")
    c.models = f"teacher={checkpoint},other={checkpoint}"
    c.scaled_rope = '{"rope_type": "linear", "factor": 4.0}'
    c.model.dtype = "float32"
    c.eval.source = str(checkpoint / "heldout.jsonl")
    c.eval.native_len = 32
    c.eval.ppl_lengths = (16, 32)
    c.eval.passkey_lengths = (300,)
    c.eval.niah_lengths = ()
    c.eval.passkey_samples = 3
    c.eval.cloze_samples = 4
    c.eval.max_windows = 4
    results = evaluate.run(c)
    assert list(results) == ["teacher", "scaled", "other"]
    report = json.load(open(tmp_path / "eval" / "report.json"))
    for name in ("teacher", "scaled", "other"):
        m = report["models"][name]
        assert m["short_ppl"] > 1 and 0 <= m["cloze_acc"] <= 1 and "300" in m["passkey"]
        assert set(m["ppl_vs_length"]) == {"16", "32"}
    # identical weights and RoPE: same numbers; scaled RoPE: different perplexity
    assert report["models"]["other"]["short_ppl"] == pytest.approx(report["models"]["teacher"]["short_ppl"])
    assert report["models"]["scaled"]["short_ppl"] != pytest.approx(report["models"]["teacher"]["short_ppl"])
    assert np.allclose(report["distortion"]["other"]["q"], 0, atol=1e-6)
    assert (tmp_path / "eval" / "report.md").exists()


def test_evaluate_config_errors(tmp_path):
    c = eval_config.get_config()
    c.workdir = str(tmp_path)
    with pytest.raises(ConfigError, match="models is empty"):
        evaluate.run(c)
    c.models = "teacher"
    with pytest.raises(ValueError, match="name=path"):
        evaluate.run(c)


def test_cloze_examples_are_balanced_and_valid():
    rng = np.random.default_rng(23)
    docs = [list(rng.integers(3, 200, 80)) for _ in range(6)]
    examples = eval_runner.cloze_examples(docs, ByteTokenizer(), context_len=20, cont_len=8, n=200, seed=1)
    golds = np.bincount([e.gold for e in examples], minlength=4)
    assert golds.min() > 25  # the true continuation is not always in one slot
    assert all(len(e.requests) == 4 and len({c for c, _ in e.requests}) == 1 for e in examples)
    with pytest.raises(ValueError, match="held-out documents"):
        eval_runner.cloze_examples(docs[:2], ByteTokenizer(), context_len=20, cont_len=8, n=1)
