"""Evaluation scorers against hand-computed cases, generated tasks against an oracle, and the report."""

import collections
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from lard_jax.evaluation import adapters, distortion, multiple_choice, perplexity, report, synthetic
from lard_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
V = TOK.vocab_size


def bigram_logits_fn(table, calls=None):
    """logits[b, t] = table[input_ids[b, t]]: a model whose answers are known in closed form."""

    def logits_fn(input_ids):
        assert input_ids.dtype == np.int32
        if calls is not None:
            calls.append(input_ids.copy())
        return table[input_ids].astype(np.float32)

    return logits_fn


def log_softmax_row(row):
    row = np.asarray(row, np.float64)
    return row - row.max() - math.log(np.exp(row - row.max()).sum())


def bigram_loglik(table, prefix_ids, continuation_ids):
    ids = list(prefix_ids) + list(continuation_ids)
    start = len(prefix_ids)
    return sum(log_softmax_row(table[ids[t - 1]])[ids[t]] for t in range(start, len(ids)))


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_uniform_model_equals_vocab_size():
    rng = np.random.default_rng(31)
    table = np.full((V, V), rng.normal(), np.float32)  # any constant row is the uniform distribution
    docs = [rng.integers(3, V, size=n) for n in (70, 33, 140)]
    result = perplexity.perplexity_vs_length(
        bigram_logits_fn(table), docs, [16, 64], max_windows=5, batch_size=2, progress=False
    )
    assert result == pytest.approx({16: V, 64: V}, rel=1e-6)


def test_perplexity_matches_hand_computation_on_disjoint_windows():
    rng = np.random.default_rng(32)
    table = rng.normal(size=(V, V)).astype(np.float32)
    docs = [rng.integers(3, V, size=n) for n in (50, 12, 45)]
    calls = []
    with pytest.warns(UserWarning, match="length 64 skipped"):
        result = perplexity.perplexity_vs_length(
            bigram_logits_fn(table, calls), docs, [20, 64], max_windows=3, batch_size=2, progress=False
        )
    windows = [docs[0][0:20], docs[0][20:40], docs[2][0:20]]  # doc 1 is too short; max 3 windows
    np.testing.assert_array_equal(np.concatenate(calls), np.stack(windows))
    nll = -np.mean([log_softmax_row(table[w[t - 1]])[w[t]] for w in windows for t in range(1, 20)])
    assert set(result) == {20} and result[20] == pytest.approx(math.exp(nll), rel=1e-6)


# ----------------------------------------------------------------------------- multiple choice


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _random_phrase(rng, words):
    vocab = ["river", "stone", "cat", "quietly", "runs", "über", "naïve", "blue", "a", "the"]
    return " ".join(rng.choice(vocab, size=words))


def test_acc_prefers_fewest_tokens_and_acc_norm_most_characters(tmp_path):
    # Uniform model: ll = -(tokens) log V. With bytes, " " + ending has len(ending) + 1 tokens,
    # so acc picks the shortest ending and acc_norm (ll / characters) the longest.
    rng = np.random.default_rng(33)
    table = np.full((V, V), rng.normal(), np.float32)
    records = []
    for _ in range(6):
        endings = ["x" * n for n in rng.permutation([3, 7, 12, 20])]
        shortest = int(np.argmin([len(e) for e in endings]))
        records.append({"ctx": _random_phrase(rng, 5), "endings": endings, "label": str(shortest)})
    path = _write_jsonl(tmp_path / "hellaswag.jsonl", records)
    metrics = multiple_choice.score_task("hellaswag", path, bigram_logits_fn(table), TOK, batch_size=4, progress=False)
    assert metrics == {"acc": 1.0, "acc_norm": 0.0, "n": 6}


