"""Evaluate teacher / scaled / restored / baselines or any HF checkpoint directories side by side.

  python -m experiments.evaluate --config=configs/eval.py --config.models="a=/ckpt/a,b=/ckpt/b" ...

Writes report.json, report.md and plots into config.workdir (see lard_jax/evaluation/report.py).
`--help` lists every config key with its default; a user mistake prints one line and exits 2.
"""

import json
import os
import sys

from lard_jax import cli
from lard_jax.errors import UserError

ABOUT = "Evaluate Hugging Face checkpoints side by side (perplexity, cloze, passkey/NIAH, distortion)."


def run(config) -> dict:
    from lard_jax import hf, pipeline
    from lard_jax.evaluation import runner as eval_runner
    from lard_jax.model import LlamaForCausalLM, dtype_of
    from lard_jax.pipeline import ConfigError

    if not config.workdir:
        raise ConfigError("config.workdir is not set: pass --config.workdir=/path/for/the/report")
    try:
        models_spec = eval_runner.parse_pairs(config.models, "config.models")
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(f'{e}; e.g. --config.models="teacher=/ckpt/teacher,restored=/runs/x/hf_student"') from None
    if not models_spec:
        raise ConfigError('config.models is empty: pass --config.models="teacher=/path,restored=/path"')
    if not config.eval.source:
        raise ConfigError("config.eval.source is not set: pass --config.eval.source=/path/to/heldout (documents)")
    if config.scaled_rope and "teacher" not in models_spec:
        raise ConfigError("config.scaled_rope needs a model named 'teacher' in config.models; name one teacher=/path")
    scaled_rope = None
    if config.scaled_rope:
        try:
            scaled_rope = json.loads(config.scaled_rope)
        except ValueError as e:
            raise ConfigError(
                f"config.scaled_rope: not JSON ({e}); e.g. "
                '--config.scaled_rope=\'{"rope_type": "linear", "factor": 4.0}\''
            ) from None
        from lard_jax import rope as rope_lib

        try:
            rope_lib.normalize_rope_scaling(scaled_rope)
        except ValueError as e:
            raise ConfigError(f"config.scaled_rope: {e}") from None
    # Everything that needs no weights first: workdir, every config.json and tensor header, the
    # tokenizer, the held-out text.
    pipeline.prepare_workdir(config.workdir)
    cfgs = {name: pipeline.check_checkpoint(path, what=f"config.models {name}") for name, path in models_spec.items()}
    first_dir = next(iter(models_spec.values()))
    tokenizer = pipeline.load_run_tokenizer(config.data.tokenizer, first_dir)
    source = pipeline.resolve_source(config.eval.source, config.workdir)
    try:
        docs = eval_runner.heldout_token_docs(source, tokenizer, config.data.text_field)
    except UserError:
        raise
    except ValueError as e:
        raise pipeline._data_error(e, f"config.eval.source={config.eval.source}") from None
    native = config.eval.native_len or next(iter(cfgs.values())).max_position_embeddings
    try:
        spec = eval_runner.eval_spec_from_config(config.eval, native)
        eval_runner.check_spec(spec, tokenizer)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(f"config.eval: {e}") from None
    for name, cfg in cfgs.items():
        pipeline.warn_long_eval(spec, cfg.max_position_embeddings, f"model {name!r}")

    dtype = dtype_of(config.model.dtype)
    models = {
        name: hf.load_pretrained(path, dtype=dtype, attention_impl=config.model.attention_impl)
        for name, path in models_spec.items()
    }
    if scaled_rope is not None:
        teacher, params = models["teacher"]
        models = {
            "teacher": models["teacher"],
            "scaled": (LlamaForCausalLM(teacher.config.replace(rope_scaling=scaled_rope)), params),
            **{k: v for k, v in models.items() if k != "teacher"},
        }
    results = eval_runner.evaluate_suite(
        models, tokenizer, docs, spec, config.workdir, distortion=config.eval.distortion, meta={"models": models_spec}
    )
    eval_runner.print_table(results)
    return results


def main(argv=None) -> int:
    return cli.run_main(
        sys.argv if argv is None else argv,
        run,
        prog="experiments.evaluate",
        default_config=os.path.join(cli.ROOT, "configs", "eval.py"),
        about=ABOUT,
        config_required_hint="the evaluation needs a config file; pass --config=configs/eval.py",
    )


if __name__ == "__main__":
    sys.exit(main())
