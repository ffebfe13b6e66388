"""lm-evaluation-harness: our "lard_jax" backend and our own scorer against the harness's `hf` backend.

The shipped tiny teacher is evaluated on local tasks written here in the harness's YAML style
(`dataset_path: json` over JSONL drawn at random for this run): a multiple-choice task in PIQA's
layout, a loglikelihood task (some with an empty context), a rolling-perplexity task with texts
longer than the model's 256 tokens, and a greedy generation task. Per-request log-likelihoods
must agree to 1e-4, accuracies and generations exactly. Set LARD_TEST_SEED to replay a run.
"""

import functools
import json
import os
import random
import textwrap

import numpy as np
import pytest
import torch

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip("lm_eval")

from lm_eval import utils as lm_eval_utils  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lard_jax import hf  # noqa: E402
from lard_jax.evaluation import lm_eval_backend, multiple_choice  # noqa: E402
from lard_jax.evaluation import runner as eval_runner  # noqa: E402
from lard_jax.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

TEACHER = os.path.join(os.path.dirname(__file__), os.pardir, "lard_jax", "assets", "tiny_teacher")
TEACHER = os.path.abspath(TEACHER)
SEED = int(os.environ.get("LARD_TEST_SEED") or random.SystemRandom().randrange(2**31))
TOL = 1e-4
WORDS = (
    "the of and to in is that for it as with was on be by this are from or an which can you "
    "function module file return value list string python object class name data type default "
    "package version system error use new example argument table number line each first"
).split()


def _text(rng, lo, hi):
    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(lo, hi)))]
    for i in range(3, len(words), int(rng.integers(4, 9))):
        words[i] += "."
    return " ".join(words)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    print(f"LARD_TEST_SEED={SEED}")
    rng = np.random.default_rng(SEED)
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    # PIQA layout; some goals run past the teacher's 256 tokens, so the harness truncates them.
    mc = [
        {"goal": _text(rng, 3, 70), "sol1": _text(rng, 1, 5), "sol2": _text(rng, 1, 5), "label": int(rng.integers(2))}
        for _ in range(16)
    ]
    ll = [{"context": "" if i % 4 == 0 else _text(rng, 2, 40), "target": _text(rng, 1, 4)} for i in range(12)]
    ppl = [{"text": _text(rng, 2, 130)} for _ in range(8)]  # up to ~900 tokens: several windows
    gen = [{"prompt": _text(rng, 2, 9), "answer": str(rng.choice(WORDS))} for _ in range(6)]
    for name, records in (("mc", mc), ("ll", ll), ("ppl", ppl), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    specs = {
        "lard_mc": (
            "mc",
            """
            output_type: multiple_choice
            doc_to_text: "Question: {{goal}}\\nAnswer:"
            doc_to_target: label
            doc_to_choice: "{{[sol1, sol2]}}"
            metric_list: [{metric: acc}, {metric: acc_norm}]""",
        ),
        "lard_ll": (
            "ll",
            """
            output_type: loglikelihood
            doc_to_text: "{{context}}"
            doc_to_target: "{{target}}"
            metric_list: [{metric: perplexity}, {metric: acc}]""",
        ),
        "lard_ppl": (
            "ppl",
            """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]""",
        ),
        "lard_gen": (
            "gen",
            """
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs: {until: ["."], max_gen_toks: 12, do_sample: false}
            metric_list: [{metric: exact_match}]""",
        ),
    }
    for task, (data, body) in specs.items():
        (d / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / data}.jsonl\n"
            f"  cache_dir: {d / 'datasets_cache'}\ntest_split: test\n{textwrap.dedent(body).strip()}\n"
        )
    tasks = ["lard_mc", "lard_ll", "lard_ppl", "lard_gen"]
    manager = TaskManager(include_path=str(d), include_defaults=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: torch's thread pool only costs time on a shared machine
    try:
        hf_lm = HFLM(pretrained=TEACHER, dtype="float32", device="cpu", batch_size=4)
        ours = lm_eval_backend.LardJaxLM(pretrained=TEACHER, batch_size=4)
        results = {}
        for name, lm in (("hf", hf_lm), ("lard_jax", ours)):
            results[name] = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="WARNING"
            )
    finally:
        torch.set_num_threads(threads)
    return {"dir": d, "ppl": ppl, "gen": gen, "hf_lm": hf_lm, "ours": ours, "results": results}


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _lls(results, task):
    """Per-request log-likelihoods, in request order."""
    out = []
    for sample in _samples(results, task):
        for resp in sample["resps"]:
            value = resp[0]
            out.append(float(value[0] if isinstance(value, (tuple, list)) else value))
    return np.array(out)


