"""Evaluate teacher / scaled / restored / baselines or any HF checkpoint directories side by side.

  python -m experiments.evaluate --config=configs/eval.py --config.models="a=/ckpt/a,b=/ckpt/b" ...

Writes report.json, report.md and plots into config.workdir (see lard_jax/evaluation/report.py).
"""
import json
import os

from absl import app, logging as absl_logging
from ml_collections import config_flags

from lard_jax import eval_runner, hf
from lard_jax.model import LlamaForCausalLM, dtype_of
from lard_jax.pipeline import ConfigError, resolve_source
from lard_jax.tokenizer import load_tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)


def run(config) -> dict:
    if not config.workdir:
        raise ConfigError("config.workdir is not set")
    models_spec = eval_runner.parse_pairs(config.models, "config.models")
    if not models_spec:
        raise ConfigError('config.models is empty: pass --config.models="teacher=/path,restored=/path"')
    if not config.eval.source:
        raise ConfigError("config.eval.source is not set (held-out documents)")
    os.makedirs(config.workdir, exist_ok=True)
    dtype = dtype_of(config.model.dtype)
    models = {name: hf.load_pretrained(path, dtype=dtype, attention_impl=config.model.attention_impl)
              for name, path in models_spec.items()}
    if config.scaled_rope:
        if "teacher" not in models:
            raise ConfigError("config.scaled_rope needs a model named 'teacher' in config.models")
        teacher, params = models["teacher"]
        models = {"teacher": models["teacher"],
                  "scaled": (LlamaForCausalLM(teacher.config.replace(rope_scaling=json.loads(config.scaled_rope))),
                             params),
                  **{k: v for k, v in models.items() if k != "teacher"}}
    first_dir = next(iter(models_spec.values()))
    tokenizer = load_tokenizer(config.data.tokenizer or first_dir)
    docs = eval_runner.heldout_token_docs(resolve_source(config.eval.source, config.workdir), tokenizer,
                                          config.data.text_field)
    native = config.eval.native_len or next(iter(models.values()))[0].config.max_position_embeddings
    spec = eval_runner.eval_spec_from_config(config.eval, native)
    results = eval_runner.evaluate_suite(models, tokenizer, docs, spec, config.workdir,
                                         distortion=config.eval.distortion, meta={"models": models_spec})
    eval_runner.print_table(results)
    return results


def main(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    del argv
    try:
        run(_CONFIG.value)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
