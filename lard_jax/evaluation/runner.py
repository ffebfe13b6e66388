"""Evaluate models side by side: jitted closures over a model, then lard_jax.evaluation's scorers.

`evaluate_model` measures one model: perplexity at the native length (`short_ppl`) and against
length, a held-out cloze accuracy (short multiple-choice-style), passkey / NIAH retrieval at
chosen lengths, and any lm-evaluation-harness JSONL tasks the user brings. `relation_distortion_vs`
gives the per-layer/head Q/K/V relation KL of a student against the teacher.

Compiled programs are shared between the models evaluated (parameters and RoPE frequencies are
arguments; adapters.py); `enable_compilation_cache(workdir)` (lard_jax.compile_cache) keeps them on
disk for the next process -- call it once, before the first model runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lard_jax.compile_cache import enable_compilation_cache  # noqa: F401  (re-exported for entry points)
from lard_jax.evaluation import distortion as distortion_lib
from lard_jax.evaluation import multiple_choice, synthetic
from lard_jax.evaluation import tasks as tasks_lib
from lard_jax.evaluation.adapters import (  # noqa: F401  (re-exported: public here too)
    _bucket,
    cloze_examples,
    generate_fn_for,
    logits_fn_for,
    qkv_fn_for,
)


@dataclasses.dataclass
class EvalSpec:
    native_len: int
    ppl_lengths: Sequence[int] = ()
    max_windows: int = 32
    passkey_lengths: Sequence[int] = ()
    passkey_samples: int = 20
    depths: Sequence[float] = (0.1, 0.5, 0.9)
    niah_lengths: Sequence[int] = ()
    niah_tasks: Sequence[str] = ("niah_single",)  # RULER needle variants (synthetic.TASKS) run at niah_lengths
    cloze_samples: int = 0
    harness_tasks: dict = dataclasses.field(default_factory=dict)  # task name -> JSONL path
    seed: int = 0
    batch_size: int = 8
    add_bos: str = "tokenizer"  # harness-style scoring: "tokenizer" | "always" | "never"
    max_length: int = 0  # harness-style left truncation; 0 = the model's max_position_embeddings
    tasks: Sequence[str] = tasks_lib.DEFAULT_TASKS  # registered task names, run in this order
    # greedy generation (passkey, NIAH, ...) stops at the tokenizer's eos: faster, but the scorers
    # then no longer see text generated after an eos (decode skips the eos and keeps what
    # follows), so scores can differ from the default full-length decode
    stop_at_eos: bool = False


def check_spec(spec: EvalSpec, tokenizer) -> None:
    """Build one example of every synthetic task and length now, so a length too short for its
    prompt fails before training rather than after."""
    for name in spec.tasks:
        tasks_lib.get(name)  # an unknown task name fails here, before any model runs
    rng = np.random.default_rng(0)
    unknown = [t for t in spec.niah_tasks if t not in synthetic.TASKS]
    if unknown:
        raise ValueError(f"eval.niah_tasks: unknown task(s) {unknown}; expected names from {sorted(synthetic.TASKS)}")
    checks = [("passkey", spec.passkey_lengths)] + [(t, spec.niah_lengths) for t in spec.niah_tasks]
    for task, lengths in checks:
        for length in lengths:
            try:
                synthetic.TASKS[task](rng, tokenizer, int(length), 0.5, None)
            except ValueError as e:
                raise ValueError(f"eval: {task} at length {length}: {e}") from None


def evaluate_model(
    model, params, tokenizer, heldout_token_docs, spec: EvalSpec, *, filler=None, progress: bool = True
) -> dict[str, Any]:
    """Run the registered evaluation tasks named in `spec.tasks` (lard_jax.evaluation.tasks)."""
    ctx = tasks_lib.TaskContext(model, params, tokenizer, heldout_token_docs, spec, filler, progress)
    out: dict[str, Any] = {}
    for name in spec.tasks:
        for key, value in tasks_lib.get(name)(ctx).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key].update(value)  # e.g. "synthetic": one entry per generation task
            else:
                out[key] = value
    return out


def relation_distortion_vs(
    teacher,
    teacher_params,
    student,
    student_params,
    heldout_token_docs,
    *,
    seq_len: int,
    rows: int = 4,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    windows = [np.asarray(d[:seq_len]) for d in heldout_token_docs if len(d) >= seq_len][:rows]
    if not windows:
        raise ValueError(f"relation distortion: no held-out document has {seq_len} tokens")
    return distortion_lib.relation_distortion(
        qkv_fn_for(teacher, teacher_params),
        qkv_fn_for(student, student_params),
        np.stack(windows),
        batch_size=2,
        progress=progress,
    )


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """ "a=/x,b=/y" -> {"a": "/x", "b": "/y"}, with an error naming `what` on a malformed item."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"{what}: expected name=path items separated by commas, got {item!r}")
        name, path = item.split("=", 1)
        out[name.strip()] = path.strip()
    return out


