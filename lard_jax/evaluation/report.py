"""One evaluation run written as report.json, report.md and PNG plots, models side by side.

report.json schema (every key optional except "models" and "meta"; lengths and depths are
JSON object keys, hence strings; accuracies are fractions in [0, 1]; NaN/inf become null):

    {
      "models": {
        "<model name>": {
          "short_ppl": float,                          # perplexity at the native length
          "ppl_vs_length": {"<length>": float},        # perplexity.perplexity_vs_length
          "passkey": {"<length>": float},              # passkey accuracy per length
          "tasks": {"<task>": {"acc": float, "acc_norm": float, "ppl": float, "n": int}},
                                                       # multiple_choice.score_task per task
          "synthetic": {"<task>": {"mean": float, "n": int,
                                   "by_length": {"<length>": float},
                                   "by_length_depth": {"<length>": {"<depth>": float}}}},
                                                       # synthetic.evaluate_synthetic per task
          "<other>": float                             # any other scalar, listed as is
        }
      },
      "distortion": {"<model name>": {"q": [[float]], "k": [[float]], "v": [[float]]}},
                                                       # distortion.relation_distortion, [layer][head]
      "training": {"<stage>": [{"step": int, "loss": float, ...}]},  # the run's metrics_<stage>.jsonl
      "meta": {"title": str, "created_utc": str, "model_order": [str], ...caller's meta}
    }

A plot is drawn only when it has something to show: a curve against length needs two lengths, a
depth x length heatmap two lengths, the loss curve two logged steps; the tables carry the rest.

Columns follow the order teacher, scaled, restored, then any other model (baselines) in the
order given. Files are written to a temporary name in `run_dir` and renamed into place.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["write_report", "MODEL_ORDER", "summary_rows", "recovery"]

MODEL_ORDER = ("teacher", "scaled", "restored")


def write_report(
    run_dir: str | os.PathLike,
    results: dict[str, dict],
    *,
    distortion: dict[str, dict[str, Any]] | None = None,
    title: str = "LinearARD evaluation",
    meta: dict | None = None,
    training: dict[str, list[dict]] | None = None,
) -> dict[str, str]:
    """Writes the report files under `run_dir`; returns {name: path} of everything written.
    `training`: stage -> logged train metrics (records with "step" and "loss"), for the loss curve."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    models = _ordered(results)
    report = {
        "models": {name: _jsonable(results[name]) for name in models},
        "meta": {
            "title": title,
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model_order": models,
            **_jsonable(meta or {}),
        },
    }
    if distortion:
        report["distortion"] = {name: _jsonable(distortion[name]) for name in _ordered(distortion)}
    if training:
        report["training"] = {stage: _jsonable(list(records)) for stage, records in training.items() if records}

    written = {"report.json": os.path.join(run_dir, "report.json")}
    _atomic_write(written["report.json"], lambda f: f.write(json.dumps(report, indent=2, allow_nan=False).encode()))
    plots = _write_plots(run_dir, report)
    written.update(plots)
    markdown = _markdown(report, plots)
    written["report.md"] = os.path.join(run_dir, "report.md")
    _atomic_write(written["report.md"], lambda f: f.write(markdown.encode()))
    return written


# ----------------------------------------------------------------------------- helpers


