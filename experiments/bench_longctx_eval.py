"""Long-context evaluation costs: KV-cache decoding vs full recomputation, and attention memory.

Three measurements, in one run, on random weights of any Llama shape:

1. decoding tokens/s: `lard_jax.generate.greedy_generate` (prefill once, then cached steps) vs
   `greedy_generate_recompute` (the whole sequence again per token), same prompt, same tokens
   (asserted), and their ratio;
2. compiled memory of one attention call, blockwise vs dense ("xla"), as T doubles
   (`compiled.memory_analysis()`: temp bytes and argument + output + temp as the peak), with the
   dense / blockwise ratio and each implementation's growth per doubling (2 = linear, 4 = quadratic);
3. prefill of the whole model at the given lengths (prompt -> KV cache + the last logits, the
   first half of greedy_generate) with `--prefill_impl`: seconds and compiled memory.

    python -m experiments.bench_longctx_eval                       # CPU, tiny width (docs/)
    python -m experiments.bench_longctx_eval --preset=llama2_7b --dtype=bfloat16 \\
        --prefill_lengths=32768,65536 --mem_lengths=4096,8192,16384,32768,65536 \\
        --decode_prompt=4096 --decode_new=128 --prefill_impl=auto --out=docs/bench_longctx_eval_gpu

Writes <out>.json and <out>.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lard_jax import attention as attn
from lard_jax import generate as gen
from lard_jax.model import LlamaConfig, LlamaForCausalLM, dtype_of
from lard_jax.presets import MODEL_SHAPES

PRESETS = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    "llama2_7b": MODEL_SHAPES["llama2_7b"],
    "llama3_8b": MODEL_SHAPES["llama3_8b"],
}


def _ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def _config(args) -> LlamaConfig:
    shape = dict(PRESETS[args.preset])
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return LlamaConfig(**shape, dtype=args.dtype, param_dtype=args.dtype)


def _random_params(cfg: LlamaConfig, seed: int):
    model = LlamaForCausalLM(cfg)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    params = init(jax.random.PRNGKey(seed))
    # larger than the init's 0.02 so greedy decoding does not collapse to one repeated token
    return jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 8 if x.ndim == 2 else x, p))(params)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + temp - m.alias_size_in_bytes)
    return {"temp_bytes": temp, "peak_bytes": peak}


def _time_cached(model, params, prompts, new_tokens, reps):
    out = gen.greedy_generate(model, params, prompts, new_tokens, batch_size=len(prompts))  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        again = gen.greedy_generate(model, params, prompts, new_tokens, batch_size=len(prompts))
        times.append(time.perf_counter() - t0)
    assert again == out
    return out, min(times)


def bench_decode(cfg, params, *, prompt_len, new_tokens, batch, reps, recompute: bool) -> dict:
    """Cached decoding at batch 1 (against recomputation, also batch 1) and at `batch`."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(max(batch, 1))]
    model = LlamaForCausalLM(cfg)
    out1, dt1 = _time_cached(model, params, prompts[:1], new_tokens, reps)
    res = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": batch,
        "cached_s": dt1,
        "cached_tokens_per_s": new_tokens / dt1,
    }
    if batch > 1:
        outb, dtb = _time_cached(model, params, prompts, new_tokens, reps)
        assert outb[0] == out1[0]
        res.update(batched_s=dtb, batched_tokens_per_s=batch * new_tokens / dtb)
    if recompute:
        gen.greedy_generate_recompute(model, params, prompts[0], 2)  # compile
        t0 = time.perf_counter()
        ref = gen.greedy_generate_recompute(model, params, prompts[0], new_tokens)
        dt = time.perf_counter() - t0
        res.update(
            recompute_s=dt,
            recompute_tokens_per_s=new_tokens / dt,
            same_tokens=ref == out1[0],
            speedup=res["cached_tokens_per_s"] / (new_tokens / dt),
        )
    return res


def bench_attention_memory(cfg, lengths, batch) -> list[dict]:
    rows = []
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dt = dtype_of(cfg.dtype)
    for t in lengths:
        q = jax.ShapeDtypeStruct((batch, t, h, d), dt)
        k = jax.ShapeDtypeStruct((batch, t, kv, d), dt)
        row = {"T": t}
        for impl in ("blockwise", "xla"):
            fn = jax.jit(lambda q, k, v, impl=impl: attn.attention(q, k, v, impl=impl))
            try:
                row[impl] = _memory(fn.lower(q, k, k).compile())
            except Exception as e:  # dense at long T can fail to compile on a small device
                row[impl] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        rows.append(row)
    for prev, row in zip(rows, rows[1:]):
        for impl in ("blockwise", "xla"):
            if "temp_bytes" in row[impl] and "temp_bytes" in prev[impl] and prev[impl]["temp_bytes"]:
                row[impl]["temp_growth"] = row[impl]["temp_bytes"] / prev[impl]["temp_bytes"]
    for row in rows:
        if "temp_bytes" in row["xla"] and "temp_bytes" in row["blockwise"]:
            row["dense_over_blockwise_temp"] = row["xla"]["temp_bytes"] / max(row["blockwise"]["temp_bytes"], 1)
    return rows