def eval_spec_from_config(eval_cfg, native_len: int) -> EvalSpec:
    native = eval_cfg.native_len or native_len
    return EvalSpec(
        native_len=native,
        ppl_lengths=tuple(eval_cfg.ppl_lengths),
        max_windows=eval_cfg.max_windows,
        passkey_lengths=tuple(eval_cfg.passkey_lengths) or (4 * native,),
        passkey_samples=eval_cfg.passkey_samples,
        depths=tuple(eval_cfg.depths),
        niah_lengths=tuple(eval_cfg.niah_lengths),
        niah_tasks=tuple(eval_cfg.get("niah_tasks", ()) or ("niah_single",)),
        cloze_samples=eval_cfg.cloze_samples,
        harness_tasks=parse_pairs(eval_cfg.harness_tasks, "eval.harness_tasks"),
        add_bos=multiple_choice.bos_mode(eval_cfg.get("add_bos", "tokenizer")),
        max_length=int(eval_cfg.get("max_length", 0) or 0),
        tasks=tuple(eval_cfg.get("tasks", ()) or tasks_lib.DEFAULT_TASKS),
        stop_at_eos=bool(eval_cfg.get("stop_at_eos", False)),
    )


def heldout_token_docs(source: str, tokenizer, text_field: str = "text") -> list[list[int]]:
    from lard_jax import data as data_lib

    docs = [
        tokenizer.encode(t, add_bos=getattr(tokenizer, "bos_id", None) is not None)
        for t in data_lib.read_documents(source, text_field=text_field)
    ]
    if not docs:
        raise ValueError(f"eval.source {source}: no documents")
    return docs


def evaluate_suite(
    models: dict[str, tuple],
    tokenizer,
    token_docs,
    spec: EvalSpec,
    run_dir: str,
    *,
    teacher_name: str = "teacher",
    distortion: bool = True,
    title: str = "LinearARD evaluation",
    meta: dict | None = None,
    results: dict | None = None,
    training: dict[str, list[dict]] | None = None,
) -> dict:
    """Evaluate every (model, params) in `models`, add distortion vs the teacher, write the report
    (with the loss curve of `training`: stage -> logged train metrics)."""
    from lard_jax.evaluation import report as report_lib

    results = dict(results or {})
    dist = {}
    for name, (model, params) in models.items():
        print(f"evaluating {name} ...")
        results[name] = evaluate_model(model, params, tokenizer, token_docs, spec)
    if distortion and teacher_name in models:
        teacher, t_params = models[teacher_name]
        for name, (model, params) in models.items():
            if name != teacher_name:
                dist[name] = relation_distortion_vs(
                    teacher, t_params, model, params, token_docs, seq_len=spec.native_len
                )
    report_lib.write_report(run_dir, results, distortion=dist or None, title=title, meta=meta, training=training)
    return results


def format_table(results: dict[str, dict]) -> str:
    """Every headline number (report.summary_rows: perplexity and each task at every length) for
    the models side by side, plus a `recovery` column where teacher, scaled and restored are all
    present: the share of what scaling lost that restoration won back (report.recovery)."""
    from lard_jax.evaluation import report as report_lib

    rows = report_lib.summary_rows(results)
    cols = list(results)
    with_recovery = {"teacher", "scaled", "restored"} <= set(cols)
    width = max([24] + [len(label) + 2 for label, _, _ in rows])
    head = f"{'metric':{width}}" + "".join(f"{c:>14}" for c in cols) + (f"{'recovery':>10}" if with_recovery else "")
    lines = [head]
    for label, values, lower in rows:
        cells = "".join(
            f"{values[c]:>14.4g}" if isinstance(values.get(c), (int, float)) else f"{'-':>14}" for c in cols
        )
        if with_recovery:
            rec = report_lib.recovery(values, lower)
            cells += f"{rec:>10.2f}" if rec is not None else f"{'-':>10}"
        lines.append(f"{label:{width}}" + cells)
    return "\n".join(lines)


def print_table(results: dict[str, dict]) -> None:
    print(format_table(results))
