"""Seconds to evaluate one model, compilation included: teacher, RoPE-scaled and restored student.

    python3 -m experiments.bench_eval_compile --out $OUT/eval.json              # SmolLM2-135M shapes, 8K-32K (GPU)
    python3 -m experiments.bench_eval_compile --out $OUT/eval.json --before teacher   # + the old path, teacher only
    python -m experiments.bench_eval_compile --tiny --out /tmp/eval.json       # CPU, small shapes, seconds

Random weights of the named shape (SmolLM2-135M by default: vocab 49152, hidden 576, 30 layers, 9/3
heads, head_dim 64, tied embeddings, theta 1e5, native 8192); the scaled student is linear x4
(32768), the "restored" one has the scaled config and other parameters. Each model runs
`lard_jax.evaluation.runner.evaluate_model` with one EvalSpec (perplexity at `--ppl_lengths`, the
native-length perplexity, a held-out cloze, passkey and NIAH at `--lengths`) on random ASCII text
through the byte tokenizer, timed with its compilations (`lard_jax.compile_cache.CompileCounter`).

Paths, in this order in one process:
  after        the evaluation as it is: shared programs (parameters and RoPE frequencies are
               arguments), a fixed ladder of length buckets, batched decoding, log-probs on the
               device, JAX's persistent compilation cache in a fresh directory (`--cache_dir`);
  after_warm   the same in a second process that finds that cache filled (`--no_warm` skips it);
  before       the code before this change (`legacy_*` below: a new jit per model, widths in
               multiples of 64, one prompt per decode, one compile per (prompt, cache, new tokens)
               bucket, full logits to the host), persistent cache off; only for the models in
               `--before` (on the GPU the old path costs minutes per model).
The JSON (--out) has seconds, compiles, cache hits and compile seconds per path and model, each
path's results, the largest difference of the after path's metrics from the before path's, the
device, jax and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax import compile_cache
from lard_jax.evaluation import runner as eval_runner
from lard_jax.evaluation import tasks as tasks_lib
from lard_jax.generate import (
    LENGTH_DEPENDENT_ROPE,
    linear_memory_model,
    rope_inv_freq_for_lengths,
)
from lard_jax.model import LlamaConfig, LlamaForCausalLM, dtype_of
from lard_jax.presets import MODEL_SHAPES
from lard_jax.tokenizer import ByteTokenizer

SMOLLM2_135M = MODEL_SHAPES["smollm2_135m"]
TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    max_position_embeddings=256,
)
# (native, ppl lengths, passkey/NIAH lengths, samples per length, cloze samples, windows, niah tasks)
FULL_DEFAULTS = dict(
    native=8192,
    ppl_lengths="2048,8192,32768",
    lengths="8192,16384,32768",
    samples=12,
    cloze=64,
    max_windows=8,
    niah_tasks="niah_single,niah_multikey",
    dtype="bfloat16",
)
TINY_DEFAULTS = dict(
    native=256,
    ppl_lengths="256,512",
    lengths="512",
    samples=3,
    cloze=16,
    max_windows=4,
    niah_tasks="niah_single",
    dtype="float32",
)
MODELS = ("teacher", "scaled", "restored")


# ----------------------------------------------------------------------------- the code before
# lard_jax/evaluation/adapters.py and lard_jax/generate.py as they were (commit 17680dc): kept here
# as the baseline of this benchmark and the reference of tests/test_eval_compile.py.


def _legacy_bucket(model, length: int, multiple: int = 64) -> int:
    rope = model.config.rope_scaling_dict or {}
    if rope.get("rope_type") in LENGTH_DEPENDENT_ROPE:
        return length
    return -(-length // multiple) * multiple


def legacy_logits_fn_for(model, params):
    """The old adapters.logits_fn_for: a new jit per call (per model), widths in multiples of 64."""
    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids))

    def fn(input_ids):
        input_ids = np.asarray(input_ids, np.int32)
        t = input_ids.shape[1]
        width = _legacy_bucket(model, t)
        padded = np.zeros((input_ids.shape[0], width), np.int32)
        padded[:, :t] = input_ids
        return np.asarray(apply(params, padded))[:, :t]

    fn.max_length = model.config.max_position_embeddings
    return fn


@functools.lru_cache(maxsize=64)
def _legacy_compiled_generate(cfg: LlamaConfig, batch: int, width: int, cache_len: int, new_tokens: int):
    model = LlamaForCausalLM(cfg)
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cache_len, cfg.head_dim)

    def run(params, tokens, lengths, freq_prefill, freq_decode):
        cache = {"k": jnp.zeros(shape, dtype_of(cfg.dtype)), "v": jnp.zeros(shape, dtype_of(cfg.dtype))}
        logits, cache = model.apply(
            {"params": params}, tokens, cache=cache, rope_inv_freq=freq_prefill, logits_at=(lengths - 1)[:, None]
        )
        first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

        def step(carry, freq):
            token, cache, index = carry
            logits, cache = model.apply(
                {"params": params},
                token[:, None],
                positions=index[:, None],
                cache=cache,
                cache_index=index,
                rope_inv_freq=freq,
            )
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (nxt, cache, index + 1), nxt

        _, rest = jax.lax.scan(step, (first, cache, lengths), freq_decode)
        return jnp.concatenate([first[None], rest], axis=0).T

    return jax.jit(run)


def legacy_greedy_generate(model, params, prompts, max_new_tokens, *, batch_size: int = 8, bucket: int = 64):
    """The old generate.greedy_generate (no eos handling needed here)."""
    round_up = lambda x: -(-x // bucket) * bucket  # noqa: E731
    cfg = model.config.replace(remat="none") if model.config.remat != "none" else model.config
    out = []
    for first in range(0, len(prompts), batch_size):
        chunk = [list(map(int, p)) for p in prompts[first : first + batch_size]]
        rows = len(chunk) if len(prompts) <= batch_size else batch_size
        chunk_rows = chunk + [chunk[0]] * (rows - len(chunk))
        lengths = np.array([len(p) for p in chunk_rows], np.int32)
        width, cache_len = round_up(int(lengths.max())), round_up(int(lengths.max()) + max_new_tokens)
        tokens = np.zeros((rows, width), np.int32)
        for r, p in enumerate(chunk_rows):
            tokens[r, : len(p)] = p
        freq_prefill = rope_inv_freq_for_lengths(cfg, lengths)
        steps = lengths[None, :] + np.arange(max_new_tokens - 1)[:, None] + 1
        freq_decode = rope_inv_freq_for_lengths(cfg, steps)
        fn = _legacy_compiled_generate(cfg, rows, width, cache_len, max_new_tokens)
        new = np.asarray(
            fn(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(freq_prefill), jnp.asarray(freq_decode))
        )
        out += [new[r].tolist() for r in range(len(chunk))]
    return out


def legacy_generate_fn_for(model, params):
    """The old adapters.generate_fn_for: one prompt per call."""
    model = linear_memory_model(model)
    return lambda prompt_ids, max_new_tokens: legacy_greedy_generate(model, params, [prompt_ids], max_new_tokens)[0]


def legacy_ppl_vs_length(ctx) -> dict:
    """The old ppl_vs_length task: a quarter of the batch per call (the memory guard it needed)."""
    from lard_jax.evaluation import perplexity

    s = ctx.spec
    if not s.ppl_lengths:
        return {}
    fn = legacy_logits_fn_for(linear_memory_model(ctx.model), ctx.params)
    return {
        "ppl_vs_length": perplexity.perplexity_vs_length(
            fn,
            ctx.docs,
            list(s.ppl_lengths),
            max_windows=s.max_windows,
            batch_size=max(1, s.batch_size // 4),
            progress=ctx.progress,
        )
    }


@contextlib.contextmanager
def legacy_paths():
    """evaluate_model through the old model functions (the scorers then take their host paths:
    the old functions have no `token_scores` / `batch`)."""
    saved = tasks_lib.logits_fn_for, tasks_lib.generate_fn_for, tasks_lib.EVAL_TASKS["ppl_vs_length"]
    tasks_lib.logits_fn_for = legacy_logits_fn_for
    tasks_lib.generate_fn_for = lambda model, params, **_: legacy_generate_fn_for(model, params)
    tasks_lib.EVAL_TASKS["ppl_vs_length"] = legacy_ppl_vs_length
    try:
        yield
    finally:
        tasks_lib.logits_fn_for, tasks_lib.generate_fn_for, tasks_lib.EVAL_TASKS["ppl_vs_length"] = saved


# ----------------------------------------------------------------------------- the set-up


class AnyIdTokenizer(ByteTokenizer):
    """The byte tokenizer, decoding a random model's ids beyond its vocabulary as nothing."""

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        return super().decode(ids[ids < self.vocab_size])