def _ordered(named: dict) -> list[str]:
    known = [name for name in MODEL_ORDER if name in named]
    return known + [name for name in named if name not in MODEL_ORDER]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer, bool, np.bool_)):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    folder, name = os.path.split(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _sorted_numeric(keys) -> list[str]:
    return sorted(keys, key=lambda k: float(k))


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------- plots


def _write_plots(run_dir: str, report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    models = report["models"]
    written: dict[str, str] = {}

    def save(figure, name: str) -> None:
        path = os.path.join(run_dir, name)
        _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        plt.close(figure)
        written[name] = path

    for key, ylabel, name, log_y in (
        ("ppl_vs_length", "perplexity", "ppl_vs_length.png", True),
        ("passkey", "passkey accuracy", "passkey_vs_length.png", False),
    ):
        curves = {m: metrics[key] for m, metrics in models.items() if metrics.get(key)}
        if max((len(c) for c in curves.values()), default=0) < 2:  # one point per model: the table says it
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        for model, curve in curves.items():
            lengths = _sorted_numeric(curve)
            axis.plot([int(float(x)) for x in lengths], [curve[x] for x in lengths], marker="o", label=model)
        axis.set_xscale("log", base=2)
        if log_y:
            axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
        save(figure, name)

    def heatmap(grid: dict, title: str, name: str) -> None:
        lengths, depths, values = _grid_values(grid)
        if len(lengths) < 2:  # one column: the markdown table shows it
            return
        figure, axis = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.5 * len(depths)))
        image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(lengths)), [str(int(float(l))) for l in lengths])
        axis.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value):
                axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel("needle depth")
        axis.set_title(title)
        figure.colorbar(image, ax=axis, label="score")
        save(figure, name)

    for model, metrics in models.items():
        for task, result in (metrics.get("synthetic") or {}).items():
            grid = result.get("by_length_depth") or {}
            if grid:
                heatmap(grid, f"{task}: {model}", f"heatmap_{_safe_name(task)}_{_safe_name(model)}.png")
        needle_tasks = [r for r in (metrics.get("synthetic") or {}).values() if r.get("by_length_depth")]
        combined = _mean_depth_grid(metrics) if len(needle_tasks) > 1 else {}  # one task: its own map
        if combined:  # one depth x length map per model: the mean over its needle tasks
            heatmap(combined, f"needle tasks (mean): {model}", f"heatmap_depth_length_{_safe_name(model)}.png")

    curves = {
        stage: [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and r.get("step") is not None]
        for stage, records in (report.get("training") or {}).items()
    }
    if any(len(c) >= 2 for c in curves.values()):
        figure, axis = plt.subplots(figsize=(6, 4))
        offset = 0
        for stage, points in curves.items():  # stages one after another on one step axis
            if points:
                axis.plot([offset + s for s, _ in points], [v for _, v in points], marker=".", label=stage)
                offset += max(s for s, _ in points)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
        axis.legend()
        save(figure, "loss_curve.png")

    from matplotlib.ticker import MaxNLocator

    maps = {
        model: {r: np.array([[_nan_if_none(v) for v in row] for row in m], float) for r, m in relations.items()}
        for model, relations in (report.get("distortion") or {}).items()
    }
    # One colour scale per relation across models, so scaled and restored maps compare by eye.
    vmax: dict[str, float] = {}
    for relations in maps.values():
        for relation, values in relations.items():
            if values.size and not np.all(np.isnan(values)):
                vmax[relation] = max(vmax.get(relation, 0.0), float(np.nanmax(values)))
    for model, relations in maps.items():
        figure, axes = plt.subplots(1, len(relations), figsize=(4.5 * len(relations), 4), squeeze=False)
        for axis, (relation, values) in zip(axes[0], relations.items()):
            image = axis.imshow(
                values, cmap="viridis", aspect="auto", origin="lower", vmin=0.0, vmax=vmax.get(relation)
            )
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.yaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel("head")
            axis.set_ylabel("layer")
            axis.set_title(f"{relation.upper()}/{relation.upper()} relation KL")
            figure.colorbar(image, ax=axis)
        figure.suptitle(f"relation distortion vs teacher: {model}", y=1.03)
        save(figure, f"distortion_{_safe_name(model)}.png")
    return written


def _grid_values(grid: dict) -> tuple[list[str], list[str], np.ndarray]:
    """{length: {depth: score}} -> (lengths, depths, values[depth, length]) with NaN for holes."""
    lengths = _sorted_numeric(grid)
    depths = _sorted_numeric({d for per in grid.values() for d in per})
    return lengths, depths, np.array([[_nan_if_none(grid[l].get(d)) for l in lengths] for d in depths], float)


