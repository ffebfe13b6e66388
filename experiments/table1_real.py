"""The paper's Table 1 on a real pretrained LLaMA: SmolLM2-135M-Instruct, 8K native -> 32K (linear x4).

    python -m experiments.table1_real --config configs/smollm2_135m_pi32k.py \
        --data .corpus/train.jsonl --heldout .corpus/heldout.jsonl --out docs/table1_real

Rows (each trains with the same trainer, on the same text, from the same teacher):
  teacher          native RoPE (8192), no training
  scaled           linear x4 (32K), untrained; `scaled_yarn` YaRN x4, untrained
  linearard        the config's recipe (the authors' recipe scaled to this model) at the native length
  cpt_1x           continued pre-training of the scaled student at 32K with LinearARD's tokens
  cpt_Nx           the same with --big_mult times the tokens (the paper: ~60x)
  longred_simplified_Nx  this project's simplified LongReD with --big_mult times the tokens
  linearard_cpt    linearard + light stage-2 CPT at 32K (1x tokens)

Columns: held-out perplexity at 2K and 8K (short text) and at 32K (one long stream of held-out text),
a 4-way continuation cloze with lm-eval-harness conventions, passkey and NIAH (single and multi-key)
at 8K/16K/32K over several depths, training tokens and GPU seconds per row.

Resumable: every finished row is written to <out>/table1_real.json at once and skipped on the next
call; `--time_budget_s` stops before starting a row that would not fit (a device call is 10 minutes).
Compiled programs are shared by every row's evaluation (lard_jax.evaluation.adapters) and kept in
JAX's persistent compilation cache under the workdir (`--compile_cache`), so a resumed call does
not compile them again.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import inspect
import json
import os
import pickle
import sys
import threading
import time
import traceback

import numpy as np

from lard_jax import hf, pipeline, preemption
from lard_jax.compile_cache import CACHE_SUBDIR, enable_compilation_cache
from lard_jax.evaluation import multiple_choice, perplexity, stats, synthetic
from lard_jax.evaluation import runner as eval_runner
from lard_jax.generate import linear_memory_model
from lard_jax.model import LlamaForCausalLM, dtype_of, stack_layers
from lard_jax.tokenizer import load_tokenizer

ROW_ORDER = (  # cheapest first: a call that runs out of time has finished the most rows
    "teacher",
    "scaled",
    "scaled_yarn",
    "linearard",
    "cpt_1x",
    "linearard_cpt",
    "cpt_Nx",
    "longred_simplified_Nx",
)
ACCURACY_PREFIXES = ("cloze_acc", "passkey@", "niah_single@", "niah_multikey@")


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("table1_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_rows(base, big_mult: int, extra_lrs=(), extra_cpt_lrs=(), extra_big_lrs=()) -> dict[str, dict]:
    """name -> overrides. The token unit is LinearARD's budget: steps x batch x accum x native length."""
    native = base.data.seq_len
    factor = float(base.student.rope_scaling["factor"])
    long_len = int(native * factor)
    unit = base.train.steps * base.train.batch_size * base.train.grad_accum * native
    cpt_steps = lambda mult: max(1, int(mult * unit // long_len))  # noqa: E731  (batch 1, accum 1 at 32K)
    rows = {
        "linearard": dict(method="linearard", seq_len=native, steps=base.train.steps),
        "cpt_1x": dict(method="cpt", seq_len=long_len, steps=cpt_steps(1), batch=1, accum=1),
        "linearard_cpt": dict(
            method="linearard", seq_len=native, steps=base.train.steps, stage2_steps=cpt_steps(1), stage2_len=long_len
        ),
        "cpt_Nx": dict(method="cpt", seq_len=long_len, steps=cpt_steps(big_mult), batch=1, accum=1),
        "longred_simplified_Nx": dict(method="longred_simplified", seq_len=native, steps=big_mult * base.train.steps),
    }
    # extra rates: a row as above at another rate (linearard_cpt: both stages at it)
    rates = {"lr": ("linearard",), "cpt": ("cpt_1x", "linearard_cpt"), "big": ("cpt_Nx", "longred_simplified_Nx")}
    for kind, lrs in (("lr", extra_lrs), ("cpt", extra_cpt_lrs), ("big", extra_big_lrs)):
        for name in rates[kind]:
            for lr in lrs:
                stage2 = {"stage2_lr": lr} if "stage2_steps" in rows[name] else {}
                rows[f"{name}_lr{lr:g}"] = dict(rows[name], lr=lr, **stage2)
    return rows


def run_row(base, name: str, r: dict, args) -> dict:
    c = base.copy_and_resolve_references()
    with c.unlocked():
        c.workdir = os.path.join(args.workdir, name)
        c.data.source = args.data
        c.data.cache_dir = os.path.join(args.workdir, "token_cache")  # tokenised once for every row
        c.data.seq_len = r["seq_len"]
        c.data.mode = args.data_mode  # packed: every row reads the whole corpus, whatever its block length
        if r["seq_len"] > base.data.seq_len and "allow_long" in c.data:
            c.data.allow_long = True  # CPT trains at the extended length on purpose
        c.loss.method = r["method"]
        c.train.steps = r["steps"]
        c.train.batch_size = r.get("batch", c.train.batch_size)
        c.train.grad_accum = r.get("accum", c.train.grad_accum)
        # a row longer than one device call resumes from its last checkpoint on the next (warm) call
        c.train.checkpoint_every = max(25, r["steps"] // 8)
        c.train.log_every = 25
        c.eval.enabled = False
        if r["method"] == "cpt":
            c.train.lr = args.cpt_lr or c.train.lr
        if "lr" in r:
            c.train.lr = r["lr"]
        if "stage2_steps" in r:
            c.stage2.steps = r["stage2_steps"]
            c.stage2.seq_len = r["stage2_len"]
            c.stage2.batch_size = 1
            c.stage2.grad_accum = 1
            c.stage2.lr = r.get("stage2_lr") or args.cpt_lr or c.train.lr
    done = os.path.join(c.workdir, "summary.json")
    with RowClock(os.path.join(c.workdir, "train_seconds.json")) as clock:
        if os.path.exists(done):  # trained by an earlier call whose evaluation did not finish
            check_reused(c)
            with open(done) as f:
                summary = json.load(f)
        else:
            summary = pipeline.run_restoration(c)
    return {
        "train_tokens": int(summary["train_tokens"]),
        "train_seconds": clock.total,  # every call's share, a resumed row's earlier calls included
        "hf_student": summary["hf_student"],
        "overrides": r,
        "data_mode": args.data_mode,
        "lr": float(c.train.lr),  # the rate the row trained at (stage 2's below, where it has one)
        **({"stage2_lr": float(c.stage2.lr)} if "stage2_steps" in r else {}),
    }


REUSE_KEYS = (
    ("data", "mode"),
    ("data", "seq_len"),
    ("loss", "method"),
    ("train", "lr"),
    ("train", "steps"),
    ("stage2", "lr"),
    ("stage2", "steps"),
)


def row_data_mode(row: dict, default: str) -> str:
    """The data mode a row was trained with: rows written before `data_mode` was recorded were all
    per-document; evaluation-only rows read no training text (any mode)."""
    if "data_mode" in row:
        return row["data_mode"]
    return "per_document" if ("train_tokens" in row or "overrides" in row) else default


def check_reused(c) -> None:
    """A row whose workdir already holds a finished run is reused only if that run was trained as
    this row would be (data mode, length, method, rates, steps; from the run's config.json)."""
    path = os.path.join(c.workdir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"{c.workdir} holds a finished run without its config.json: delete it to train this row")
    with open(path) as f:
        saved = json.load(f)
    for section, key in REUSE_KEYS:
        want, got = c[section][key], saved.get(section, {}).get(key)
        if got != want:  # config.json is the config's JSON: numbers and strings round-trip exactly
            raise SystemExit(
                f"{c.workdir} holds a run trained with {section}.{key}={got!r}, this row needs {want!r}: "
                "delete that directory or pass another --workdir"
            )


class PromptCache:
    """The passkey / NIAH prompts of earlier rows and calls (`synthetic.evaluate_synthetic`'s
    examples_cache) in a pickle: building and tokenising 900 prompts of up to 32K tokens takes
    ~100 s of host time a call otherwise. Tied to the tokenizer by a fingerprint (its ids for a
    probe text, with and without bos) and to the prompt-building code (a hash of
    lard_jax/evaluation/synthetic.py): a file of another tokenizer or older code is ignored and
    replaced. `--prompts_only` builds the file without a model or GPU (e.g. here, to carry it to the
    device)."""

    PROBE = "Passkey 12345: The grass is green. The sky is blue. Ünïcödé, tabs\tand\nnewlines."

    def __init__(self, path: str, tokenizer):
        self.path = path
        self.fingerprint = {
            "ids": [int(x) for x in tokenizer.encode(self.PROBE)],
            "ids_bos": [int(x) for x in tokenizer.encode(self.PROBE, add_bos=True)],
            # the prompts' code (templates, haystack, fitting, task order): any change rebuilds them
            "synthetic_py": hashlib.sha256(inspect.getsource(synthetic).encode()).hexdigest()[:16],
        }
        self.examples: dict = {}
        if os.path.exists(path):
            with gzip.open(path, "rb") as f:
                saved = pickle.load(f)
            if saved.get("fingerprint") == self.fingerprint:
                for key, example in saved["examples"].items():
                    self.examples[key] = {**example, "prompt_ids": [int(x) for x in example["prompt_ids"]]}
                print(f"[setup] {len(self.examples)} built prompts from {path}", flush=True)
        self._saved = len(self.examples)

    def save(self) -> None:
        if len(self.examples) == self._saved:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        compact = {k: {**e, "prompt_ids": np.asarray(e["prompt_ids"], np.int32)} for k, e in self.examples.items()}
        with gzip.open(tmp, "wb", compresslevel=6) as f:  # the haystacks repeat: a few MB for 900 prompts
            pickle.dump({"fingerprint": self.fingerprint, "examples": compact}, f, protocol=4)
        os.replace(tmp, self.path)
        self._saved = len(self.examples)


class RowClock:
    """Seconds spent on a row over every call that worked on it: the running total is rewritten to
    `path` every few seconds (a call cut by its time limit loses at most that much), and read back
    by the next call that resumes the row."""

    def __init__(self, path: str, every_s: float = 5.0):
        self.path, self.every_s = path, every_s
        self.before = 0.0
        if os.path.exists(path):
            with open(path) as f:
                self.before = float(json.load(f)["seconds"])
        self._t0 = 0.0
        self.total_at_exit: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def total(self) -> float:
        if self.total_at_exit is not None:
            return self.total_at_exit
        return self.before + (time.perf_counter() - self._t0)

    def _write(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seconds": self.total}, f)
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()

    def __enter__(self) -> RowClock:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.total_at_exit = self.total  # frozen: what is written is what the row reports
        self._write()


def long_stream(token_docs, eos_id) -> list[list[int]]:
    """The held-out documents joined (EOS between) into one stream, for perplexity at lengths longer
    than any single held-out document."""
    out: list[int] = []
    for d in token_docs:
        out.extend(list(d) + ([eos_id] if eos_id is not None else []))
    return [out]


def as_scanned(model, params):
    """The same model with its layers stacked under one nn.scan (what the pipeline trains and the
    evaluation compiles fastest; KV-cache decoding writes the cache once per step)."""
    if model.config.scan_layers:
        return model, params
    return LlamaForCausalLM(model.config.replace(scan_layers=True)), stack_layers(params)


def add_intervals(res: dict, key: str, scores_ci, n: int) -> None:
    """`<key>_n` (prompts behind the value) and `<key>_ci` (95% interval) next to res[key]."""
    res[f"{key}_n"] = int(n)
    res[f"{key}_ci"] = [round(float(x), 4) for x in scores_ci]


def evaluate(model, params, tokenizer, docs, stream, args, native: int, label: str = "", prompts=None) -> dict:
    """Every column of one row; a line per task with its seconds (a cut call shows where time went)."""
    clock = [time.perf_counter()]

    def done(what: str) -> None:
        now = time.perf_counter()
        print(f"[{label}] {what}: {now - clock[0]:.1f}s", flush=True)
        clock[0] = now

    model = linear_memory_model(model)  # no [T, T] scores at 32K: cuDNN on a GPU, blockwise elsewhere
    logits_fn = eval_runner.logits_fn_for(model, params)
    res: dict = {}
    short = perplexity.perplexity_vs_length(
        logits_fn, docs, [2048, native], max_windows=args.ppl_windows, batch_size=1, progress=False
    )
    res["ppl@2048"], res[f"ppl@{native}"] = short.get(2048), short.get(native)
    done(f"ppl@2048,{native}")
    long_len = int(args.long_len)
    res[f"stream_ppl@{long_len}"] = perplexity.perplexity_vs_length(
        logits_fn, stream, [long_len], max_windows=args.long_windows, batch_size=1, progress=False
    ).get(long_len)
    done(f"stream_ppl@{long_len}")
    examples = eval_runner.cloze_examples(docs, tokenizer, context_len=512, cont_len=32, n=args.cloze_samples, seed=0)
    cloze = multiple_choice.score_examples("cloze", examples, logits_fn, tokenizer, batch_size=8, progress=False)
    res["cloze_acc"] = cloze["acc"]
    add_intervals(res, "cloze_acc", stats.wilson_interval(round(cloze["acc"] * cloze["n"]), cloze["n"]), cloze["n"])
    done(f"cloze ({cloze['n']})")
    generate = eval_runner.generate_fn_for(model, params, batch_size=args.gen_batch)  # one length's prompts at once
    for task in RETRIEVAL_TASKS:
        out = retrieval_task(generate, tokenizer, task, args, prompts)
        for length, acc in out["by_length"].items():
            res[f"{task}@{length}"] = acc
            add_intervals(res, f"{task}@{length}", out["by_length_ci"][length], out["by_length_n"][length])
        done(f"{task} " + " ".join(f"{n}:{a:.2f}" for n, a in out["by_length"].items()))
    return res


RETRIEVAL_TASKS = ("passkey", "niah_single", "niah_multikey")


def retrieval_task(generate, tokenizer, task: str, args, examples: dict | None) -> dict:
    """One passkey / NIAH task at every --lengths x --depths cell: the one call `evaluate` scores
    and `build_prompts` caches, so the cached prompts are exactly the ones evaluated."""
    return synthetic.evaluate_synthetic(
        generate,
        tokenizer,
        task,
        [int(x) for x in args.lengths.split(",")],
        [float(x) for x in args.depths.split(",")],
        args.samples_per_depth,
        0,
        progress=False,
        examples_cache=examples,
    )


def build_prompts(tokenizer, args, examples: dict) -> None:
    """Every passkey / NIAH prompt `evaluate` will use, into `examples` (no model: the stand-in
    decoder returns nothing, its scores are dropped)."""
    for task in RETRIEVAL_TASKS:
        t = time.perf_counter()
        retrieval_task(lambda ids, n: [], tokenizer, task, args, examples)
        print(f"[prompts] {task}: {time.perf_counter() - t:.1f}s", flush=True)


def plot_retrieval(out_dir: str, results: dict) -> str | None:
    """table1_real_retrieval.png: accuracy against context length, one panel per retrieval task,
    one line per row with its 95% intervals as error bars. None when matplotlib is missing (the
    GPU image) or no row has retrieval cells yet; `--plot_only` draws it later from the JSON."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in ROW_ORDER if n in results] + [n for n in results if n not in ROW_ORDER]
    names = [n for n in names if any(k.startswith(RETRIEVAL_TASKS) for k in results[n].get("eval", {}))]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(RETRIEVAL_TASKS), figsize=(5 * len(RETRIEVAL_TASKS), 4), sharey=True)
    for ax, task in zip(axes, RETRIEVAL_TASKS):
        for i, name in enumerate(names):
            ev = results[name]["eval"]
            lengths = sorted(int(k.split("@")[1]) for k in ev if k.startswith(f"{task}@") and k.split("@")[1].isdigit())
            if not lengths:
                continue
            ys = [ev[f"{task}@{n}"] for n in lengths]
            cis = [ev.get(f"{task}@{n}_ci", [y, y]) for n, y in zip(lengths, ys)]
            err = [[y - lo for y, (lo, _) in zip(ys, cis)], [hi - y for y, (_, hi) in zip(ys, cis)]]
            xs = [n * (1 + 0.02 * (i - len(names) / 2)) for n in lengths]  # a small offset: bars apart
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, color=plt.cm.tab20(i % 20))
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (95% interval)")
    legend = {}
    for ax in axes:  # every row once, whichever panels it has
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside, not over, data
    fig.tight_layout()
    path = os.path.join(out_dir, "table1_real_retrieval.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_tables(out_dir: str, results: dict, meta: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table1_real.json"), "w") as f:
        json.dump({"rows": results, "meta": meta}, f, indent=2)
    names = [n for n in ROW_ORDER if n in results] + [n for n in results if n not in ROW_ORDER]
    cols: list[str] = []
    for n in names:
        cols += [
            k
            for k, v in results[n].get("eval", {}).items()
            if k not in cols and not isinstance(v, (dict, list)) and not k.endswith("_n")
        ]
    cols += ["train_tokens", "gpu_seconds"]
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        row = dict(results[n].get("eval", {}))
        row["train_tokens"] = results[n].get("train_tokens", 0)
        row["gpu_seconds"] = results[n].get("train_seconds", 0.0) + results[n].get("eval_seconds", 0.0)
        cells = []
        for c in cols:
            v = row.get(c)
            cell = "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            if v is not None and f"{c}_ci" in row:  # accuracy: value [95% interval] (n)
                lo, hi = row[f"{c}_ci"]
                cell += f" [{lo:.2f}, {hi:.2f}] ({row.get(f'{c}_n', '?')})"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "table1_real_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot_retrieval(out_dir, results)


def build_meta(previous: dict, args, base, native: int) -> dict:
    """This call's meta: the earlier calls' (notes written by them or by hand stay), updated."""
    return {
        **previous,
        "config": args.config,
        "checkpoint": base.model.checkpoint,
        "native_len": native,
        "student_rope": dict(base.student.rope_scaling),
        "big_mult": args.big_mult,
        "args": vars(args),
        "calls": list(previous.get("calls", [])),  # every call that added to this file
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_135m_pi32k.py")
    p.add_argument("--checkpoint", default="", help="override config.model.checkpoint (e.g. a staged .gguf)")
    p.add_argument("--data", default="", help="training JSONL (required unless --plot_only / --prompts_only)")
    p.add_argument("--heldout", default="", help="held-out JSONL (required unless --plot_only / --prompts_only)")
    p.add_argument("--workdir", default="runs/table1_real")
    p.add_argument("--out", default="docs/table1_real")
    p.add_argument("--rows", default=",".join(ROW_ORDER))
    p.add_argument(
        "--data_mode",
        default="packed",
        choices=("packed", "per_document"),
        help="training blocks of every row: packed = the whole corpus as one stream at any length (the same "
        "text for 8K and 32K rows); per_document = the config's blocks within documents (drops documents "
        "shorter than a block: at 32K most of them)",
    )
    p.add_argument("--big_mult", type=int, default=10, help="token multiple N of the large-budget baselines")
    p.add_argument("--extra_lrs", default="", help="comma list: extra LinearARD rows at these learning rates")
    p.add_argument("--cpt_lr", type=float, default=0.0, help="CPT learning rate (0 = the config's)")
    p.add_argument(
        "--extra_cpt_lrs",
        default="",
        help="comma list: cpt_1x_lr<rate> and linearard_cpt_lr<rate> (both stages at the rate) rows",
    )
    p.add_argument(
        "--extra_big_lrs",
        default="",
        help="comma list: cpt_Nx_lr<rate> and longred_simplified_Nx_lr<rate> rows at these learning rates",
    )
    p.add_argument("--steps", type=int, default=0, help="override LinearARD steps (rehearsals)")
    p.add_argument("--seq_len", type=int, default=0, help="override the native training length (rehearsals)")
    p.add_argument("--long_len", type=int, default=32768)
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--samples_per_depth", type=int, default=20, help="per (length, depth): 5 x 20 = 100 a cell")
    p.add_argument("--ppl_windows", type=int, default=16)
    p.add_argument("--long_windows", type=int, default=2)
    p.add_argument("--cloze_samples", type=int, default=200)
    p.add_argument("--eval_dtype", default="bfloat16", help="compute dtype of every evaluated model")
    p.add_argument("--gen_batch", type=int, default=10, help="passkey/NIAH prompts decoded together")
    p.add_argument("--time_budget_s", type=float, default=0.0, help="0 = no limit")
    p.add_argument(
        "--compile_cache",
        default="",
        help="JAX persistent compilation cache dir ('' = <workdir>/jax_compilation_cache)",
    )
    p.add_argument(
        "--prompt_cache",
        default="",
        help="built passkey/NIAH prompts (gzip pickle) for later calls ('' = <workdir>/synthetic_prompts.pkl.gz)",
    )
    p.add_argument("--prompts_only", action="store_true", help="build the --prompt_cache file and exit (no model)")
    p.add_argument("--plot_only", action="store_true", help="redraw the table and plot from <out>'s JSON")
    args = p.parse_args(argv)
    if not (args.plot_only or args.prompts_only) and not (args.data and args.heldout):
        p.error("--data and --heldout are required to train or evaluate rows (not for --plot_only / --prompts_only)")
    if args.plot_only:
        with open(os.path.join(args.out, "table1_real.json")) as f:
            saved = json.load(f)
        write_tables(args.out, saved.get("rows", {}), saved.get("meta", {}))
        return
    t_start = time.perf_counter()
    # every row's evaluation (and a resumed call's) reuses the programs compiled before
    enable_compilation_cache(args.compile_cache or args.workdir, subdir="" if args.compile_cache else CACHE_SUBDIR)

    base = load_config(args.config)
    with base.unlocked():
        if args.checkpoint:
            base.model.checkpoint = args.checkpoint
        if args.steps:
            base.train.steps = args.steps
        if args.seq_len:
            base.data.seq_len = args.seq_len
    native = base.data.seq_len
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "table1_real.json")
    previous = json.load(open(path)) if os.path.exists(path) else {}
    results = previous.get("rows", {})
    mixed = sorted(n for n, r in results.items() if row_data_mode(r, args.data_mode) != args.data_mode)
    if mixed and not args.prompts_only:  # checked before any model loads: one table, one training text
        raise SystemExit(
            f"{path} holds rows trained with another --data_mode ({', '.join(mixed)}); every trained row of one "
            "table reads the same text: pass the same --data_mode or write to another --out"
        )
    meta = build_meta(previous.get("meta", {}), args, base, native)
    import jax

    call = {
        "command": "python -m experiments.table1_real " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": [],
    }
    meta["calls"].append(call)
    meta["device"], meta["jax"] = call["device"], call["jax"]

    print(f"[setup] {time.perf_counter() - t_start:.0f}s: loading tokenizer, teacher, held-out text", flush=True)
    tokenizer = load_tokenizer(base.data.tokenizer or base.model.checkpoint)
    prompt_cache = PromptCache(args.prompt_cache or os.path.join(args.workdir, "synthetic_prompts.pkl.gz"), tokenizer)
    if args.prompts_only:
        build_prompts(tokenizer, args, prompt_cache.examples)
        prompt_cache.save()
        print(f"{len(prompt_cache.examples)} prompts in {prompt_cache.path}", flush=True)
        return
    teacher, frozen = as_scanned(*hf.load_pretrained(base.model.checkpoint, dtype=dtype_of(args.eval_dtype)))
    docs = eval_runner.heldout_token_docs(args.heldout, tokenizer)
    stream = long_stream(docs, getattr(tokenizer, "eos_id", None))
    rows = train_rows(
        base,
        args.big_mult,
        [float(x) for x in args.extra_lrs.split(",") if x],
        [float(x) for x in args.extra_cpt_lrs.split(",") if x],
        [float(x) for x in args.extra_big_lrs.split(",") if x],
    )
    wanted = [r for r in args.rows.split(",") if r]
    print(f"[setup] {time.perf_counter() - t_start:.0f}s: {sum(map(len, docs))} held-out tokens", flush=True)
    per_row_estimate = 0.0
    prompts = prompt_cache.examples  # passkey / NIAH prompts: built once for every row and later call
    for name in wanted:
        if name in results and "error" not in results[name]:
            print(f"[{name}] done already, skipped", flush=True)
            continue
        elapsed = time.perf_counter() - t_start
        if args.time_budget_s and elapsed + per_row_estimate > args.time_budget_s:
            print(
                f"[{name}] stopping: {elapsed:.0f}s used of {args.time_budget_s:.0f}s; call again to resume", flush=True
            )
            break
        t_row = time.perf_counter()
        call["rows"].append(name)
        try:
            results[name] = run_and_evaluate(
                name, base, rows, teacher, frozen, tokenizer, docs, stream, args, native, prompts
            )
        except preemption.Preempted as e:  # SIGTERM (e.g. `timeout -s TERM`): checkpointed at a step
            call["rows"].remove(name)  # not a result: the next call resumes the row from its checkpoint
            print(f"[{name}] stopped with a checkpoint ({e}); call again to resume the row", flush=True)
            break
        except Exception as e:  # noqa: BLE001  (one failed row must not lose the others' device time)
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        per_row_estimate = max(per_row_estimate, time.perf_counter() - t_row)
        write_tables(args.out, results, meta)
        prompt_cache.save()
    write_tables(args.out, results, meta)


def run_and_evaluate(name, base, rows, teacher, frozen, tokenizer, docs, stream, args, native, prompts=None) -> dict:
    row: dict = {}
    if name == "teacher":
        model, params = teacher, frozen
    elif name in ("scaled", "scaled_yarn"):
        rope = dict(base.student.rope_scaling)
        if name == "scaled_yarn":
            rope = {
                "rope_type": "yarn",
                "factor": rope["factor"],
                "original_max_position_embeddings": teacher.config.max_position_embeddings,
            }
        model = LlamaForCausalLM(
            teacher.config.replace(rope_scaling=rope, max_position_embeddings=int(native * float(rope["factor"])))
        )
        params = frozen
    elif name in rows:
        row.update(run_row(base, name, rows[name], args))
        model, params = as_scanned(*hf.load_pretrained(row["hf_student"], dtype=dtype_of(args.eval_dtype)))
    else:
        raise SystemExit(f"unknown row {name!r}; expected one of {ROW_ORDER + tuple(rows)}")
    t_eval = time.perf_counter()
    print(f"[{name}] evaluating", flush=True)
    row["eval"] = evaluate(model, params, tokenizer, docs, stream, args, native, label=name, prompts=prompts)
    row["eval_seconds"] = time.perf_counter() - t_eval
    return row


if __name__ == "__main__":
    main()