def bench_prefill(cfg, params, lengths, impl, reps) -> list[dict]:
    cfg = cfg.replace(attention_impl=impl)
    model = LlamaForCausalLM(cfg)
    rows = []
    for t in lengths:
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, t, cfg.head_dim)

        def prefill(params, ids):
            cache = {"k": jnp.zeros(shape, dtype_of(cfg.dtype)), "v": jnp.zeros(shape, dtype_of(cfg.dtype))}  # noqa: B023
            return model.apply({"params": params}, ids, cache=cache, logits_at=jnp.full((1, 1), t - 1))  # noqa: B023

        ids = jnp.asarray(np.random.default_rng(t).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
        try:
            compiled = jax.jit(prefill).lower(params, ids).compile()
        except Exception as e:
            rows.append({"T": t, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        jax.block_until_ready(compiled(params, ids))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, ids))
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "T": t,
                "impl": attn.resolve_impl(impl, dtype=dtype_of(cfg.dtype), head_dim=cfg.head_dim),
                "seconds": min(times),
                "tokens_per_s": t / min(times),
                **_memory(compiled),
            }
        )
    return rows


def _mib(x):
    return f"{x / 2**20:,.1f}" if isinstance(x, (int, float)) else "n/a"


def markdown(result) -> str:
    cfg, dec = result["config"], result["decode"]
    lines = [
        f"# Long-context evaluation costs ({result['device']})",
        "",
        f"Model: {result['preset']} shape, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} (q/kv), head_dim {cfg['head_dim']}, "
        f"vocab {cfg['vocab_size']}, {cfg['dtype']}, random weights. "
        f"`{result['command']}`",
        "",
        "## Greedy decoding: KV cache vs full recomputation",
        "",
        "| prompt | new tokens | cached tokens/s (batch 1) | recompute tokens/s (batch 1) | speedup "
        f"| same tokens | cached tokens/s (batch {dec['batch']}) |",
        "|---|---|---|---|---|---|---|",
        f"| {dec['prompt_len']} | {dec['new_tokens']} | {dec['cached_tokens_per_s']:,.1f} | "
        + (
            f"{dec['recompute_tokens_per_s']:,.1f} | {dec['speedup']:.1f}x | {dec['same_tokens']} | "
            if "recompute_s" in dec
            else "not run | | | "
        )
        + (f"{dec['batched_tokens_per_s']:,.1f} |" if "batched_s" in dec else "|"),
        "",
        "## One attention call: compiled memory, blockwise vs dense",
        "",
        f"Batch {result['mem_batch']}, q/kv heads and head_dim as above. temp = XLA's scratch; peak = "
        "arguments + outputs + temp. growth = temp(T) / temp(T/2): 2 is linear, 4 quadratic. Blockwise "
        "temp is a fixed tile scratch (block_q x block_k scores per head) plus a part linear in T, "
        "so its growth stays at or below 2.",
        "",
        "| T | blockwise temp MiB | blockwise peak MiB | growth | dense temp MiB | dense peak MiB | growth "
        "| dense / blockwise temp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["attention_memory"]:
        b, x = row["blockwise"], row["xla"]
        g = lambda r: f"{r['temp_growth']:.2f}" if "temp_growth" in r else ""  # noqa: E731
        ratio = f"{row['dense_over_blockwise_temp']:.1f}x" if "dense_over_blockwise_temp" in row else "n/a"
        lines.append(
            f"| {row['T']} | {_mib(b.get('temp_bytes'))} | {_mib(b.get('peak_bytes'))} | {g(b)} | "
            f"{_mib(x.get('temp_bytes'))} | {_mib(x.get('peak_bytes'))} | {g(x)} | {ratio} |"
        )
    if result["prefill"]:
        lines += [
            "",
            "## Prefill (prompt -> KV cache + last logits)",
            "",
            "| T | attention | seconds | tokens/s | temp MiB | peak MiB |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["prefill"]:
            if "error" in row:
                lines.append(f"| {row['T']} | {row['impl']} | {row['error']} | | | |")
            else:
                lines.append(
                    f"| {row['T']} | {row['impl']} | {row['seconds']:.3f} | {row['tokens_per_s']:,.0f} | "
                    f"{_mib(row['temp_bytes'])} | {_mib(row['peak_bytes'])} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        p.add_argument(f"--{key}", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode_prompt", type=int, default=1024)
    p.add_argument("--decode_new", type=int, default=32)
    p.add_argument("--decode_batch", type=int, default=4)
    p.add_argument("--no_recompute", action="store_true", help="skip the (slow) recomputation baseline")
    p.add_argument("--mem_lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--mem_batch", type=int, default=1)
    p.add_argument("--prefill_lengths", default="1024,4096")
    p.add_argument("--prefill_impl", default="blockwise")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="docs/bench_longctx_eval")
    args = p.parse_args(argv)

    cfg = _config(args)
    params = _random_params(cfg, 0)
    result = {
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s), "
        f"{platform.processor() or platform.machine()})",
        "jax": jax.__version__,
        "preset": args.preset,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "dtype",
            )
        },
        "command": "python -m experiments.bench_longctx_eval "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "mem_batch": args.mem_batch,
    }
    result["decode"] = bench_decode(
        cfg,
        params,
        prompt_len=args.decode_prompt,
        new_tokens=args.decode_new,
        batch=args.decode_batch,
        reps=args.reps,
        recompute=not args.no_recompute,
    )
    result["attention_memory"] = bench_attention_memory(cfg, _ints(args.mem_lengths), args.mem_batch)
    result["prefill"] = bench_prefill(cfg, params, _ints(args.prefill_lengths), args.prefill_impl, args.reps)
    text = markdown(result)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
