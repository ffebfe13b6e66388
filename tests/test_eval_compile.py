"""Evaluation compiles once per shape and shares executables between models (issue 22, part 5).

The reference is the code before that change, kept in experiments/bench_eval_compile.py
(`legacy_*`): a new jit per model, widths in multiples of 64, full logits to the host.
"""

import os

import jax
import numpy as np
import pytest

from experiments import bench_eval_compile as bench
from lard_jax import compile_cache
from lard_jax import generate as gen
from lard_jax.evaluation import adapters
from lard_jax.evaluation import runner as eval_runner
from lard_jax.evaluation.perplexity import token_log_probs
from lard_jax.model import LlamaConfig, LlamaForCausalLM
from lard_jax.tokenizer import ByteTokenizer

CFG = LlamaConfig(
    vocab_size=259,  # the byte tokenizer's
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=10000.0,
    attention_impl="auto",
)
LINEAR = {"rope_type": "linear", "factor": 4.0}


@jax.jit
def _init(key):
    params = LlamaForCausalLM(CFG).init(key, np.zeros((1, 8), np.int32))["params"]
    return jax.tree_util.tree_map(lambda x: x * 6 if x.ndim == 2 else x, params)  # peaked logits


def _params(seed):
    return _init(jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def models():
    scaled_cfg = CFG.replace(rope_scaling=LINEAR, max_position_embeddings=256)
    return {
        "teacher": (LlamaForCausalLM(CFG), _params(0)),
        "scaled": (LlamaForCausalLM(scaled_cfg), _params(0)),
        "restored": (LlamaForCausalLM(scaled_cfg), _params(1)),
    }


def _docs(tokenizer, count=6, chars=700):
    return [tokenizer.encode(d, add_bos=True) for d in bench.random_docs(count, chars, seed=3)]


SPEC = eval_runner.EvalSpec(
    native_len=64,
    ppl_lengths=(64, 128),
    max_windows=4,
    passkey_lengths=(300,),
    passkey_samples=3,
    cloze_samples=4,
    batch_size=4,
    tasks=("short_ppl", "ppl_vs_length", "cloze", "passkey"),
)


def test_program_config_is_shared_only_where_the_computation_is():
    base = gen.program_config(CFG)
    assert hash(base) == hash(gen.program_config(CFG.replace(remat="full", lora_dropout=0.1)))
    # with the frequencies an argument, linear / dynamic / llama3 / default rope share programs
    for rope in (LINEAR, {"rope_type": "dynamic", "factor": 2.0}):
        assert gen.program_config(CFG.replace(rope_scaling=rope, max_position_embeddings=256)) == base
    # yarn's attention temperature is in the program: its own; so are other dtypes and impls
    yarn = CFG.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert gen.program_config(yarn) != base
    assert gen.program_config(yarn) != gen.program_config(CFG.replace(rope_scaling={"rope_type": "yarn", "factor": 2}))
    assert gen.program_config(CFG.replace(dtype="bfloat16")) != base
    assert gen.program_config(CFG.replace(attention_impl="xla")) != base
    assert [gen.bucket_length(n) for n in (1, 64, 65, 97, 129, 200, 8064, 8192, 8193, 32768)] == [
        64,
        64,
        96,
        128,
        192,
        256,
        8192,
        8192,
        12288,
        32768,
    ]


def test_restored_reuses_the_scaled_models_executables(models):
    tokenizer = ByteTokenizer()
    docs = _docs(tokenizer)
    counts, results = {}, {}
    for name in ("scaled", "restored", "teacher"):
        model, params = models[name]
        with compile_cache.CompileCounter() as counter:
            results[name] = eval_runner.evaluate_model(model, params, tokenizer, docs, SPEC, progress=False)
        counts[name] = counter.compiles
    assert counts["scaled"] > 0
    assert counts["restored"] == 0, counts  # equal config: nothing new to compile
    assert counts["teacher"] == 0, counts  # rope differs only in frequencies, an argument
    assert results["scaled"]["short_ppl"] != results["restored"]["short_ppl"]  # other params, other numbers
    # and nothing is shared where the computation differs
    yarn = LlamaForCausalLM(CFG.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    ids = np.random.default_rng(0).integers(3, 259, (2, 50)).astype(np.int32)
    with compile_cache.CompileCounter() as counter:
        got = adapters.logits_fn_for(yarn, models["scaled"][1])(ids)
    assert counter.compiles > 0
    np.testing.assert_array_equal(got, bench.legacy_logits_fn_for(yarn, models["scaled"][1])(ids))


def test_model_functions_equal_the_previous_path(models):
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 259, (3, 100)).astype(np.int32)  # width 128 in both paths (4 rows here)
    targets = rng.integers(0, CFG.vocab_size, ids.shape).astype(np.int32)
    for name in ("teacher", "scaled"):  # one program: the frequencies are an argument
        model, params = models[name]
        fn = adapters.logits_fn_for(model, params)
        legacy = bench.legacy_logits_fn_for(model, params)(ids)
        np.testing.assert_array_equal(fn(ids), legacy)
        log_probs, greedy = fn.token_scores(ids, targets)  # float32 on the device vs float64 on the host
        np.testing.assert_allclose(log_probs, token_log_probs(legacy, targets), rtol=2e-6, atol=2e-6)
        np.testing.assert_array_equal(greedy, legacy.argmax(-1) == targets)
    model, params = models["scaled"]
    prompts = [rng.integers(3, 259, n).tolist() for n in (5, 30, 17)]  # width and cache buckets 64 in both
    want = bench.legacy_greedy_generate(gen.linear_memory_model(model), params, prompts, 12)
    assert adapters.generate_fn_for(model, params).batch(prompts, 12) == want


def test_length_dependent_rope_is_padded_exactly():
    """dynamic NTK: the frequencies of the unpadded length come in as an argument, so padding the
    width to a bucket (which the previous path could not) keeps the logits."""
    model = LlamaForCausalLM(CFG.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    params = _params(2)
    ids = np.random.default_rng(2).integers(3, 259, (2, 90)).astype(np.int32)  # > max_position 64: theta grows
    np.testing.assert_allclose(
        adapters.logits_fn_for(model, params)(ids),
        bench.legacy_logits_fn_for(model, params)(ids),  # unpadded, frequencies of length 90
        rtol=1e-5,
        atol=1e-5,
    )


def test_evaluate_model_equals_the_previous_path(models):
    tokenizer = ByteTokenizer()
    docs = _docs(tokenizer)
    model, params = models["restored"]
    got = eval_runner.evaluate_model(model, params, tokenizer, docs, SPEC, progress=False)
    with bench.legacy_paths():
        want = eval_runner.evaluate_model(model, params, tokenizer, docs, SPEC, progress=False)
    assert got.keys() == want.keys()
    assert got["passkey"] == want["passkey"] and got["cloze_acc"] == want["cloze_acc"]
    assert got["synthetic"] == want["synthetic"]
    np.testing.assert_allclose(got["short_ppl"], want["short_ppl"], rtol=1e-6)
    for length, ppl in want["ppl_vs_length"].items():
        np.testing.assert_allclose(got["ppl_vs_length"][length], ppl, rtol=1e-6)


def test_the_compilation_cache_dir_is_filled(tmp_path):
    before = compile_cache.compilation_cache_dir()
    try:
        path = compile_cache.enable_compilation_cache(str(tmp_path))
        assert path == os.path.join(str(tmp_path), compile_cache.CACHE_SUBDIR)
        assert compile_cache.compilation_cache_dir() == path
        offset = float(np.random.default_rng().integers(1 << 20))  # a program no earlier test compiled
        with compile_cache.CompileCounter() as counter:
            jax.block_until_ready(jax.jit(lambda x: x * 3.0 + offset)(np.ones(7, np.float32)))
        assert counter.compiles == 1
        assert len(os.listdir(path)) > 0
    finally:
        if before:
            compile_cache.enable_compilation_cache(before, subdir="")
        else:
            compile_cache.disable_compilation_cache()
