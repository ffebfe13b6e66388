"""Pretrains the project's tiny LLaMA-architecture teacher on the registry-only corpus.

The README's demo needs a teacher whose RoPE can be scaled and then repaired: a byte-level model
with a short native context (256 tokens), trained on real English (experiments/build_corpus.py)
plus a little synthetic passkey retrieval. The checkpoint is written in Hugging Face format
(config.json, model.safetensors, tokenizer files) with a model card and a training log.

    python -m experiments.build_corpus --out .corpus
    python -m experiments.pretrain_teacher --corpus .corpus --out /tmp/teacher --minutes 5

Training is the library's: method `lm` (lard_jax.methods.lm: next-token cross entropy, no
teacher) with every parameter trainable (projection set "all", an empty frozen tree),
`trainer.make_train_step` / `TrainState` / `make_optimizer`, the state placed and the step jitted
on a lard_jax.sharding mesh (`trainer.init_state`, `trainer.jit_step`; data parallel over all
devices). Batches are sampled on the device (random windows of the packed training stream, rows of
a pre-built passkey pool, lard_jax.evaluation.synthetic.passkey_windows) inside a `lax.scan` of
`--steps-per-call` library steps, so a ~4M-parameter model is not starved by the host. A window of
T + 1 tokens trains at exactly T positions (input_ids = window[:-1], targets = window[1:]).

Training is sized by wall-clock time: after compiling, one chunk of steps is timed and the cosine
schedule is fixed to the number of steps that fit in `--minutes`. The library's schedule closes
over its length, so the step is then rebuilt with it and compiled once more (not timed).

Schedule: `trainer.make_optimizer` (global-norm clipping at 1.0, AdamW b1 0.9, b2 0.95, decoupled
weight decay scaled by the learning rate), warmup lr * step / warmup, i.e. 0 at step 0, then cosine
to `--final-lr-fraction` of the peak. The shipped teacher (lard_jax/assets/tiny_teacher) was
trained by this script's earlier, hand-written loop, whose warmup was lr * (step + 1) / warmup:
the same schedule one step earlier during warmup, identical after it; everything else (data,
initialisation, optimizer, loss) is the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lard_jax import hf, trainer
from lard_jax import sharding as sharding_lib
from lard_jax.data import jsonl_records
from lard_jax.evaluation.synthetic import passkey_windows
from lard_jax.model import LlamaConfig, LlamaForCausalLM
from lard_jax.sources import BUILTIN_SOURCES  # the held-out documents the demo can rebuild anywhere
from lard_jax.tokenizer import ByteTokenizer

# Raw uint32 keys where this jax still has them (flax and the jit signature then match across
# jax 0.10 and 0.11); typed keys otherwise.
_prng_key = getattr(jax.random, "PRNGKey", None) or jax.random.key

# ----------------------------------------------------------------------------- passkey retrieval
# The demo measures passkey retrieval at 4x the native length (Mohtashami & Jaggi 2023's test, as
# the LinearARD paper uses): with unscaled RoPE the far positions are unseen, with scaled RoPE they
# map back into range. A model this small learns no retrieval from prose alone, so ~8% of each
# batch is the same task at the native length (synthetic.make_passkey_window: noise sentences, the
# needle at a random depth, the question and its answer at the end); the scaled student then has
# something to keep.


def passkey_batch(seed: int, count: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [count, n_tokens], answer positions [count, 5]) of byte-token passkey windows."""
    return passkey_windows(seed, count, n_tokens, ByteTokenizer())