def _mean_depth_grid(metrics: dict) -> dict:
    """Mean over a model's depth-bearing synthetic tasks, cell by cell ({} when it has none)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for result in (metrics.get("synthetic") or {}).values():
        for length, per in (result.get("by_length_depth") or {}).items():
            for depth, value in per.items():
                if value is not None:
                    cells.setdefault(str(length), {}).setdefault(str(depth), []).append(float(value))
    return {l: {d: float(np.mean(v)) for d, v in per.items()} for l, per in cells.items()}


def _nan_if_none(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ----------------------------------------------------------------------------- markdown


def _format(value: Any, percent: bool) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def _table(header: str, models: list[str], rows: list[tuple[str, list[Any], bool]]) -> list[str]:
    lines = [f"| {header} | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for label, values, percent in rows:
        lines.append(f"| {label} | " + " | ".join(_format(v, percent) for v in values) + " |")
    return lines + [""]


def _markdown(report: dict, plots: dict[str, str]) -> str:
    models_metrics = report["models"]
    models = list(models_metrics)
    lines = [f"# {report['meta']['title']}", "", f"Created {report['meta']['created_utc']}.", ""]

    def section(title: str, header: str, rows: list[tuple[str, list[Any], bool]], plot_names=()) -> None:
        if not rows:
            return
        lines.extend([f"## {title}", ""] + _table(header, models, rows))
        for name in plot_names:
            if name in plots:
                lines.extend([f"![{name}]({name})", ""])

    rows = []
    if any("short_ppl" in m for m in models_metrics.values()):
        rows.append(("perplexity (native length)", [m.get("short_ppl") for m in models_metrics.values()], False))
    tasks = sorted({t for m in models_metrics.values() for t in (m.get("tasks") or {})})
    for task in tasks:
        names = sorted({k for m in models_metrics.values() for k in (m.get("tasks") or {}).get(task, {})})
        for metric in names:
            values = [(m.get("tasks") or {}).get(task, {}).get(metric) for m in models_metrics.values()]
            rows.append(
                (f"{task} {metric}" + (" (%)" if metric.startswith("acc") else ""), values, metric.startswith("acc"))
            )
    section("Short-context quality", "metric", rows)

    section(
        "Perplexity vs context length",
        "length",
        _by_length_rows(models_metrics, "ppl_vs_length", False),
        ["ppl_vs_length.png"],
    )
    section(
        "Passkey retrieval (%)", "length", _by_length_rows(models_metrics, "passkey", True), ["passkey_vs_length.png"]
    )

    rows = []
    synthetic_tasks = sorted({t for m in models_metrics.values() for t in (m.get("synthetic") or {})})
    for task in synthetic_tasks:
        per_model = [(m.get("synthetic") or {}).get(task, {}) for m in models_metrics.values()]
        rows.append((f"{task} (mean)", [r.get("mean") for r in per_model], True))
        lengths = _sorted_numeric({l for r in per_model for l in r.get("by_length", {})})
        rows.extend((f"{task} @ {l}", [r.get("by_length", {}).get(l) for r in per_model], True) for l in lengths)
    heatmaps = [name for name in plots if name.startswith("heatmap_")]  # in model order
    section("Synthetic long-context tasks (%)", "task", rows, heatmaps)
    for model, metrics in models_metrics.items():
        grids = [
            (f"{task}, {model}", r["by_length_depth"])
            for task, r in (metrics.get("synthetic") or {}).items()
            if r.get("by_length_depth")
        ]
        if len(grids) > 1:  # each task's own map, then their mean
            grids.append((f"{model} (mean over needle tasks)", _mean_depth_grid(metrics)))
        for heading, grid in grids:
            _depth_table(lines, heading, grid)

    distortion = report.get("distortion") or {}
    if distortion:
        lines.extend(["## Relation distortion vs teacher (mean row KL)", ""])
        lines.append(
            "| model | " + " | ".join(f"{r.upper()} mean | {r.upper()} worst layer" for r in ("q", "k", "v")) + " |"
        )
        lines.append("|---" * 7 + "|")
        for model, relations in distortion.items():
            cells = []
            for relation in ("q", "k", "v"):
                values = np.array([[_nan_if_none(v) for v in row] for row in relations.get(relation, [])], float)
                if values.size == 0:
                    cells += ["n/a", "n/a"]
                    continue
                per_layer = np.nanmean(values, axis=1)
                cells += [f"{np.nanmean(values):.4g}", f"{int(np.nanargmax(per_layer))} ({np.nanmax(per_layer):.4g})"]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
        for name in (n for n in plots if n.startswith("distortion_")):
            lines.extend([f"![{name}]({name})", ""])

    training = report.get("training") or {}
    if training:
        lines.extend(["## Training", "", "| stage | logged steps | first loss | last loss |", "|---|---|---|---|"])
        for stage, records in training.items():
            losses = [(r.get("step"), r.get("loss")) for r in records if r.get("loss") is not None]
            if losses:
                (s0, l0), (s1, l1) = losses[0], losses[-1]
                lines.append(f"| {stage} | {len(losses)} | {l0:.4g} (step {s0}) | {l1:.4g} (step {s1}) |")
        lines.append("")
        if "loss_curve.png" in plots:
            lines.extend(["![loss_curve.png](loss_curve.png)", ""])

    known = {"short_ppl", "ppl_vs_length", "passkey", "tasks", "synthetic"}
    others = sorted(
        {k for m in models_metrics.values() for k, v in m.items() if k not in known and isinstance(v, (int, float))}
    )
    section("Other metrics", "metric", [(k, [m.get(k) for m in models_metrics.values()], False) for k in others])
    return "\n".join(lines)


def recovery(values: dict[str, Any], lower_is_better: bool) -> float | None:
    """The share of what scaling lost that restoration won back: (scaled - restored) / (scaled -
    teacher) for perplexity, (restored - scaled) / (teacher - scaled) for accuracy; None when a
    model is missing or scaling did not make the model worse than the teacher."""
    t, sc, r = (values.get(k) for k in ("teacher", "scaled", "restored"))
    if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in (t, sc, r)):
        return None
    lost = (sc - t) if lower_is_better else (t - sc)
    if lost <= 0:  # scaling lost nothing here (past its window the teacher is often the worse one)
        return None
    return (sc - r) / lost if lower_is_better else (r - sc) / lost


def summary_rows(models_metrics: dict[str, dict]) -> list[tuple[str, dict[str, Any], bool]]:
    """Every headline number of a report, one row per (metric, length): (label, {model: value},
    lower_is_better). Perplexity at the native length and at each evaluated length, the tasks'
    accuracies, passkey and each synthetic task at each length."""
    rows: list[tuple[str, dict[str, Any], bool]] = []

    def add(label, get, lower):
        values = {m: get(metrics) for m, metrics in models_metrics.items()}
        if any(v is not None for v in values.values()):
            rows.append((label, values, lower))

    def norm(mapping):  # lengths as ints: fresh results use ints, report.json round-trips strings
        return {int(float(k)): v for k, v in (mapping or {}).items()}

    def at(mapping, length):
        return norm(mapping).get(length)

    add("ppl (native length)", lambda m: m.get("short_ppl"), True)
    for length in sorted({l for m in models_metrics.values() for l in norm(m.get("ppl_vs_length"))}):
        add(f"ppl @ {length}", lambda m, length=length: at(m.get("ppl_vs_length"), length), True)
    if any("cloze_acc" in m for m in models_metrics.values()):
        add("cloze acc", lambda m: m.get("cloze_acc"), False)
    for task in sorted({t for m in models_metrics.values() for t in (m.get("tasks") or {})}):
        add(f"{task} acc", lambda m, task=task: (m.get("tasks") or {}).get(task, {}).get("acc"), False)
    for length in sorted({l for m in models_metrics.values() for l in norm(m.get("passkey"))}):
        add(f"passkey @ {length}", lambda m, length=length: at(m.get("passkey"), length), False)
    for task in sorted({t for m in models_metrics.values() for t in (m.get("synthetic") or {})} - {"passkey"}):
        lengths = {
            l
            for m in models_metrics.values()
            for l in norm(((m.get("synthetic") or {}).get(task) or {}).get("by_length"))
        }
        for length in sorted(lengths):
            add(
                f"{task} @ {length}",
                lambda m, task=task, length=length: at(
                    ((m.get("synthetic") or {}).get(task) or {}).get("by_length"), length
                ),
                False,
            )
    return rows


def _depth_table(lines: list[str], heading: str, grid: dict) -> None:
    """A needle depth x length table (%) under `heading`."""
    lengths, depths, values = _grid_values(grid)
    lines.extend(
        [
            f"### Needle depth x length: {heading} (%)",
            "",
            "| depth | " + " | ".join(str(int(float(l))) for l in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
    )
    for depth, row in zip(depths, values):
        lines.append(
            f"| {float(depth):.0%} | " + " | ".join("n/a" if np.isnan(v) else f"{100 * v:.0f}" for v in row) + " |"
        )
    lines.append("")


def _by_length_rows(models_metrics: dict, key: str, percent: bool) -> list[tuple[str, list[Any], bool]]:
    lengths = _sorted_numeric({l for m in models_metrics.values() for l in (m.get(key) or {})})
    return [(l, [(m.get(key) or {}).get(l) for m in models_metrics.values()], percent) for l in lengths]