def random_docs(count: int, chars: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(2000)]
    docs = []
    for _ in range(count):
        text, n = [], 0
        while n < chars:
            w = words[rng.integers(len(words))]
            text.append(w)
            n += len(w) + 1
        docs.append(" ".join(text) + ".")
    return docs


def build_models(
    shape: dict, dtype: str, attention_impl: str, factor: float, seed: int = 0, scan_layers: bool = False
) -> dict:
    """name -> (model, params): teacher; scaled (linear x factor, the teacher's params); restored
    (the scaled config, other params). `scan_layers`: stacked layers under nn.scan, as the
    pipeline's models run (its configs' default)."""
    teacher_cfg = LlamaConfig(
        **shape, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl, scan_layers=scan_layers
    )
    scaled_cfg = teacher_cfg.replace(
        rope_scaling={"rope_type": "linear", "factor": factor},
        max_position_embeddings=int(teacher_cfg.max_position_embeddings * factor),
    )
    teacher = LlamaForCausalLM(teacher_cfg)
    init = jax.jit(lambda key: teacher.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    params = init(jax.random.PRNGKey(seed))
    other = init(jax.random.PRNGKey(seed + 1))
    restored = jax.tree_util.tree_map(lambda a, b: (0.9 * a + 0.1 * b).astype(a.dtype), params, other)
    jax.block_until_ready(restored)
    return {
        "teacher": (teacher, params),
        "scaled": (LlamaForCausalLM(scaled_cfg), params),
        "restored": (LlamaForCausalLM(scaled_cfg), restored),
    }


def eval_spec(args) -> eval_runner.EvalSpec:
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    return eval_runner.EvalSpec(
        native_len=args.native,
        ppl_lengths=ints(args.ppl_lengths),
        max_windows=args.max_windows,
        passkey_lengths=ints(args.lengths),
        passkey_samples=args.samples,
        depths=(0.1, 0.5, 0.9),
        niah_lengths=ints(args.lengths),
        niah_tasks=tuple(t for t in args.niah_tasks.split(",") if t),
        cloze_samples=args.cloze,
        batch_size=args.batch,
        tasks=("short_ppl", "ppl_vs_length", "cloze", "passkey", "niah"),
    )


def run_path(models: dict, names, tokenizer, docs, spec) -> tuple[dict, dict]:
    """Per model: seconds, compilations and compile seconds in all, and the same per task (`tasks`),
    each task run on its own (`evaluate_model` with a one-task spec: the same programs and results),
    printed as it finishes so a cut run still says where the time went."""
    timings, results = {}, {}
    for name in names:
        model, params = models[name]
        t0 = time.perf_counter()
        results[name], per_task = {}, {}
        with compile_cache.CompileCounter() as counter:
            for task in spec.tasks:
                t_task = time.perf_counter()
                with compile_cache.CompileCounter() as task_counter:
                    one = dataclasses.replace(spec, tasks=(task,))
                    for key, value in eval_runner.evaluate_model(
                        model, params, tokenizer, docs, one, progress=False
                    ).items():
                        if isinstance(value, dict) and isinstance(results[name].get(key), dict):
                            results[name][key].update(value)
                        else:
                            results[name][key] = value
                per_task[task] = {"seconds": round(time.perf_counter() - t_task, 3), **task_counter.snapshot()}
                print(f"    {name}/{task}: {per_task[task]}", flush=True)
        timings[name] = {"seconds": round(time.perf_counter() - t0, 3), **counter.snapshot(), "tasks": per_task}
        print(f"  {name}: { {k: v for k, v in timings[name].items() if k != 'tasks'} }", flush=True)
    return timings, results


def _flat(results: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def largest_difference(a: dict, b: dict) -> dict:
    """Per model: the largest relative difference of a shared numeric metric, and which."""
    out = {}
    for name in a.keys() & b.keys():
        fa, fb = _flat(a[name]), _flat(b[name])
        worst, which = 0.0, None
        for key in fa.keys() & fb.keys():
            diff = abs(fa[key] - fb[key]) / max(abs(fb[key]), 1e-12)
            if diff > worst or which is None:
                worst, which = diff, key
        out[name] = {"max_rel_diff": worst, "metric": which}
    return out


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def print_table(paths: dict) -> None:
    print(f"{'path':12} {'model':10} {'seconds':>9} {'compiles':>9} {'cache_hits':>11} {'compile_s':>10}")
    for path, per_model in paths.items():
        for name, t in per_model.items():
            print(
                f"{path:12} {name:10} {t['seconds']:9.2f} {t['compiles']:9d} {t['cache_hits']:11d} "
                f"{t['compile_seconds']:10.2f}"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON of timings and results")
    p.add_argument("--tiny", action="store_true", help="small shapes and lengths (CPU, seconds)")
    p.add_argument("--models", default=",".join(MODELS), help="models of the after path, in order")
    p.add_argument("--before", default=None, help="models of the old path (default: all with --tiny, none otherwise)")
    p.add_argument("--no_warm", action="store_true", help="skip the second process on the filled cache")
    p.add_argument("--cache_dir", default="", help="persistent compilation cache ('' = a fresh temporary one)")
    p.add_argument("--native", type=int, default=None)
    p.add_argument("--ppl_lengths", default=None)
    p.add_argument("--lengths", default=None, help="passkey and NIAH lengths")
    p.add_argument("--samples", type=int, default=None, help="passkey / NIAH prompts per length (over 3 depths)")
    p.add_argument("--cloze", type=int, default=None, help="cloze questions")
    p.add_argument("--max_windows", type=int, default=None, help="perplexity windows per length")
    p.add_argument("--niah_tasks", default=None)
    p.add_argument("--dtype", default=None, help="compute and parameter dtype")
    p.add_argument("--batch", type=int, default=8, help="EvalSpec.batch_size (rows of a cloze / decode batch)")
    p.add_argument("--attention_impl", default="auto", help="the models' attention (auto: cuDNN on a GPU)")
    p.add_argument("--factor", type=float, default=4.0, help="linear RoPE factor of the students")
    p.add_argument("--loop_layers", action="store_true", help="per-layer models (default: scanned, as the pipeline)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    before = args.before if args.before is not None else (",".join(MODELS) if args.tiny else "")
    after_models = [m for m in args.models.split(",") if m]
    before_models = [m for m in before.split(",") if m]

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="jax_cc_")
    compile_cache.enable_compilation_cache(cache_dir, subdir="")
    shape = TINY if args.tiny else SMOLLM2_135M
    spec = eval_spec(args)
    tokenizer = AnyIdTokenizer()
    longest = max([spec.native_len, *spec.ppl_lengths, *spec.passkey_lengths])
    docs = [tokenizer.encode(d, add_bos=True) for d in random_docs(max(6, spec.max_windows + 2), longest + 64)]
    models = build_models(shape, args.dtype, args.attention_impl, args.factor, scan_layers=not args.loop_layers)
    out = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "command": "python3 -m experiments.bench_eval_compile " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": shape,
        "dtype": args.dtype,
        "attention_impl": args.attention_impl,
        "spec": {k: v for k, v in vars(spec).items() if k != "harness_tasks"},
        "cache_dir": cache_dir,
        "paths": {},
        "results": {},
    }

    print(f"after (shared programs, persistent cache {cache_dir}):", flush=True)
    out["paths"]["after"], out["results"]["after"] = run_path(models, after_models, tokenizer, docs, spec)
    out["cache_files"] = sum(len(files) for _, _, files in os.walk(cache_dir))
    if args.child:
        with open(args.out, "w") as f:
            json.dump(_json_safe(out), f, indent=2)
        return out

    if not args.no_warm:
        print("after_warm (a second process, the cache filled):", flush=True)
        child_out = args.out + ".warm.json"
        cmd = [sys.executable, "-m", "experiments.bench_eval_compile", *(sys.argv[1:] if argv is None else argv)]
        cmd += ["--child", "--cache_dir", cache_dir, "--out", child_out]
        subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
        with open(child_out) as f:
            child = json.load(f)
        os.remove(child_out)
        out["paths"]["after_warm"] = child["paths"]["after"]

    if before_models:
        compile_cache.disable_compilation_cache()
        print("before (the old path, no persistent cache):", flush=True)
        with legacy_paths():
            out["paths"]["before"], out["results"]["before"] = run_path(models, before_models, tokenizer, docs, spec)
        out["after_vs_before"] = largest_difference(out["results"]["after"], out["results"]["before"])

    print_table(out["paths"])
    if "after_vs_before" in out:
        print("after vs before, largest relative metric difference:", out["after_vs_before"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(_json_safe(out), f, indent=2)
    return out


if __name__ == "__main__":
    main()