# ----------------------------------------------------------------------------- data


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSONL file (lard_jax.data.jsonl_records: errors name the file and line)."""
    return [record for _, record in jsonl_records(path)]


def token_stream(docs: list[dict], tokenizer: ByteTokenizer) -> np.ndarray:
    """Documents packed as bos + bytes + eos, one after another (windows may cross documents)."""
    eos = np.asarray([tokenizer.eos_id], np.uint16)
    parts = []
    for doc in docs:
        parts += [tokenizer.encode_array(doc["text"], add_bos=True), eos]
    return np.concatenate(parts).astype(np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping [seq_len + 1] windows: every token but each window's first is predicted once."""
    n = (len(stream) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    return stream[idx]


# ----------------------------------------------------------------------------- training
LOSS = trainer.LossSpec(method="lm")  # next-token cross entropy of the model alone
LORA = trainer.LoraSpec()  # no LoRA: full weights
ADAM_B1, ADAM_B2, CLIP = 0.9, 0.95, 1.0


def make_optimizer(args, total_steps: int):
    """The library's optimizer and schedule (trainer.make_optimizer) for `total_steps` steps."""
    return trainer.make_optimizer(
        lr=args.lr,
        warmup_steps=args.warmup,
        total_steps=total_steps,
        min_lr_ratio=args.final_lr_fraction,
        clip=CLIP,
        weight_decay=args.weight_decay,
        b1=ADAM_B1,
        b2=ADAM_B2,
    )


def make_train_chunk(
    model, optimizer, schedule, state, mesh, *, steps: int, batch: int, seq_len: int, passkey_rows: int
):
    """chunk(state, frozen, key, stream, pool) -> (state, metrics): `steps` library train steps
    (trainer.make_train_step, method `lm`) in one jitted call, batches sampled on the device;
    jitted by trainer.jit_step (the state donated, kept in its shardings)."""
    text_rows = batch - passkey_rows
    train_step = trainer.make_train_step(model, model, LOSS, LORA, optimizer, schedule)  # no teacher runs
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))

    def sample(key, stream, pool):
        """One micro-batch [1, batch, seq_len]: random text windows, then passkey rows."""
        k_text, k_pool = jax.random.split(key)
        starts = jax.random.randint(k_text, (text_rows,), 0, stream.shape[0] - seq_len - 1)
        windows = stream[starts[:, None] + jnp.arange(seq_len + 1)[None]]
        if passkey_rows:
            picked = jax.random.randint(k_pool, (passkey_rows,), 0, pool.shape[0])
            windows = jnp.concatenate([windows, pool[picked]], axis=0)
        windows = jax.lax.with_sharding_constraint(windows[None], rows)
        return {"input_ids": windows[..., :-1], "targets": windows[..., 1:]}

    def chunk(state, frozen, key, stream, pool):
        def one(state, k):
            return train_step(state, frozen, sample(k, stream, pool))

        state, metrics = jax.lax.scan(one, state, jax.random.split(key, steps))
        return state, {
            "loss": metrics["loss"].mean(),
            "grad_norm": metrics["grad_norm"].mean(),
            "lr": metrics["lr"][-1],
        }

    return trainer.jit_step(chunk, state)


def make_evaluators(model, batch: int):
    @jax.jit
    def window_nll(params, windows):
        logits = model.apply({"params": params}, windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).sum(axis=-1)

    @jax.jit
    def predictions(params, ids):
        return jnp.argmax(model.apply({"params": params}, ids), axis=-1)

    def mean_nll(params, windows: np.ndarray) -> float:
        total = 0.0
        for i in range(0, len(windows), batch):
            part = windows[i : i + batch]
            padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])  # one shape
            total += float(np.asarray(window_nll(params, jnp.asarray(padded)))[: len(part)].sum())
        return total / (len(windows) * (windows.shape[1] - 1))

    def passkey_accuracy(params, ids: np.ndarray, answers: np.ndarray) -> float:
        hits = []
        for i in range(0, len(ids), batch):
            pred = np.asarray(predictions(params, jnp.asarray(ids[i : i + batch, :-1])))
            rows = np.arange(len(pred))[:, None]
            targets = ids[i : i + batch][rows, answers[i : i + batch]]
            hits.append(np.all(pred[rows, answers[i : i + batch] - 1] == targets, axis=1))
        return float(np.concatenate(hits).mean())

    return mean_nll, passkey_accuracy


# ----------------------------------------------------------------------------- outputs