def test_multiple_choice_matches_hand_computed_loglikelihoods(tmp_path):
    rng = np.random.default_rng(34)
    table = (3 * rng.normal(size=(V, V))).astype(np.float32)
    records = [
        {
            "goal": _random_phrase(rng, 4),
            "sol1": _random_phrase(rng, 3),
            "sol2": _random_phrase(rng, 6),
            "label": int(rng.integers(2)),
        }
        for _ in range(12)
    ]
    path = _write_jsonl(tmp_path / "piqa.jsonl", records)
    metrics = multiple_choice.score_task(
        "piqa", path, bigram_logits_fn(table), TOK, limit=10, batch_size=3, progress=False
    )
    correct, correct_norm = [], []
    for record in records[:10]:
        context = TOK.encode(f"Question: {record['goal']}\nAnswer:")
        choices = [record["sol1"], record["sol2"]]
        lls = np.array([bigram_loglik(table, context, TOK.encode(" " + c)) for c in choices])
        correct.append(np.argmax(lls) == record["label"])
        correct_norm.append(np.argmax(lls / [len(c) for c in choices]) == record["label"])
    assert metrics["n"] == 10
    assert metrics["acc"] == pytest.approx(np.mean(correct))
    assert metrics["acc_norm"] == pytest.approx(np.mean(correct_norm))


def test_lambada_oracle_accuracy_and_perplexity(tmp_path):
    rng = np.random.default_rng(35)
    texts = [_random_phrase(rng, int(rng.integers(4, 9))) + " " + w for w in ("endword", "fin", "último")]
    path = _write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    full = [TOK.encode(t, add_bos=True) for t in texts]  # the byte tokenizer adds its bos by default
    boost = 10.0

    def oracle_logits_fn(input_ids):
        # Puts `boost` on the true next token of whichever text the row is a prefix of.
        logits = np.zeros(input_ids.shape + (V,), np.float32)
        for b, row in enumerate(input_ids):
            for ids in full:
                if list(row[: len(ids) - 1]) == ids[:-1]:
                    logits[b, np.arange(len(ids) - 1), ids[1:]] = boost
        return logits

    metrics = multiple_choice.score_task("lambada_openai", path, oracle_logits_fn, TOK, batch_size=2, progress=False)
    per_token = boost - math.log(math.exp(boost) + V - 1)
    target_tokens = [len((" " + t.rsplit(" ", 1)[1]).encode()) for t in texts]
    assert metrics["acc"] == 1.0 and metrics["n"] == 3
    assert metrics["ppl"] == pytest.approx(math.exp(-np.mean([n * per_token for n in target_tokens])), rel=1e-5)


def test_task_formats_follow_the_harness(tmp_path):
    hellaswag = _write_jsonl(
        tmp_path / "h.jsonl",
        [
            {
                "activity_label": "Baking",
                "ctx_a": "She mixes flour.",
                "ctx_b": "then she",
                "endings": ["bakes it [title] well.", "eats  it."],
                "label": "1",
            }
        ],
    )
    [example] = multiple_choice.read_task("hellaswag", hellaswag)
    assert example.requests == [
        ("Baking: She mixes flour. Then she", " bakes it. well."),
        ("Baking: She mixes flour. Then she", " eats it."),
    ]
    assert example.gold == 1

    arc = _write_jsonl(
        tmp_path / "arc.jsonl",
        [
            {
                "question": "Why?",
                "choices": {"text": ["no", "yes", "maybe"], "label": ["A", "B", "C"]},
                "answerKey": "C",
            },
            {
                "question": {"stem": "How?", "choices": [{"text": "so", "label": "1"}, {"text": "thus", "label": "2"}]},
                "answerKey": "2",
            },
        ],
    )
    first, second = multiple_choice.read_task("arc_challenge", arc)
    assert first.requests[2] == ("Question: Why?\nAnswer:", " maybe") and first.gold == 2
    assert second.requests[1] == ("Question: How?\nAnswer:", " thus") and second.gold == 1

    winogrande = _write_jsonl(
        tmp_path / "w.jsonl",
        [
            {
                "sentence": "Ann gave Bea the book because _ was done reading.",
                "option1": "Ann",
                "option2": "Bea",
                "answer": "1",
            },
        ],
    )
    [example] = multiple_choice.read_task("winogrande", winogrande)
    assert example.requests == [
        ("Ann gave Bea the book because Ann", " was done reading."),
        ("Ann gave Bea the book because Bea", " was done reading."),
    ]
    assert example.gold == 0


def test_trailing_context_space_moves_to_continuation():
    assert multiple_choice._encode_pair(TOK, "abc  ", "def", add_bos=False) == (TOK.encode("abc"), TOK.encode("  def"))