@pytest.mark.parametrize("task", ["lard_mc", "lard_ll", "lard_ppl"])
def test_loglikelihoods_match_hf_backend(setup, task):
    hf_ll, ours_ll = (_lls(setup["results"][k], task) for k in ("hf", "lard_jax"))
    assert len(hf_ll) == len(ours_ll) > 0
    diff = np.abs(hf_ll - ours_ll)
    tol = np.full(len(diff), TOL)
    if task == "lard_ppl":
        # Two float32 implementations differ by up to ~3e-5 per token (logits by up to 3e-5), and a
        # rolling request sums hundreds of tokens: over 96 random 256-token windows the sums
        # differed by 0.8e-4 (median) to 2.7e-4 (max). Allowed: 1e-4 per 32 scored tokens.
        tokens = [len(multiple_choice.encode(setup["ours"].tokenizer, doc["text"])) for doc in setup["ppl"]]
        tol = TOL * np.maximum(1.0, np.array(tokens) / 32)
        print(f"{task}: {max(tokens)} tokens at most")
    print(f"{task}: {len(hf_ll)} requests, max |ll_hf - ll_lard_jax| = {diff.max():.2e} (seed {SEED})")
    assert np.all(diff < tol), f"seed {SEED}: {diff} vs {tol}"
    if task == "lard_ll":  # greedy flags too
        greedy = [[bool(r[0][1]) for r in s["resps"]] for s in _samples(setup["results"]["hf"], task)]
        assert greedy == [[bool(r[0][1]) for r in s["resps"]] for s in _samples(setup["results"]["lard_jax"], task)]


def _near_tie(sample_lls):
    top = np.sort(sample_lls)[-2:]
    return top[1] - top[0] < 10 * TOL


def test_metrics_match_hf_backend(setup):
    hf_res, ours = (setup["results"][k]["results"] for k in ("hf", "lard_jax"))
    for task, metrics in (
        ("lard_mc", ("acc,none", "acc_norm,none")),
        ("lard_ll", ("acc,none",)),
        ("lard_ppl", ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")),
        ("lard_gen", ("exact_match,none",)),
    ):
        for metric in metrics:
            if task == "lard_mc" and any(
                _near_tie([r[0][0] for r in s["resps"]]) for s in _samples(setup["results"]["hf"], task)
            ):
                continue  # an argmax within float noise may flip; the per-request check still holds
            assert ours[task][metric] == pytest.approx(hf_res[task][metric], rel=1e-4), (task, metric, SEED)
    hf_text = [s["resps"][0][0] for s in _samples(setup["results"]["hf"], "lard_gen")]
    ours_text = [s["resps"][0][0] for s in _samples(setup["results"]["lard_jax"], "lard_gen")]
    assert ours_text == hf_text, f"seed {SEED}"


def test_generation_without_kv_cache_agrees(setup, monkeypatch):
    """The full-recompute fallback (no lard_jax.generate) decodes the same text as the cached path."""
    ours = setup["ours"]
    prompts = [multiple_choice.encode(ours.tokenizer, doc["prompt"]) for doc in setup["gen"][:4]]
    cached = ours._greedy(prompts, 12, ["."])
    monkeypatch.setattr(lm_eval_backend, "greedy_generate", None)
    assert ours._greedy(prompts, 12, ["."]) == cached
    hf_text = [s["resps"][0][0] for s in _samples(setup["results"]["hf"], "lard_gen")][:4]
    assert cached == hf_text, f"seed {SEED}"


def test_our_scorer_defaults_match_harness_defaults(setup):
    """multiple_choice.score_task / loglikelihoods with their defaults give the hf backend's numbers."""
    model, params = hf.load_pretrained(TEACHER)
    logits_fn = eval_runner.logits_fn_for(model, params)
    tokenizer = load_tokenizer(TEACHER)
    path = setup["dir"] / "mc.jsonl"
    examples = multiple_choice.read_task("piqa", path)
    requests = [r for e in examples for r in e.requests]
    # batch_size / pad_to_multiple only shape the model calls (fewer compiles); conventions are the defaults
    fast = {"batch_size": 16, "pad_to_multiple": 128, "progress": False}
    ours = np.array([ll for ll, _ in multiple_choice.loglikelihoods(logits_fn, tokenizer, requests, **fast)])
    hf_ll = _lls(setup["results"]["hf"], "lard_mc")
    diff = float(np.max(np.abs(ours - hf_ll)))
    print(f"multiple_choice.loglikelihoods vs hf: max diff {diff:.2e} (seed {SEED})")
    assert diff < TOL, f"seed {SEED}"
    metrics = multiple_choice.score_examples("piqa", examples, logits_fn, tokenizer, **fast)
    hf_metrics = setup["results"]["hf"]["results"]["lard_mc"]
    if not any(_near_tie(ours[i : i + 2]) for i in range(0, len(ours), 2)):
        assert metrics["acc"] == pytest.approx(hf_metrics["acc,none"])
        assert metrics["acc_norm"] == pytest.approx(hf_metrics["acc_norm,none"])
    # the overrides are honoured: without the bos, or truncated harder, short requests score differently
    rng = np.random.default_rng(SEED + 3)
    short = [(f"Question: {_text(rng, 4, 8)}\nAnswer:", " " + _text(rng, 1, 3)) for _ in range(4)]
    default = [ll for ll, _ in multiple_choice.loglikelihoods(logits_fn, tokenizer, short, **fast)]
    for options in ({"add_bos": "never"}, {"max_length": 16}):
        other = multiple_choice.loglikelihoods(logits_fn, tokenizer, short, **fast, **options)
        assert not np.allclose([ll for ll, _ in other], default), options


def test_tokenisation_matches_harness_for_every_bos_mode(setup):
    rng = np.random.default_rng(SEED + 1)
    hf_lm, tokenizer = setup["hf_lm"], setup["ours"].tokenizer
    pairs = [(_text(rng, 1, 8) + " " * int(rng.integers(0, 3)), " " + _text(rng, 1, 4)) for _ in range(20)]
    pairs += [("<s>" + _text(rng, 1, 5), " x"), ("", " leading"), ("", "<s>bos-like")]
    saved = hf_lm.add_bos_token
    # the byte tokenizer, and the same vocabulary through the transformers adapter (HFTokenizer)
    for ours in (tokenizer, HFTokenizer(hf_lm.tokenizer, fingerprint="test")):
        try:
            for harness_flag, mode in ((None, "tokenizer"), (True, "always"), (False, "never")):
                hf_lm.add_bos_token = harness_flag
                for context, continuation in pairs:
                    theirs = (
                        hf_lm._encode_pair(context, continuation)
                        if context
                        else _empty_context_pair(hf_lm, continuation)
                    )
                    assert multiple_choice._encode_pair(ours, context, continuation, mode) == tuple(
                        map(list, theirs)
                    ), (type(ours), mode, context, continuation)
                    text = context + continuation
                    assert multiple_choice.encode(ours, text, mode) == hf_lm.tok_encode(text), (type(ours), mode, text)
        finally:
            hf_lm.add_bos_token = saved


def _empty_context_pair(hf_lm, continuation):
    # lm_eval.api.model.TemplateLM.loglikelihood's rule for an empty context
    cont = hf_lm.tok_encode(continuation, add_special_tokens=False)
    if cont[0] != hf_lm.prefix_token_id:
        return [hf_lm.prefix_token_id], cont
    return cont[:1], cont[1:]


def test_rolling_windows_are_the_harness_windows():
    rng = np.random.default_rng(SEED + 2)
    for _ in range(50):
        tokens = rng.integers(3, 200, size=int(rng.integers(0, 60))).tolist()
        max_length = int(rng.integers(1, 20))
        theirs = [
            lm_eval_utils.make_disjoint_window(w)
            for w in lm_eval_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=1, max_seq_len=max_length, context_len=1
            )
        ]
        assert multiple_choice.rolling_requests(tokens, 1, max_length) == [tuple(map(list, w)) for w in theirs]