def write_model_card(path: str, info: dict) -> None:
    c, r = info["config"], info["results"]
    sources = "\n".join(
        f"| {name} | {s['documents']} | {s['bytes']:,} |" for name, s in info["corpus"]["sources"].items()
    )
    splits = "\n".join(
        f"| {name} | {s['documents']} | {s['bytes']:,} | `{s['sha256']}` |"
        for name, s in info["corpus"]["splits"].items()
    )
    probes = "\n".join(f"| {k} | {v:.4g} |" for k, v in r.items())
    card = f"""# lard_jax tiny teacher

A {info["num_params"] / 1e6:.2f}M-parameter LLaMA-architecture causal LM over UTF-8 bytes (vocabulary
{c["vocab_size"]}: 0 pad, 1 bos, 2 eos, byte b -> b + 3), pretrained from scratch by
`experiments/pretrain_teacher.py` so that the LinearARD demo needs no model or dataset hub.
Native context: **{c["max_position_embeddings"]} tokens** (bytes), RoPE theta {c["rope_theta"]:g}, no RoPE scaling.

Architecture: hidden {c["hidden_size"]}, {c["num_hidden_layers"]} layers, {c["num_attention_heads"]} query heads and
{c["num_key_value_heads"]} key/value heads of dim {c["head_dim"]}, SwiGLU MLP {c["intermediate_size"]}, RMSNorm,
untied embeddings; weights stored in float32.

## Data
Built by `python -m experiments.build_corpus` from Python's bundled documentation and Debian text packages
(see that module's docstring); split by document, {info["corpus"]["heldout_per_10k"] / 100:g}% of documents held out
by a hash of their id, training paragraphs that repeat held-out text removed.

| source | documents | bytes |
| --- | --- | --- |
{sources}

| split | documents | bytes | sha256 |
| --- | --- | --- | --- |
{splits}

About {info["passkey_fraction"]:.0%} of each batch is synthetic passkey retrieval at the native length
(`lard_jax.evaluation.synthetic.make_passkey_window`: filler sentences, "The pass key is NNNNN.
Remember it. NNNNN is the pass key.", then "What is the pass key? The pass key is NNNNN."), so that
the demo's passkey test at 4x the native length has a skill to lose and to restore.

## Training
AdamW (b1 {info["adam_b1"]}, b2 {info["adam_b2"]}, weight decay {info["weight_decay"]}), peak learning rate
{info["peak_lr"]}, {info["warmup_steps"]} warmup steps then cosine to {info["final_lr_fraction"]:g} of peak, gradient
clipping at 1.0, bfloat16 compute with float32 parameters. Batch {info["batch"]} x {info["seq_len"]} tokens,
**{info["steps"]} steps, {info["tokens_seen"]:,} tokens** ({info["tokens_seen"] / max(info["corpus"]["splits"]["train"]["bytes"], 1):.1f}
passes over the training split) in {info["train_seconds"]:.0f} s on {info["device"]}
({info["tokens_per_second"]:,.0f} tokens/s).

## Results
Perplexity is per byte token at the native length (non-overlapping windows); passkey accuracy counts
prompts whose five answer digits are all the argmax predictions.

| metric | value |
| --- | --- |
{probes}

Made with:

    {info["command"]}
"""
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(card)


