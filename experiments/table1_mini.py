"""The paper's Table 1 in miniature, on the shipped tiny teacher (run it on a GPU).

    python -m experiments.table1_mini --data .corpus/train.jsonl --heldout builtin:heldout --out docs/

Rows: teacher; scaled student untrained (linear PI x4); CPT with LinearARD's token budget; CPT with
60x that budget (the paper: 256M vs 4.25M tokens); a simplified LongReD ("longred_simplified": short-text
hidden-state cosine + short-to-long logit distillation; no long-text LM term, not the LongReD paper's
recipe) with 60x; LinearARD; LinearARD + CPT.
All students train the same parameters (q, k, v projections) in the same trainer. Columns:
held-out perplexity at the native length, held-out cloze accuracy (4 choices), passkey and NIAH
at 4x and 8x the native length, training tokens. Writes table1_mini.json and table1_mini.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from configs import demo
from lard_jax import hf, pipeline
from lard_jax.evaluation import runner as eval_runner
from lard_jax.model import LlamaForCausalLM
from lard_jax.tokenizer import load_tokenizer


def _runs(native: int, factor: float, budget_steps: int, batch: int):
    """name -> config overrides. Token budgets: LinearARD trains budget_steps x batch x native."""
    base_tokens = budget_steps * batch * native
    long_len = int(native * factor)
    cpt_steps = lambda mult: max(1, mult * base_tokens // (batch * long_len))  # noqa: E731
    return {
        "cpt_1x": dict(method="cpt", seq_len=long_len, steps=cpt_steps(1)),
        "cpt_60x": dict(method="cpt", seq_len=long_len, steps=cpt_steps(60)),
        "longred_simplified_60x": dict(method="longred_simplified", seq_len=native, steps=60 * budget_steps),
        "linearard": dict(method="linearard", seq_len=native, steps=budget_steps),
        "linearard_cpt": dict(
            method="linearard", seq_len=native, steps=budget_steps, stage2_steps=cpt_steps(1), stage2_len=long_len
        ),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="builtin:train", help="training documents (JSONL/text) for every student")
    p.add_argument("--heldout", default="builtin:heldout")
    p.add_argument("--workdir", default="runs/table1_mini")
    p.add_argument("--out", default="docs")
    p.add_argument("--steps", type=int, default=120, help="LinearARD steps (the token budget unit)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--only", default="", help="comma list of runs to do (default: all)")
    p.add_argument("--passkey_samples", type=int, default=30)
    args = p.parse_args()

    base = demo.get_config()
    teacher_dir = base.model.checkpoint
    factor = float(base.student.rope_scaling.factor)
    native = base.data.seq_len
    runs = _runs(native, factor, args.steps, args.batch)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    timings, tokens = {}, {"teacher": 0, "scaled": 0}
    for name, r in runs.items():
        c = demo.get_config()
        with c.unlocked():
            c.workdir = os.path.join(args.workdir, name)
            c.data.source = args.data
            c.data.cache_dir = os.path.join(args.workdir, "token_cache")  # tokenised once for every run
            c.data.seq_len = r["seq_len"]
            c.loss.method = r["method"]
            c.train.steps = r["steps"]
            c.train.batch_size = args.batch
            c.train.lr = args.lr
            c.train.checkpoint_every = 10**9
            c.train.retrain = True  # this script regenerates every row: a rerun in its workdir trains again
            c.train.log_every = 50
            c.eval.enabled = False
            if "stage2_steps" in r:
                c.stage2.steps = r["stage2_steps"]
                c.stage2.seq_len = r["stage2_len"]
                c.stage2.batch_size = args.batch
                c.stage2.lr = args.lr
        t0 = time.perf_counter()
        summary = pipeline.run_restoration(c)
        timings[name] = time.perf_counter() - t0
        tokens[name] = summary["train_tokens"]

    tokenizer = load_tokenizer("byte")
    teacher, params = hf.load_pretrained(teacher_dir)
    scaled = LlamaForCausalLM(teacher.config.replace(rope_scaling=dict(base.student.rope_scaling)))
    models = {"teacher": (teacher, params), "scaled": (scaled, params)}
    for name in runs:
        models[name] = hf.load_pretrained(os.path.join(args.workdir, name, "hf_student"))
    docs = eval_runner.heldout_token_docs(pipeline.resolve_source(args.heldout, args.workdir), tokenizer)
    spec = eval_runner.EvalSpec(
        native_len=native,
        max_windows=128,
        passkey_lengths=(4 * native, 8 * native),
        passkey_samples=args.passkey_samples,
        niah_lengths=(4 * native, 8 * native),
        cloze_samples=200,
    )
    results = eval_runner.evaluate_suite(
        models, tokenizer, docs, spec, args.workdir, distortion=True, title="Table 1 in miniature"
    )
    eval_runner.print_table(results)
    rows = {
        name: {
            "short_ppl": res.get("short_ppl"),
            "cloze_acc": res.get("cloze_acc"),
            **{f"passkey@{k}": v for k, v in (res.get("passkey") or {}).items()},
            **{f"niah@{k}": v for k, v in (res.get("niah") or {}).items()},
            "train_tokens": tokens.get(name),
            "train_seconds": timings.get(name),
        }
        for name, res in results.items()
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table1_mini.json"), "w") as f:
        json.dump(
            {
                "rows": rows,
                "runs": runs,
                "native_len": native,
                "factor": factor,
                "lr": args.lr,
                "batch": args.batch,
                "data": args.data,
                "heldout": args.heldout,
            },
            f,
            indent=2,
        )
    cols = list(next(iter(rows.values())).keys())
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "table1_mini.md"), "w") as f:
        f.write(
            "# Table 1 in miniature\n\nCommand: `python -m experiments.table1_mini "
            f"--data {args.data} --steps {args.steps} --batch {args.batch}`\n\n" + "\n".join(lines) + "\n"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