def test_model_args_rope_scaling_and_defaults():
    lm = lm_eval_backend.LardJaxLM(
        pretrained=TEACHER, rope_scaling='{"rope_type": "linear", "factor": 4.0}', max_length=1024, batch_size="auto"
    )
    assert lm.model.config.rope_scaling_dict["factor"] == 4.0 and lm.max_length == 1024 and lm.batch_size == 8
    lm = lm_eval_backend.LardJaxLM(pretrained=TEACHER, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert lm.model.config.rope_scaling_dict["factor"] == 2.0 and lm.max_length == 256  # config.json's
    assert lm_eval_backend.LardJaxLM(pretrained=TEACHER, rope_scaling="native").model.config.rope_scaling is None
    with pytest.raises(ValueError, match="unknown model_args"):
        lm_eval_backend.LardJaxLM(pretrained=TEACHER, rope_sclaing="native")
    with pytest.raises(ValueError, match="add_bos"):
        lm_eval_backend.LardJaxLM(pretrained=TEACHER, add_bos="sometimes")


def test_command_line_entry_point(setup, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lm_eval_backend"])
    # The CLI indexes every built-in task (20 s); only the local ones are needed here.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    lm_eval_backend.main(
        [
            "--model_args",
            f"pretrained={TEACHER},max_length=128",
            "--batch_size",
            "2",
            "--tasks",
            "lard_mc",
            "--include_path",
            str(setup["dir"]),
            "--limit",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    [result_file] = [
        os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "out") for f in fs if f.startswith("results")
    ]
    with open(result_file) as f:
        report = json.load(f)
    assert report["results"]["lard_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert report["config"]["model"] == "lard_jax"
