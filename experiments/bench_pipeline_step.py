"""The pipeline's own training step beside the library's maskless step, in one process.

    PYTHONUNBUFFERED=1 python3 -m experiments.bench_pipeline_step --out docs/bench_pipeline_step.json

`--config` (default configs/smollm2_135m_pi32k.py, as committed) is resolved by the real planner
(`lard_jax.plan.resolve`) against a RANDOM Hugging Face checkpoint of the config's model shape,
written first to --ckpt_dir (SmolLM2-135M's shape unless --shape says otherwise; no download), with
`data.tokenizer=byte`, `data.source=builtin:train`, `data.pad_short=True` (Python's bundled
documents: nothing to stage), evaluation off. Then, with the models, trainable tree, optimizer and
jitted step the pipeline builds (`pipeline.build_models`, `trainer.init_state`,
`trainer.jit_train_step` under the plan's mesh rules):

  pipeline  the loop `pipeline.train_stage` runs: a loader batch per step (`input_ids`, `mask`,
            `segment_ids`, shaped [accum, micro, T] by `pipeline.device_batch`), the step, and the
            metrics read back every step (config.train.log_every = 1)
  library   the same jitted step function on batches of `input_ids` only (no mask: plain causal
            attention), same shape, metrics read back every step too

Each is timed over --steps steps after --warmup (compile and warm-up excluded); tokens/s = tokens
per step / median step seconds. Writes the JSON with library_tokens_per_s, pipeline_tokens_per_s,
their ratio, device, jax, the command and the resolved settings.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from lard_jax.presets import MODEL_SHAPES

SMOLLM2_135M = MODEL_SHAPES["smollm2_135m"]
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def write_random_checkpoint(path: str, shape: dict, seed: int = 0) -> None:
    """A Hugging Face directory (config.json + model.safetensors) with random weights of `shape`."""
    from lard_jax import hf
    from lard_jax.model import LlamaConfig, init_params
    from lard_jax.tokenizer import ByteTokenizer

    if os.path.isfile(os.path.join(path, "config.json")):
        return
    model, params = init_params(LlamaConfig(**shape, param_dtype="bfloat16"), jax.random.PRNGKey(seed))
    hf.save_pretrained(path, model, params)
    ByteTokenizer().save_pretrained(path)


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def time_loop(step, state, frozen, batches, steps: int, warmup: int):
    """(state, per-step seconds): each step makes its batch, runs, and reads the metrics back."""
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = step(state, frozen, batches(i))
        jax.device_get(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return state, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_135m_pi32k.py")
    p.add_argument("--shape", default="smollm2_135m", choices=["smollm2_135m", "tiny"])
    p.add_argument("--ckpt_dir", default=os.path.join(tempfile.gettempdir(), "bench_pipeline_ckpt"))
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_pipeline_run"))
    p.add_argument("--seq_len", type=int, default=0, help="override data.seq_len (0: the config's)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="extra config override key=value (python literal)")
    p.add_argument("--out", default="docs/bench_pipeline_step.json")
    a = p.parse_args(argv)

    from lard_jax import pipeline, trainer
    from lard_jax import plan as plan_lib
    from lard_jax import sharding as sharding_lib

    shape = SMOLLM2_135M if a.shape == "smollm2_135m" else TINY
    t0 = time.perf_counter()
    write_random_checkpoint(a.ckpt_dir, shape)
    config = load_config(a.config)
    config.model.checkpoint = a.ckpt_dir
    config.data.tokenizer = "byte"
    config.data.source = "builtin:train"
    config.data.pad_short = True
    config.workdir = a.workdir
    config.eval.enabled = False
    config.train.log_every = 1
    if a.seq_len:
        config.data.seq_len = a.seq_len
    for item in a.set:
        key, _, value = item.partition("=")
        block, _, field = key.rpartition(".")
        target = config
        for part in filter(None, block.split(".")):
            target = target[part]
        try:
            target[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            target[field] = value
    plan = plan_lib.resolve(config)
    config = plan.config
    stage = plan.stages[0]
    mesh = plan.make_mesh()
    teacher, student, frozen = pipeline.build_models(plan, mesh)
    mask = trainer.trainable_mask(frozen, plan.projections)
    setup_s = time.perf_counter() - t0
    loader, accum, seq_len = stage.loader, stage.grad_accum, stage.seq_len
    tokens_per_step = stage.batch_size * accum * seq_len  # global sequences per micro-step x accumulation
    optimizer, schedule = trainer.make_optimizer(total_steps=stage.steps, **stage.optimizer)
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "command": "python3 -m experiments.bench_pipeline_step " + " ".join(sys.argv[1:]),
        "config": a.config,
        "shape": a.shape,
        "seq_len": seq_len,
        "batch_size": stage.batch_size,
        "grad_accum": accum,
        "tokens_per_step": tokens_per_step,
        "attention_impl": config.model.attention_impl,
        "remat": config.model.remat,
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "fused_loss": bool(config.loss.get("fused", False)),
        "setup_s": setup_s,
    }
    sample = loader.batch_at(0)
    result["pipeline_batch_keys"] = sorted(sample)
    result["pipeline_real_token_fraction"] = float(np.mean(sample["mask"]))
    with sharding_lib.use_mesh(mesh, plan.rules):
        rows = {}
        for name in ("library", "pipeline"):
            trainable = pipeline._init_trainable(frozen, mask, plan.lora, config, mesh)
            state = trainer.init_state(trainable, optimizer, jax.random.PRNGKey(config.seed), mesh)
            step = trainer.jit_train_step(teacher, student, stage.loss, plan.lora, optimizer, schedule, state)
            if name == "pipeline":

                def batches(i):
                    return pipeline.device_batch(loader.batch_at(i), accum, mesh)
            else:

                def batches(i):
                    return pipeline.device_batch({"input_ids": loader.batch_at(i)["input_ids"]}, accum, mesh)

            t = time.perf_counter()
            jax.block_until_ready(step.lower(state, frozen, batches(0)).compile())
            compile_s = time.perf_counter() - t
            state, times = time_loop(step, state, frozen, batches, a.steps, a.warmup)
            med = statistics.median(times)
            rows[name] = dict(step_s=med, tokens_per_s=tokens_per_step / med, compile_s=compile_s, step_times=times)
            tps = tokens_per_step / med
            print(f"{name:9s} step {med * 1e3:8.1f} ms  {tps:10.0f} tokens/s  (compile {compile_s:.1f} s)")
            del state, step
    result["library_tokens_per_s"] = rows["library"]["tokens_per_s"]
    result["pipeline_tokens_per_s"] = rows["pipeline"]["tokens_per_s"]
    result["pipeline_over_library"] = result["pipeline_tokens_per_s"] / result["library_tokens_per_s"]
    result["rows"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\n| step | tokens/s | ms/step |\n|---|---|---|")
    for name in ("library", "pipeline"):
        print(f"| {name} | {rows[name]['tokens_per_s']:.0f} | {rows[name]['step_s'] * 1e3:.1f} |")
    print(f"pipeline / library = {result['pipeline_over_library']:.3f}  ({result['device']}, jax {result['jax']})")


if __name__ == "__main__":
    main()