def test_harness_defaults_add_bos_and_truncate_at_the_model_length():
    # lm-eval >= 0.4.9: the tokenizer's own bos (the byte tokenizer adds one); left truncation to
    # the model's maximum length, which eval_runner.logits_fn_for attaches as logits_fn.max_length.
    rng = np.random.default_rng(36)
    table = (3 * rng.normal(size=(V, V))).astype(np.float32)
    requests = [(_random_phrase(rng, int(rng.integers(2, 12))), " " + _random_phrase(rng, 2)) for _ in range(6)]
    calls = []
    fn = bigram_logits_fn(table, calls)
    scores = multiple_choice.loglikelihoods(fn, TOK, requests, batch_size=6, pad_to_multiple=1, progress=False)
    for (context, continuation), (ll, _) in zip(requests, scores):
        assert ll == pytest.approx(bigram_loglik(table, TOK.encode(context, add_bos=True), TOK.encode(continuation)))
    assert all(row[0] == TOK.bos_id for row in calls[0])
    assert multiple_choice.encode(TOK, "abc") == TOK.encode("abc", add_bos=True)
    assert multiple_choice.encode(TOK, "<s>abc") == TOK.encode("<s>abc")  # already starts with the bos text
    assert multiple_choice.encode(TOK, "abc", "never") == TOK.encode("abc")
    calls.clear()
    fn.max_length = 16
    truncated = multiple_choice.loglikelihoods(fn, TOK, requests, batch_size=6, pad_to_multiple=1, progress=False)
    assert max(len(row) for row in calls[0]) <= 16
    for (context, continuation), (ll, _) in zip(requests, truncated):
        ids = TOK.encode(context, add_bos=True) + TOK.encode(continuation)
        kept = ids[-17:]  # the model reads the last 16 inputs; the bigram model needs only the previous token
        n = len(TOK.encode(continuation))
        assert ll == pytest.approx(bigram_loglik(table, kept[:-n], kept[-n:]))
    with pytest.raises(ValueError, match="add_bos"):
        multiple_choice.loglikelihoods(fn, TOK, requests, add_bos="sometimes", progress=False)