def save_checkpoint(path: str, config: LlamaConfig, params, tokenizer: ByteTokenizer) -> None:
    # Stored with float32 compute in config.json: bfloat16 was a training-time choice only.
    model = LlamaForCausalLM(config.replace(dtype="float32", param_dtype="float32"))
    hf.save_pretrained(path, model, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with open(config_path, "w") as f:
        json.dump(hf_config, f, indent=2)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="directory written by experiments.build_corpus")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget (compile excluded)")
    p.add_argument("--steps", type=int, default=0, help="fixed number of steps instead of --minutes")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256, help="native context = max_position_embeddings")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    # 576 = 2.25 x hidden keeps float32 weights (~4M parameters) under the 16 MiB a file can travel.
    p.add_argument("--intermediate", type=int, default=576)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--final-lr-fraction", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--passkey-fraction", type=float, default=0.08)
    p.add_argument("--passkey-pool", type=int, default=50_000, help="distinct passkey prompts to sample from")
    p.add_argument("--steps-per-call", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10, help="held-out probe every N calls")
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=0, help="cap on held-out windows (0: all; for smoke tests)")
    p.add_argument("--compute-dtype", default="auto", help="auto = bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = "python -m experiments.pretrain_teacher " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    backend = jax.default_backend()
    compute_dtype = (
        args.compute_dtype if args.compute_dtype != "auto" else ("float32" if backend == "cpu" else "bfloat16")
    )
    device = str(jax.devices()[0].device_kind) if hasattr(jax.devices()[0], "device_kind") else backend
    print(f"jax {jax.__version__} on {backend} ({device}); compute {compute_dtype}", flush=True)

    tokenizer = ByteTokenizer()
    with open(os.path.join(args.corpus, "manifest.json")) as f:
        manifest = json.load(f)
    train_stream = token_stream(read_jsonl(os.path.join(args.corpus, "train.jsonl")), tokenizer)
    heldout_docs = read_jsonl(os.path.join(args.corpus, "heldout.jsonl"))
    heldout = eval_windows(token_stream(heldout_docs, tokenizer), args.seq_len, args.eval_windows)
    heldout_builtin = eval_windows(
        token_stream([d for d in heldout_docs if d["source"] in BUILTIN_SOURCES], tokenizer),
        args.seq_len,
        args.eval_windows,
    )
    probe = heldout[np.random.default_rng(1).permutation(len(heldout))[: args.eval_batch * 2]]
    print(
        f"train stream {len(train_stream):,} tokens; held-out {len(heldout)} windows ({len(heldout_builtin)} built-in)",
        flush=True,
    )

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        dtype=compute_dtype,
        param_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    mesh = sharding_lib.make_mesh(data=-1)  # data parallel over every device (one, usually)
    if args.batch % mesh.shape["data"]:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {mesh.shape['data']} devices")
    params = model.init(_prng_key(args.seed), jnp.zeros((1, args.seq_len), jnp.int32))["params"]
    params = jax.device_put(params, sharding_lib.param_shardings(params, mesh))
    num_params = hf.num_params(params)
    print(f"model: {num_params:,} parameters ({num_params * 4 / 2**20:.1f} MiB in float32)", flush=True)
    # Every parameter trains: the trainable tree is the whole model, the frozen tree is empty.
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS["all"])
    frozen = trainer.frozen_part(params, mask, LORA)
    trainable = trainer.init_trainable_sharded(params, mask, LORA, _prng_key(args.seed + 3), mesh)
    del params

    passkey_rows = int(round(args.batch * args.passkey_fraction))
    pool, _ = passkey_batch(args.seed + 1, args.passkey_pool if passkey_rows else 1, args.seq_len + 1)
    total_steps = args.steps or 10**9  # provisional until the first chunks are timed
    optimizer, schedule = make_optimizer(args, total_steps)
    state = trainer.init_state(trainable, optimizer, _prng_key(args.seed + 3), mesh)
    steps_per_call = min(args.steps_per_call, args.steps) if args.steps else args.steps_per_call
    chunk_kw = dict(steps=steps_per_call, batch=args.batch, seq_len=args.seq_len, passkey_rows=passkey_rows)
    chunk = make_train_chunk(model, optimizer, schedule, state, mesh, **chunk_kw)
    mean_nll, passkey_accuracy = make_evaluators(model, args.eval_batch)

    def model_params(state):
        return trainer.student_params(frozen, state.trainable, LORA)

    stream_dev, pool_dev = jax.device_put((train_stream, pool), sharding_lib.replicated(mesh))
    key = _prng_key(args.seed + 2)
    log, calls, train_seconds = [], 0, 0.0
    t_compile = time.time()
    jax.block_until_ready(chunk.lower(state, frozen, key, stream_dev, pool_dev).compile())
    print(f"compiled in {time.time() - t_compile:.1f} s", flush=True)

    while int(state.step) < total_steps:
        key, sub = jax.random.split(key)
        t0 = time.time()
        state, metrics = chunk(state, frozen, sub, stream_dev, pool_dev)
        metrics = {k: float(v) for k, v in metrics.items()}
        elapsed = time.time() - t0
        calls += 1
        if calls > 1 or args.steps:  # the first call still pays for the host-to-device copies
            train_seconds += elapsed
        if not args.steps and calls == 3:
            per_step = elapsed / steps_per_call
            total_steps = int(args.minutes * 60 / per_step) // steps_per_call * steps_per_call
            total_steps = max(total_steps, 3 * steps_per_call)
            print(
                f"{per_step * 1e3:.2f} ms/step, {args.batch * args.seq_len / per_step:,.0f} tokens/s "
                f"-> {total_steps} steps in {args.minutes:g} min",
                flush=True,
            )
            # The schedule's length is now known: the same optimizer (its state carries over) with
            # the final cosine, compiled before the next timed call.
            optimizer, schedule = make_optimizer(args, total_steps)
            chunk = make_train_chunk(model, optimizer, schedule, state, mesh, **chunk_kw)
            jax.block_until_ready(chunk.lower(state, frozen, key, stream_dev, pool_dev).compile())
        step = int(state.step)
        entry = {"step": step, "seconds": round(train_seconds, 2), **metrics}
        if calls % args.eval_every == 0 or step >= total_steps:
            entry["heldout_probe_nll"] = mean_nll(model_params(state), probe)
        log.append(entry)
        if calls % args.eval_every == 0 or calls <= 3 or step >= total_steps:
            print(json.dumps(entry), flush=True)

    params = model_params(state)
    steps_done = int(state.step)
    tokens_seen = steps_done * args.batch * args.seq_len
    measured_seconds = train_seconds * steps_done / max(steps_done - (0 if args.steps else steps_per_call), 1)
    results = {}
    nll = mean_nll(params, heldout)
    results["heldout_ppl_native"] = math.exp(nll)
    results["heldout_bits_per_byte_native"] = nll / math.log(2)
    if len(heldout_builtin):
        results["heldout_builtin_ppl_native"] = math.exp(mean_nll(params, heldout_builtin))
    ids, answers = passkey_batch(10_000 + args.seed, 512, args.seq_len)
    results["passkey_acc_native"] = passkey_accuracy(params, ids, answers)
    # What the demo is about, measured once here: 4x the native length with RoPE as trained (unseen
    # positions), and with linear position interpolation (positions back in range, short text hurt).
    long_ids, long_answers = passkey_batch(20_000 + args.seed, 128, 4 * args.seq_len)
    results["passkey_acc_4x_unscaled"] = passkey_accuracy(params, long_ids, long_answers)
    linear = LlamaForCausalLM(config.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    linear_nll, linear_passkey = make_evaluators(linear, args.eval_batch)
    results["passkey_acc_4x_linear4"] = linear_passkey(params, long_ids, long_answers)
    results["heldout_ppl_native_linear4"] = math.exp(linear_nll(params, heldout))
    print(json.dumps(results, indent=2), flush=True)

    info = {
        "command": command,
        "config": hf.config_to_hf(config),
        "num_params": num_params,
        "corpus": manifest,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": steps_done,
        "tokens_seen": tokens_seen,
        "train_seconds": measured_seconds,
        "tokens_per_second": tokens_seen / max(measured_seconds, 1e-9),
        "device": device,
        "jax": jax.__version__,
        "compute_dtype": compute_dtype,
        "peak_lr": args.lr,
        "warmup_steps": args.warmup,
        "final_lr_fraction": args.final_lr_fraction,
        "weight_decay": args.weight_decay,
        "adam_b1": ADAM_B1,
        "adam_b2": ADAM_B2,
        "passkey_fraction": passkey_rows / args.batch,
        "passkey_pool": len(pool),
        "seed": args.seed,
        "results": results,
    }
    save_checkpoint(args.out, config, params, tokenizer)
    write_model_card(args.out, info)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({**info, "log": log}, f, indent=2)
    print(f"wrote {args.out}: {sorted(os.listdir(args.out))}", flush=True)


if __name__ == "__main__":
    main()
