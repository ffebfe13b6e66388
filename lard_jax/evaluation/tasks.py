"""Evaluation tasks by name: each entry turns (model, params, held-out text, spec) into result keys.

`evaluate_model` (lard_jax.evaluation.runner) runs the tasks named in `EvalSpec.tasks`, in order;
a task whose settings are empty (no lengths, no samples, no files) returns nothing. Adding a task
is one function here with `@register("name")` and its settings in `EvalSpec` / configs/base.py's
eval block; the scorers themselves live in perplexity.py, multiple_choice.py and synthetic.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from lard_jax.evaluation.adapters import cloze_examples, generate_fn_for, logits_fn_for

EVAL_TASKS: dict[str, Callable[[TaskContext], dict[str, Any]]] = {}


def register(name: str):
    def wrap(fn):
        if name in EVAL_TASKS:
            raise ValueError(f"evaluation task {name!r} is registered twice")
        EVAL_TASKS[name] = fn
        return fn

    return wrap


def get(name: str):
    if name not in EVAL_TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; registered: {sorted(EVAL_TASKS)}")
    return EVAL_TASKS[name]


@dataclasses.dataclass
class TaskContext:
    """What a task sees. The model functions are built on first use and shared between tasks; their
    compiled programs are shared between models too (adapters: parameters are arguments)."""

    model: Any
    params: Any
    tokenizer: Any
    docs: list
    spec: Any  # runner.EvalSpec
    filler: Any = None
    progress: bool = True

    @functools.cached_property
    def logits_fn(self):
        return logits_fn_for(self.model, self.params)

    @functools.cached_property
    def generate(self):
        # stop_at_eos: decoding stops at the tokenizer's eos (faster; text after an eos no longer
        # scores, so results can differ from the full-length decode's: off by default)
        eos = getattr(self.tokenizer, "eos_id", None) if getattr(self.spec, "stop_at_eos", False) else None
        return generate_fn_for(self.model, self.params, batch_size=self.spec.batch_size, eos_id=eos)


@register("short_ppl")
def short_perplexity(ctx: TaskContext) -> dict:
    from lard_jax.evaluation import perplexity

    s = ctx.spec
    res = perplexity.perplexity_vs_length(
        ctx.logits_fn,
        ctx.docs,
        [s.native_len],
        max_windows=s.max_windows,
        batch_size=s.batch_size,
        progress=ctx.progress,
    )
    return {"short_ppl": res.get(s.native_len)}


@register("ppl_vs_length")
def perplexity_vs_length(ctx: TaskContext) -> dict:
    s = ctx.spec
    if not s.ppl_lengths:
        return {}
    from lard_jax.evaluation import perplexity
    from lard_jax.generate import linear_memory_model

    # one forward per window at every length, through attention that never forms [T, T]; the
    # function splits a batch into calls of at most adapters.MAX_TOKENS_PER_CALL tokens (so the
    # same length compiles to the same shape as short_ppl's)
    fn = logits_fn_for(linear_memory_model(ctx.model), ctx.params)
    return {
        "ppl_vs_length": perplexity.perplexity_vs_length(
            fn,
            ctx.docs,
            list(s.ppl_lengths),
            max_windows=s.max_windows,
            batch_size=s.batch_size,
            progress=ctx.progress,
        )
    }


@register("cloze")
def cloze(ctx: TaskContext) -> dict:
    s = ctx.spec
    if not s.cloze_samples:
        return {}
    from lard_jax.evaluation import multiple_choice

    examples = cloze_examples(
        ctx.docs,
        ctx.tokenizer,
        context_len=s.native_len // 2,
        cont_len=max(8, s.native_len // 8),
        n=s.cloze_samples,
        seed=s.seed,
    )
    return {
        "cloze_acc": multiple_choice.score_examples(
            "cloze",
            examples,
            ctx.logits_fn,
            ctx.tokenizer,
            batch_size=s.batch_size,
            progress=ctx.progress,
            add_bos=s.add_bos,
            max_length=s.max_length,
        )["acc"]
    }


@register("harness")
def harness_tasks(ctx: TaskContext) -> dict:
    s = ctx.spec
    if not s.harness_tasks:
        return {}
    from lard_jax.evaluation import multiple_choice

    return {
        "tasks": {
            task: multiple_choice.score_task(
                task,
                path,
                ctx.logits_fn,
                ctx.tokenizer,
                batch_size=s.batch_size,
                progress=ctx.progress,
                add_bos=s.add_bos,
                max_length=s.max_length,
            )
            for task, path in s.harness_tasks.items()
        }
    }


def _synthetic(ctx: TaskContext, key: str, task: str, lengths) -> dict:
    if not lengths:
        return {}
    from lard_jax.evaluation import synthetic

    s = ctx.spec
    n_per_depth = max(1, s.passkey_samples // len(s.depths))
    res = synthetic.evaluate_synthetic(
        ctx.generate,
        ctx.tokenizer,
        task,
        list(lengths),
        list(s.depths),
        n_per_depth,
        s.seed,
        filler=ctx.filler,
        progress=ctx.progress,
    )
    return {key: res["by_length"], "synthetic": {task: res}}


@register("passkey")
def passkey(ctx: TaskContext) -> dict:
    return _synthetic(ctx, "passkey", "passkey", ctx.spec.passkey_lengths)


@register("niah")
def niah(ctx: TaskContext) -> dict:
    """Every needle variant in `spec.niah_tasks` at `spec.niah_lengths` x `spec.depths`; niah_single's
    accuracy by length is `niah`, another variant's is `niah_<variant>` (e.g. `niah_multikey_2`)."""
    out: dict = {}
    for task in ctx.spec.niah_tasks:
        key = "niah" if task == "niah_single" else task
        for k, v in _synthetic(ctx, key, task, ctx.spec.niah_lengths).items():
            if k == "synthetic":
                out.setdefault("synthetic", {}).update(v)
            else:
                out[k] = v
    return out


DEFAULT_TASKS = ("short_ppl", "ppl_vs_length", "cloze", "harness", "passkey", "niah")