def test_wrong_task_format_names_file_and_line(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a", "label": 1}\n')
    with pytest.raises(ValueError, match=r"piqa.jsonl:2: missing field 'sol2'"):
        multiple_choice.read_task("piqa", path)
    path.write_text('{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"piqa.jsonl:1: sentence has no '_'"):
        multiple_choice.read_task("winogrande", path)
    path.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}\n')
    with pytest.raises(ValueError, match=r"piqa.jsonl:1: label 5 is out of range"):
        multiple_choice.read_task("piqa", path)
    path.write_text("")
    with pytest.raises(ValueError, match="piqa.jsonl: empty file"):
        multiple_choice.read_task("piqa", path)


# ----------------------------------------------------------------------------- synthetic tasks


def _solve(task, prompt):
    """Answers a generated prompt from its text alone, the way a perfect reader would."""
    if task == "passkey":
        return re.search(r"The pass key is (\d+)\. Remember it", prompt).group(1)
    if task.startswith("niah"):
        query = re.findall(r"for (.+?) mentioned in the provided text\?", prompt)[-1]
        keys = re.split(r", and |, ", query)
        return " ".join(v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", prompt))
    if task == "variable_tracking":
        final = prompt[prompt.rindex("Memorize and track") :]
        value = re.search(r"assigned the value (\d+) in the text above", final).group(1)
        assignments = dict((a, b) for a, b in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", final))
        names, frontier = [], value
        while True:
            nxt = [a for a, b in assignments.items() if b in (frontier, f"VAR {frontier}")]
            if not nxt:
                return " ".join(names)
            names += nxt
            frontier = nxt[0]
    if task == "common_words":
        final = prompt[prompt.rindex("appear most often.\n") : prompt.rindex("\nQuestion")]
        return " ".join(w for w, _ in collections.Counter(re.findall(r"\d+\. (\w+)", final)).most_common(10))
    if task == "frequent_words":
        words = prompt[prompt.index("coded words. ") + 13 : prompt.rindex("\nQuestion")].split()
        return " ".join(w for w, _ in collections.Counter(w for w in words if w != "...").most_common(3))
    raise AssertionError(task)


def oracle_generate(task):
    def generate(prompt_ids, max_new_tokens):
        return TOK.encode(" " + _solve(task, TOK.decode(prompt_ids)))[:max_new_tokens]

    return generate


@pytest.mark.parametrize("task", list(synthetic.TASKS))
def test_generated_tasks_score_one_for_oracle_and_zero_for_constant(task):
    lengths, depths = [2300, 3100], [0.1, 0.9]
    perfect = synthetic.evaluate_synthetic(
        oracle_generate(task), TOK, task, lengths, depths, n=1, seed=5, progress=False
    )
    assert perfect["mean"] == 1.0 and perfect["by_length"] == {2300: 1.0, 3100: 1.0}
    if task in ("passkey", "niah_single"):
        assert perfect["by_length_depth"] == {n: {0.1: 1.0, 0.9: 1.0} for n in lengths}
    constant = synthetic.evaluate_synthetic(
        lambda ids, n: TOK.encode(" 0"), TOK, task, lengths, depths, n=1, seed=5, progress=False
    )
    assert constant["mean"] == 0.0


def test_generated_prompts_fit_length_and_place_needle_at_depth():
    rng = np.random.default_rng(36)
    filler = ["Ships sail at dawn.", "Wolves howl at night.", "Bread rises slowly."]
    for depth in (0.2, 0.75):
        example = synthetic.make_passkey(rng, TOK, 3000, depth=depth, filler=filler)
        assert 3000 - 200 < example["length"] + example["max_new_tokens"] <= 3000
        text = TOK.decode(example["prompt_ids"])
        assert "Ships sail at dawn." in text and "grass is green" not in text
        assert abs(text.index("The pass key is") / len(text) - depth) < 0.08
        assert example["prompt_ids"][0] == TOK.bos_id


def test_score_prediction_cases():
    assert synthetic.score_prediction("passkey", " 48213. The pass key", ["48213"]) == 1.0
    assert synthetic.score_prediction("passkey", " 482130", ["48213"]) == 0.0
    assert (
        synthetic.score_prediction(
            "niah_multivalue", "1234567, 7654321\n", ["1234567", "7654321", "1111111", "2222222"]
        )
        == 0.5
    )
    assert synthetic.score_prediction("common_words", "1. Apple 2. pear", ["apple", "pear"]) == 1.0


def test_text_after_eos_scores_so_stopping_at_eos_is_opt_in():
    """The scorers read the decoded text of everything generated, eos skipped: an answer written
    after an eos counts in the full-length decode and not once generation stops at the eos (and
    digits either side of it join), which is why EvalSpec.stop_at_eos is off by default."""
    full = TOK.encode(" Sure.") + [TOK.eos_id] + TOK.encode(" 48213")
    cut = full[: full.index(TOK.eos_id) + 1]
    assert synthetic.score_prediction("passkey", TOK.decode(full), ["48213"]) == 1.0
    assert synthetic.score_prediction("passkey", TOK.decode(cut), ["48213"]) == 0.0
    joined = TOK.encode(" 482") + [TOK.eos_id] + TOK.encode("13")
    assert synthetic.score_prediction("niah_single", TOK.decode(joined), ["48213"]) == 1.0
    assert (
        synthetic.score_prediction("niah_single", TOK.decode(joined[: joined.index(TOK.eos_id) + 1]), ["48213"]) == 0.0
    )


def test_generate_fn_stops_at_the_tokenizers_eos_only_when_asked():
    import jax
    import ml_collections

    from lard_jax import generate
    from lard_jax.evaluation import runner, tasks
    from lard_jax.model import LlamaConfig, init_params

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    rng = np.random.default_rng()
    model, params = init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    params = jax.tree_util.tree_map(lambda x: x * 20 if x.ndim == 2 else x, params)
    prompts = [rng.integers(3, V, int(n)).tolist() for n in rng.integers(3, 30, 3)]
    full = generate.greedy_generate(model, params, prompts, 16)
    eos = full[1][5]  # a token the model emits: stands in for the tokenizer's eos
    cut = [r[: r.index(eos) + 1] if eos in r else r for r in full]
    fn = adapters.generate_fn_for(model, params, eos_id=eos)
    assert fn.batch(prompts, 16) == cut and [fn(p, 16) for p in prompts] == cut
    assert adapters.generate_fn_for(model, params).batch(prompts, 16) == full  # no eos: every token

    class Tok(ByteTokenizer):
        eos_id = eos

    spec = runner.EvalSpec(native_len=64)
    assert spec.stop_at_eos is False
    ctx = tasks.TaskContext(model=model, params=params, tokenizer=Tok(), docs=[], spec=spec, progress=False)
    assert ctx.generate.eos_id is None and ctx.generate.batch(prompts, 16) == full
    spec = dataclasses.replace(spec, stop_at_eos=True)
    ctx = tasks.TaskContext(model=model, params=params, tokenizer=Tok(), docs=[], spec=spec, progress=False)
    assert ctx.generate.eos_id == eos and ctx.generate.batch(prompts, 16) == cut
    config = ml_collections.ConfigDict(
        dict(
            native_len=0,
            ppl_lengths=(),
            max_windows=1,
            passkey_lengths=(),
            passkey_samples=1,
            depths=(0.5,),
            niah_lengths=(),
            cloze_samples=0,
            harness_tasks="",
        )
    )
    assert runner.eval_spec_from_config(config, 64).stop_at_eos is False
    config.stop_at_eos = True
    assert runner.eval_spec_from_config(config, 64).stop_at_eos is True


# ----------------------------------------------------------------------------- relation distortion


def _naive_row_kl(student, teacher, mask):
    batch, length, heads, dim = student.shape
    out = np.zeros((batch, heads, length))
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                if not mask[b, t]:
                    continue
                keys = [s for s in range(t + 1) if mask[b, s]]
                p = np.exp(log_softmax_row([teacher[b, t, h] @ teacher[b, s, h] / math.sqrt(dim) for s in keys]))
                q = np.exp(log_softmax_row([student[b, t, h] @ student[b, s, h] / math.sqrt(dim) for s in keys]))
                out[b, h, t] = np.sum(p * (np.log(p) - np.log(q)))
    return out


def test_dense_relation_kl_matches_naive_rows():
    rng = np.random.default_rng(37)
    student, teacher = rng.normal(size=(2, 2, 7, 3, 4)).astype(np.float32)
    mask = rng.random((2, 7)) > 0.25
    got = np.asarray(distortion.dense_self_relation_kl(student, teacher, mask=mask))
    np.testing.assert_allclose(got, _naive_row_kl(student, teacher, mask), rtol=2e-4, atol=1e-6)


def test_relation_distortion_shapes_and_means():
    rng = np.random.default_rng(38)
    layers, heads, kv_heads, dim, length = 3, 4, 2, 8, 9
    qkv = {
        name: [
            {
                "q": rng.normal(size=(2, length, heads, dim)),
                "k": rng.normal(size=(2, length, kv_heads, dim)),
                "v": rng.normal(size=(2, length, kv_heads, dim)),
            }
            for _ in range(layers)
        ]
        for name in ("teacher", "student")
    }
    input_ids = rng.integers(3, V, size=(2, length)).astype(np.int32)
    mask = np.ones((2, length), bool)
    mask[1, 6:] = False
    fn = lambda layers_: lambda ids: [{r: d[r][: len(ids)] if len(ids) == 2 else d[r][1:2] for r in d} for d in layers_]
    result = distortion.relation_distortion(
        fn(qkv["teacher"]), fn(qkv["student"]), input_ids, mask=mask, progress=False
    )
    assert result["q"].shape == (layers, heads) and result["k"].shape == result["v"].shape == (layers, kv_heads)
    expected_k0 = _naive_row_kl(qkv["student"][0]["k"], qkv["teacher"][0]["k"], mask).sum(axis=(0, 2)) / mask.sum()
    np.testing.assert_allclose(result["k"][0], expected_k0, rtol=2e-4)
    same = distortion.relation_distortion(fn(qkv["teacher"]), fn(qkv["teacher"]), input_ids, mask=mask, progress=False)
    assert all(np.abs(v).max() < 1e-5 for v in same.values())


# ----------------------------------------------------------------------------- report


def test_report_files_written_and_parse(tmp_path):
    rng = np.random.default_rng(39)
    lengths = [4096, 8192, 32768]

    def metrics():
        return {
            "short_ppl": float(rng.uniform(5, 9)),
            "ppl_vs_length": {n: float(rng.uniform(5, 40)) for n in lengths},
            "passkey": {n: float(rng.random()) for n in lengths},
            "tasks": {"piqa": {"acc": float(rng.random()), "acc_norm": float(rng.random()), "n": 100}},
            "synthetic": {
                "niah_single": {
                    "mean": 0.5,
                    "n": 2,
                    "by_length": {n: float(rng.random()) for n in lengths},
                    "by_length_depth": {n: {0.1: float(rng.random()), 0.9: float("nan")} for n in lengths},
                }
            },
            "tokens_seen": 4250000,
        }

    results = {"restored": metrics(), "LongReD": metrics(), "teacher": metrics(), "scaled": metrics()}
    distortion_maps = {
        name: {r: rng.random((4, 8)).astype(np.float32) for r in "qkv"} for name in ("scaled", "restored")
    }
    written = report.write_report(
        tmp_path / "run", results, distortion=distortion_maps, title="Test run", meta={"seed": 1}
    )

    loaded = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(loaded["models"]) == ["teacher", "scaled", "restored", "LongReD"]
    assert loaded["models"]["teacher"]["ppl_vs_length"]["8192"] == pytest.approx(
        results["teacher"]["ppl_vs_length"][8192]
    )
    assert loaded["models"]["scaled"]["synthetic"]["niah_single"]["by_length_depth"]["4096"]["0.9"] is None
    assert np.array(loaded["distortion"]["scaled"]["q"]).shape == (4, 8)
    assert loaded["meta"]["title"] == "Test run" and loaded["meta"]["seed"] == 1

    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "| metric | teacher | scaled | restored | LongReD |" in markdown
    assert "piqa acc (%)" in markdown and "tokens_seen" in markdown and "![ppl_vs_length.png]" in markdown
    pngs = [name for name in written if name.endswith(".png")]
    assert {
        "ppl_vs_length.png",
        "passkey_vs_length.png",
        "distortion_scaled.png",
        "heatmap_niah_single_teacher.png",
    } <= set(pngs)
    for name in pngs:
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(tmp_path / "run") if name.startswith(".")]  # no temp files left


def test_niah_task_runs_every_configured_variant_and_rejects_unknown_names():
    from lard_jax.evaluation import runner, tasks

    spec = runner.EvalSpec(
        native_len=256,
        niah_lengths=(2300,),
        depths=(0.5,),
        passkey_samples=1,
        niah_tasks=("niah_single", "niah_multikey_2"),
        tasks=("niah",),
    )
    ctx = tasks.TaskContext(model=None, params=None, tokenizer=TOK, docs=[], spec=spec, progress=False)

    def generate(prompt_ids, max_new_tokens):  # answers whichever variant the prompt is
        text = TOK.decode(prompt_ids)
        task = "niah_multikey_2" if ctx.__dict__.get("_now") == "niah_multikey_2" else "niah_single"
        return TOK.encode(" " + _solve(task, text))[:max_new_tokens]

    ctx.__dict__["generate"] = generate
    out = {}
    for variant in spec.niah_tasks:  # one variant at a time, so the oracle knows which one it answers
        ctx.__dict__["_now"] = variant
        sub = dataclasses.replace(spec, niah_tasks=(variant,))
        ctx.spec = sub
        out.update({k: v for k, v in tasks.get("niah")(ctx).items() if k != "synthetic"})
    assert out == {"niah": {2300: 1.0}, "niah_multikey_2": {2300: 1.0}}
    with pytest.raises(ValueError, match="eval.niah_tasks: unknown"):
        runner.check_spec(dataclasses.replace(spec, niah_tasks=("niah_nope",)), TOK)


def _fit_by_bisection(render, tokenizer, budget, add_bos):
    """The plain reference: the largest n with len(encode(render(n))) <= budget, by bisection."""
    count = lambda n: len(tokenizer.encode(render(n), add_bos=add_bos))  # noqa: E731
    low, high = 0, 1
    while count(high) <= budget:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) <= budget else (low, middle)
    return low


class _CountingTokenizer:
    """Byte tokens of the text, counting encode calls; `lumpy` makes the count grow unevenly with n
    (some units cost more), as subword merges at unit boundaries do."""

    def __init__(self, lumpy: bool):
        self.calls, self.lumpy = 0, lumpy

    def encode(self, text, add_bos=False):
        self.calls += 1
        extra = sum(1 for c in text if c == "#") * 3 if self.lumpy else 0
        return [1] * (len(text.encode()) + extra + int(add_bos))


@pytest.mark.parametrize("lumpy", [False, True])
def test_fit_finds_what_bisection_finds_with_fewer_encodes(lumpy):
    rng = np.random.default_rng(7)
    units = ["".join(rng.choice(list("abcdefgh #"), size=int(rng.integers(5, 40)))) for _ in range(97)]
    render = lambda n: "Header text. " + "\n".join(units[i % len(units)] for i in range(n)) + " Question?"  # noqa: E731
    total_fast = total_ref = 0
    for budget in rng.integers(200, 30000, size=12):
        budget = int(budget)
        fast_tok, ref_tok = _CountingTokenizer(lumpy), _CountingTokenizer(lumpy)
        n, ids = synthetic._fit(render, fast_tok, budget, True, "t")
        assert n == _fit_by_bisection(render, ref_tok, budget, True)
        assert len(ids) <= budget < len(_CountingTokenizer(lumpy).encode(render(n + 1), add_bos=True))
        total_fast += fast_tok.calls
        total_ref += ref_tok.calls
    assert total_fast < total_ref, (total_fast, total_ref)


def test_examples_cache_reuses_prompts_and_keeps_results():
    tok = ByteTokenizer()
    built = collections.Counter()
    original = synthetic.TASKS["passkey"]

    def counting(rng, tokenizer, length, depth, filler):
        built[(length, depth)] += 1
        return original(rng, tokenizer, length, depth, filler)

    echo = lambda ids, n: list(ids[-n:])  # noqa: E731  (a wrong but deterministic "model")
    cache: dict = {}
    synthetic.TASKS["passkey"] = counting
    try:
        first = synthetic.evaluate_synthetic(
            echo, tok, "passkey", [300, 400], [0.5], 3, 0, progress=False, examples_cache=cache
        )
        second = synthetic.evaluate_synthetic(
            echo, tok, "passkey", [300, 400], [0.5], 3, 0, progress=False, examples_cache=cache
        )
        fresh = synthetic.evaluate_synthetic(echo, tok, "passkey", [300, 400], [0.5], 3, 0, progress=False)
    finally:
        synthetic.TASKS["passkey"] = original
    assert built == {(300, 0.5): 6, (400, 0.5): 6}  # 3 by the first call, none by the second, 3 by fresh
    assert first["by_length"] == second["by_length"] == fresh["by_length"]
    assert len(cache) == 6


def _three_models(rng, ppl_lengths, passkey_lengths, depths=(0.1, 0.9)):
    def metrics(scale):
        return {
            "short_ppl": float(scale * rng.uniform(5, 9)),
            "ppl_vs_length": {n: float(scale * rng.uniform(5, 40)) for n in ppl_lengths},
            "passkey": {n: float(rng.random()) for n in passkey_lengths},
            "cloze_acc": float(rng.random()),
            "synthetic": {
                "niah_single": {
                    "mean": 0.5,
                    "n": 2,
                    "by_length": {n: float(rng.random()) for n in passkey_lengths},
                    "by_length_depth": {n: {d: float(rng.random()) for d in depths} for n in passkey_lengths},
                }
            },
        }

    return {"teacher": metrics(1.0), "scaled": metrics(10.0), "restored": metrics(2.0)}


def test_report_draws_only_plots_with_something_to_show_and_the_loss_curve(tmp_path):
    rng = np.random.default_rng(41)
    results = _three_models(rng, ppl_lengths=[1024], passkey_lengths=[2048])  # one length each
    training = {"stage1": [{"step": s, "loss": float(3.0 / s), "lr": 1e-3} for s in (5, 10, 15)]}
    written = report.write_report(tmp_path / "one", results, training=training)
    pngs = {n for n in written if n.endswith(".png")}
    assert pngs == {"loss_curve.png"}  # single points and one-column heatmaps are tables only
    markdown = (tmp_path / "one" / "report.md").read_text()
    assert "## Training" in markdown and "| stage1 | 3 | 0.6 (step 5) | 0.2 (step 15) |" in markdown
    assert "![loss_curve.png](loss_curve.png)" in markdown and "| 2048 |" in markdown
    loaded = json.loads((tmp_path / "one" / "report.json").read_text())
    assert [r["step"] for r in loaded["training"]["stage1"]] == [5, 10, 15]

    results = _three_models(rng, ppl_lengths=[512, 1024, 2048], passkey_lengths=[1024, 2048])
    written = report.write_report(tmp_path / "many", results, training={"stage1": [{"step": 1, "loss": 2.0}]})
    pngs = {n for n in written if n.endswith(".png")}
    assert {"ppl_vs_length.png", "passkey_vs_length.png", "heatmap_niah_single_restored.png"} <= pngs
    assert "loss_curve.png" not in pngs  # one logged step


def test_summary_rows_and_recovery_cover_every_length():
    rng = np.random.default_rng(43)
    results = _three_models(rng, ppl_lengths=[512, 2048], passkey_lengths=[1024, 2048])
    rows = {label: (values, lower) for label, values, lower in report.summary_rows(results)}
    assert list(rows) == [
        "ppl (native length)",
        "ppl @ 512",
        "ppl @ 2048",
        "cloze acc",
        "passkey @ 1024",
        "passkey @ 2048",
        "niah_single @ 1024",
        "niah_single @ 2048",
    ]
    values, lower = rows["ppl @ 2048"]
    assert lower and values["restored"] == results["restored"]["ppl_vs_length"][2048]
    t, s, r = (values[k] for k in ("teacher", "scaled", "restored"))
    assert report.recovery(values, True) == pytest.approx((s - r) / (s - t))
    values, lower = rows["passkey @ 1024"]
    t, s, r = (values[k] for k in ("teacher", "scaled", "restored"))
    assert not lower and report.recovery(values, False) == pytest.approx((r - s) / (t - s))
    assert report.recovery({"teacher": 0.5, "scaled": 0.5, "restored": 0.9}, False) is None  # nothing lost
    assert report.recovery({"teacher": 1.0, "scaled": 2.0}, True) is None

    from lard_jax.evaluation import runner

    table = runner.format_table(results).splitlines()
    assert table[0].split() == ["metric", "teacher", "scaled", "restored", "recovery"]
    line = next(x for x in table if x.startswith("ppl @ 2048"))
    assert line.split()[-1] == f"{report.recovery(rows['ppl @ 2048'][0], True):.2f}"
    assert len(table) == 1 + len(rows)


def test_recovery_is_none_where_scaling_lost_nothing_and_lengths_merge_across_key_types():
    assert report.recovery({"teacher": 900.0, "scaled": 20.0, "restored": 15.0}, True) is None  # past the window
    assert report.recovery({"teacher": 0.0, "scaled": 0.3, "restored": 0.8}, False) is None
    assert report.recovery({"teacher": 10.0, "scaled": 30.0, "restored": 15.0}, True) == pytest.approx(0.75)
    results = {  # the teacher read back from report.json (string lengths), the others fresh (ints)
        "teacher": {"ppl_vs_length": {"2048": 10.0}, "passkey": {"1024": 1.0}},
        "scaled": {"ppl_vs_length": {2048: 20.0}, "passkey": {1024: 0.0}},
        "restored": {"ppl_vs_length": {2048: 12.0}, "passkey": {1024: 0.5}},
    }
    rows = report.summary_rows(results)
    assert [label for label, _, _ in rows] == ["ppl @ 2048", "passkey @ 1024"]
    assert rows[0][1] == {"teacher": 10.0, "scaled": 20.0, "restored": 12.0}


def test_one_length_several_needle_tasks_keep_each_tasks_depths_in_the_markdown(tmp_path):
    grid = lambda top, bottom: {1024: {0.1: top, 0.9: bottom}}  # noqa: E731
    metrics = {
        "synthetic": {
            "passkey": {"mean": 1.0, "by_length": {1024: 1.0}, "by_length_depth": grid(1.0, 1.0)},
            "niah_single": {"mean": 0.5, "by_length": {1024: 0.5}, "by_length_depth": grid(1.0, 0.0)},
        }
    }
    report.write_report(tmp_path, {"restored": metrics})
    markdown = (tmp_path / "report.md").read_text()
    niah = markdown.split("### Needle depth x length: niah_single, restored (%)")[1]
    assert niah.split("\n\n")[1].splitlines()[2:4] == ["| 10% | 100 |", "| 90% | 0 |"]
    assert "### Needle depth x length: restored (mean over needle tasks) (%)" in markdown
