"""Where batched greedy decoding spends its time: prefill and the cached decode loop, timed apart.

    python -m experiments.bench_generate --out docs/raw/bench_generate.json

Random weights of SmolLM2-135M's shape (the real Table 1 model), scanned layers, bfloat16,
`attention_impl="auto"` as the evaluation runs it; `--rows` prompts of (length - new tokens)
random ids per length, as passkey / NIAH build them. For each length: the prefill alone, the
prefill plus a decode loop of 2 and of `--new_tokens` steps (the per-step cost is their
difference), and the whole `greedy_generate` call; compile excluded (each shape runs once first).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax.generate import (
    _decoding_programs,
    bucket_length,
    greedy_generate,
    program_config,
    rope_inv_freq_for_lengths,
)
from lard_jax.model import LlamaConfig, LlamaForCausalLM
from lard_jax.presets import MODEL_SHAPES


def _median_s(fn, reps: int) -> float:
    fn()  # compile / warm
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def time_length(model, params, prefill, decode, rng, length: int, rows: int, n_new: int, reps: int) -> dict:
    """One length: prefill alone, prefill + 2 and + n_new decode steps, the whole greedy_generate."""
    cfg = model.config
    prompt_len = length - n_new
    prompts = [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(rows)]
    lengths = np.full(rows, prompt_len, np.int32)
    width, cache_len = bucket_length(prompt_len), bucket_length(length)
    tokens = np.pad(np.asarray(prompts, np.int32), ((0, 0), (0, width - prompt_len)))
    freq = rope_inv_freq_for_lengths(cfg, lengths)
    cap = max(128, 1 << max(n_new - 1, 0).bit_length())
    freq_decode = rope_inv_freq_for_lengths(cfg, np.broadcast_to(lengths, (cap - 1, rows)))

    def run_prefill():
        return jax.block_until_ready(prefill(params, tokens, lengths, freq, cache_len=cache_len))

    def run_both(steps):
        def f():
            first, cache = prefill(params, tokens, lengths, freq, cache_len=cache_len)
            return jax.block_until_ready(decode(params, first, cache, lengths, freq_decode, np.int32(steps)))

        return f

    t_prefill = _median_s(run_prefill, reps)
    t_2 = _median_s(run_both(2), reps)
    t_n = _median_s(run_both(n_new), reps)
    t_gen = _median_s(lambda: greedy_generate(model, params, prompts, n_new, batch_size=rows), reps)
    per_step = (t_n - t_2) / max(n_new - 2, 1)
    kv_bytes = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * cache_len * cfg.head_dim * 2
    return {
        "length": length,
        "rows": rows,
        "new_tokens": n_new,
        "prefill_s": t_prefill,
        "prefill_decode2_s": t_2,
        f"prefill_decode{n_new}_s": t_n,
        "decode_step_ms": 1e3 * per_step,
        "kv_cache_gib": kv_bytes / 2**30,
        "decode_step_gbps_kv_read": kv_bytes / max(per_step, 1e-9) / 1e9,
        "greedy_generate_s": t_gen,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2_135m", choices=sorted(MODEL_SHAPES))
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention_impl", default="auto")
    p.add_argument("--max_position_embeddings", type=int, default=32768)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    shape = dict(MODEL_SHAPES[a.shape], max_position_embeddings=a.max_position_embeddings)
    cfg = LlamaConfig(**shape, dtype=a.dtype, param_dtype=a.dtype, attention_impl=a.attention_impl, scan_layers=True)
    model = LlamaForCausalLM(cfg)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.PRNGKey(0))
    prefill, decode = _decoding_programs(program_config(cfg))
    rng = np.random.default_rng(0)
    results = []
    for length in [int(x) for x in a.lengths.split(",")]:
        row = time_length(model, params, prefill, decode, rng, length, a.rows, a.new_tokens, a.reps)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'length':>7} {'rows':>4} {'prefill s':>9} {'decode ms/step':>14} {'KV GB/s':>8} {'generate s':>10}")
    for r in results:
        print(
            f"{r['length']:>7} {r['rows']:>4} {r['prefill_s']:>9.3f} {r['decode_step_ms']:>14.2f}"
            f" {r['decode_step_gbps_kv_read']:>8.0f} {r['greedy_generate_s']:>10.3f}"
        )
    if a.out:
        meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "args": vars(a)}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
