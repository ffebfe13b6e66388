"""A small hyper-parameter sweep through the real pipeline: one `run_restoration` per setting.

    python -m experiments.sweep --config=configs/demo_smollm2.py --root=/tmp/sweep --out=/tmp/sweep.json \
        --common 'eval.tasks=("short_ppl","ppl_vs_length");eval.distortion=False' \
        --run 'lr3e-4:train.lr=3e-4' --run 'lr1e-3_60:train.lr=1e-3;train.steps=60'

Each `--run NAME:key=value;key=value` is the config file's get_config() with the `--common`
overrides and then its own, parsed exactly as `--config.key=value` on experiments.restore's
command line (lard_jax.cli.parse). Every run gets its own workdir under --root, so a sweep that
is stopped resumes: a finished run (its name in --out) is skipped, an unfinished one resumes from
its last checkpoint. After every run --out is rewritten with what each run reported (summary.json:
short-text perplexity of teacher / scaled / restored and the recovery; report.json's perplexity at
every evaluated length; wall seconds), and a table is printed. `--time_budget_s` stops before
starting a run once that much time has passed (for device calls with a hard limit).

This is the tool the SmolLM2 CPU demo's settings were chosen with (docs/demo_smollm2/README.md); it
times and evaluates exactly what `experiments.restore` would run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lard_jax import cli


def parse_overrides(text: str) -> dict:
    """ "key=value;key=value" -> {key: value text}; values are parsed by the CLI (lard_jax.cli.parse)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"error: override {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def load_config(config_path: str, *overrides: dict):
    """The config as `python -m experiments.restore --config=PATH --config.key=value ...` builds it
    (same parsing, same errors for an unknown key)."""
    argv = ["experiments.sweep", f"--config={config_path}"]
    argv += [f"--config.{k}={v}" for o in overrides for k, v in o.items()]
    config, _ = cli.parse(argv, config_required_hint="")
    return config


def run_one(config_path: str, common: dict, own: dict, workdir: str) -> dict:
    from lard_jax.pipeline import run_restoration

    config = load_config(config_path, common, own, {"workdir": workdir})
    t0 = time.perf_counter()
    summary = run_restoration(config)
    row = {"overrides": own, "wall_s": time.perf_counter() - t0, **summary}
    report = os.path.join(workdir, "report.json")
    if os.path.exists(report):
        with open(report) as f:
            results = json.load(f)
        models = results.get("models", results)
        row["ppl_vs_length"] = {
            name: r.get("ppl_vs_length") for name, r in models.items() if isinstance(r, dict) and "ppl_vs_length" in r
        }
    return row


def recovery_at(row: dict, length: str) -> float | None:
    ppl = row.get("ppl_vs_length") or {}
    try:
        t, s, r = (float(ppl[m][length]) for m in ("teacher", "scaled", "restored"))
    except (KeyError, TypeError):
        return None
    return (s - r) / (s - t) if s != t else None


def print_table(rows: dict) -> None:
    print(f"{'run':<24} {'steps':>5} {'lr':>8} {'ppl_restored':>12} {'recovery':>9} {'wall_s':>7}  per length")
    for name, row in rows.items():
        ppl = row.get("short_ppl") or {}
        lengths = sorted({k for m in (row.get("ppl_vs_length") or {}).values() if m for k in m}, key=int)
        per_len = ", ".join(f"{k}: {recovery_at(row, k):.3f}" for k in lengths if recovery_at(row, k) is not None)
        rec = row.get("recovery")
        rec = "" if rec is None else f"{rec:.3f}"
        print(
            f"{name:<24} {row['overrides'].get('train.steps', ''):>5} {row['overrides'].get('train.lr', ''):>8} "
            f"{ppl.get('restored') or float('nan'):>12.3f} {rec:>9} "
            f"{row['wall_s']:>7.0f}  {per_len}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--root", required=True, help="one workdir per run under here")
    p.add_argument("--out", required=True, help="JSON of every finished run")
    p.add_argument("--common", default="", help="overrides for every run: key=value;key=value")
    p.add_argument("--run", action="append", default=[], help="NAME:key=value;key=value (repeatable)")
    p.add_argument("--time_budget_s", type=float, default=0.0, help="start no run after this many seconds (0 = none)")
    args = p.parse_args(argv)
    common = parse_overrides(args.common)
    runs = []
    for spec in args.run:
        name, sep, text = spec.partition(":")
        if not sep or not name:
            raise SystemExit(f"error: --run {spec!r}: expected NAME:key=value;...")
        runs.append((name, parse_overrides(text)))
    rows = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f).get("runs", {})
    t0 = time.perf_counter()
    for name, own in runs:
        if name in rows:
            continue
        if args.time_budget_s and time.perf_counter() - t0 > args.time_budget_s:
            print(f"time budget reached: {name} and later runs not started")
            break
        rows[name] = run_one(args.config, common, own, os.path.join(args.root, name))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "common": common, "runs": rows}, f, indent=2)
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
