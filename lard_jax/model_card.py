"""hf_student/README.md: the restored student's own model card, with the teacher's card below it.

    text = build_card(config, student_config, teacher_hf_config, train_tokens=61440, command="python -m ...",
                      report=json.load(open("report.json")), teacher_card=open("ckpt/README.md").read())
    write_card(out, config, student_config, teacher_hf_config, train_tokens=..., export_dtypes=...)  # at export
    add_report(out, "runs/x/report.json", native_len=256)  # after evaluation: fills in the table

`build_card` is pure (strings in, markdown out). The card says what the student is (base model, the
RoPE scaling config.json carries, the positions it claims), how it was made (method, trained tensors,
tokens, optimizer, data, the command), what the evaluation measured (teacher / scaled / restored,
from report.json, once there is one), and how to load it. The teacher's card follows, attributed and
marked as describing the teacher: its claims (native RoPE, context length) are not the student's.
Its YAML front matter moves into a code block, so the file keeps one front matter, ours.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys

from lard_jax import rope as rope_lib

_EVAL_BEGIN = "<!-- lard_jax:evaluation -->"
_EVAL_END = "<!-- /lard_jax:evaluation -->"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
_CARRIED_KEYS = ("license", "language")  # front-matter keys of the teacher's card that hold for the student


def default_command(argv: list[str] | None = None) -> str | None:
    """The command line of this process when it is `python -m experiments.restore ...`, else None."""
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) not in ("restore.py", "experiments.restore"):
        return None
    return " ".join(["python", "-m", "experiments.restore", *(shlex.quote(a) for a in argv[1:])])


def default_train_tokens(config, student_max_positions: int) -> int:
    """Tokens the run's stages train on (as lard_jax.plan.Plan.train_tokens)."""
    tokens = config.train.steps * config.train.batch_size * config.train.grad_accum * config.data.seq_len
    s2 = config.stage2
    if s2.steps:
        tokens += s2.steps * s2.batch_size * s2.grad_accum * (s2.seq_len or student_max_positions)
    return int(tokens)


# ----------------------------------------------------------------------------------------------
# pure pieces
def split_front_matter(card: str) -> tuple[dict[str, str], str, str]:
    """({top-level key: raw value}, the front matter text, the body) of a model card."""
    m = _FRONT_MATTER.match(card)
    if not m:
        return {}, "", card
    keys = {}
    for line in m.group(1).splitlines():
        k = re.match(r"^([A-Za-z_][\w-]*):\s*(.*)$", line)
        if k:
            keys[k.group(1)] = k.group(2).strip()
    return keys, m.group(1), card[m.end() :]


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _cells(models: dict, get) -> list[str]:
    out = []
    for name in ("teacher", "scaled", "restored"):
        try:
            out.append(_fmt(get(models.get(name) or {})))
        except (KeyError, TypeError, AttributeError):
            out.append("–")
    return out


def report_rows(report: dict, native_len: int | None = None) -> list[tuple[str, list[str]]]:
    """(metric, [teacher, scaled, restored]) rows of an evaluation report (lard_jax.evaluation.report's
    report.json schema); a metric one model lacks shows as "–"."""
    models = report.get("models") or {}
    present = {k for m in models.values() if isinstance(m, dict) for k in m}

    def keys(field):
        return {k for m in models.values() if isinstance(m, dict) for k in (m.get(field) or {})}

    rows = []
    if "short_ppl" in present:
        at = f" at {native_len}" if native_len else " (native length)"
        rows.append((f"held-out perplexity{at}", _cells(models, lambda m: m["short_ppl"])))
    for length in sorted(keys("ppl_vs_length"), key=int):
        rows.append((f"held-out perplexity at {length}", _cells(models, lambda m, k=length: m["ppl_vs_length"][k])))
    if "cloze_acc" in present:
        rows.append(("held-out cloze accuracy (4-way)", _cells(models, lambda m: m["cloze_acc"])))
    for length in sorted(keys("passkey"), key=int):
        rows.append((f"passkey accuracy at {length}", _cells(models, lambda m, k=length: m["passkey"][k])))
    for task in sorted(keys("synthetic") - {"passkey"}):  # passkey: the rows above
        rows.append((f"{task} accuracy (mean)", _cells(models, lambda m, t=task: m["synthetic"][t]["mean"])))
    for task in sorted(keys("tasks")):
        rows.append((f"{task} accuracy", _cells(models, lambda m, t=task: m["tasks"][t]["acc"])))
    known = {"short_ppl", "ppl_vs_length", "cloze_acc", "passkey", "synthetic", "tasks"}
    for key in sorted(present - known):
        if all(isinstance(m.get(key), (int, float, type(None))) for m in models.values() if isinstance(m, dict)):
            rows.append((key, _cells(models, lambda m, k=key: m[k])))
    return rows


def report_section(report: dict | None, *, native_len: int | None = None, student_rope: str = "") -> str:
    """The card's evaluation section (between markers, so add_report can replace it)."""
    lines = [_EVAL_BEGIN, "## Evaluation", ""]
    rows = report_rows(report, native_len) if report else []
    if not rows:
        lines.append(
            "Not evaluated yet: the run writes its report (`report.md`, `report.json` in its workdir) after "
            "this export, and this section is filled in from it."
            if report is None
            else "The run's report holds no metric this card shows; see `report.md` in the run's workdir."
        )
    else:
        lines += [
            f"Held-out text the run never trained on; the teacher with its native RoPE, the same weights with "
            f"the student's RoPE{f' ({student_rope})' if student_rope else ''} before training (scaled), and this "
            "model (restored). Perplexity: lower is better.",
            "",
            "| | teacher (native RoPE) | scaled (untrained) | restored (this model) |",
            "|---|---|---|---|",
            *(f"| {name} | {' | '.join(cells)} |" for name, cells in rows),
        ]
        ppl = {k: (report.get("models") or {}).get(k, {}).get("short_ppl") for k in ("teacher", "scaled", "restored")}
        if None not in ppl.values() and ppl["scaled"] != ppl["teacher"]:
            recovery = (ppl["scaled"] - ppl["restored"]) / (ppl["scaled"] - ppl["teacher"])
            lines += [
                "",
                f"Recovery of the perplexity lost to scaling: ({_fmt(ppl['scaled'])} − {_fmt(ppl['restored'])}) / "
                f"({_fmt(ppl['scaled'])} − {_fmt(ppl['teacher'])}) = {recovery:.2f}.",
            ]
    lines += ["", _EVAL_END]
    return "\n".join(lines)


def _source(config) -> str:
    source = str(config.data.source)
    for split in ("train", "heldout"):
        if os.path.normpath(source) == os.path.normpath(os.path.join(config.workdir, "builtin_text", f"{split}.jsonl")):
            return f"`builtin:{split}` (Python's bundled documentation, split by document)"
    return f"`{source}`"


def _tokens(config, train_tokens) -> str:
    t = config.train
    stage1 = f"{t.steps} steps × {t.batch_size * t.grad_accum} sequences × {config.data.seq_len} tokens"
    if train_tokens is None:
        return stage1
    return f"{train_tokens:,} ({'stage 1: ' if config.stage2.steps else ''}{stage1})"


def _recipe_rows(config, student_config, train_tokens, export_dtypes) -> list[tuple[str, str]]:
    t, loss = config.train, config.loss
    layers = student_config.num_hidden_layers
    projections = {"qkv": "q_proj, k_proj, v_proj", "qkvo": "q_proj, k_proj, v_proj, o_proj"}.get(
        str(t.trainable), str(t.trainable)
    )
    method = str(loss.method)
    if method == "linearard":
        method += f": KL between teacher and student softmax relation rows of {', '.join(loss.relations).upper()}"
        if float(loss.get("lambda_logit", 0.0) or 0.0):
            method += f", plus logit KD (weight {loss.lambda_logit:g})"
    lora = f"LoRA rank {t.lora_rank}, alpha {t.lora_alpha:g}, merged into the weights" if t.lora_rank else "full"
    rows = [
        ("method", method),
        ("trained tensors", f"{projections} in all {layers} layers ({lora}); every other tensor is the teacher's"),
        ("training tokens", _tokens(config, train_tokens)),
        (
            "optimizer",
            f"AdamW, lr {t.lr:g} (warmup {t.warmup_steps} steps, cosine to {t.min_lr_ratio:g} × lr), "
            f"weight decay {t.weight_decay:g}, gradient clip {t.clip:g}",
        ),
        ("training text", _source(config)),
    ]
    s2 = config.stage2
    if s2.steps:
        rows.append(
            ("stage 2", f"continued pretraining, {s2.steps} steps at {s2.seq_len or 'the student length'} tokens")
        )
    if export_dtypes:
        rows.append(("stored dtypes", export_dtypes))
    return rows


def build_card(
    config,
    student_config,
    teacher_hf_config: dict,
    *,
    train_tokens: int | None = None,
    command: str | None = None,
    report: dict | None = None,
    native_len: int | None = None,
    teacher_card: str | None = None,
    teacher_about: str = "",
    export_dtypes: str = "",
    license: str | None = None,
    name: str | None = None,
) -> str:
    """The student's model card (markdown with YAML front matter), the teacher's card below it.

    teacher_hf_config: the teacher's config.json dict (for a GGUF, lard_jax.gguf.hf_config's);
    teacher_card: the teacher checkpoint's README.md, if it has one; teacher_about: a line saying
    what the teacher is when it has no card (e.g. a GGUF's general.* metadata); license: the
    front matter's license (default: the teacher card's); name: the title's (default: the
    checkpoint folder's name)."""
    checkpoint = str(config.model.checkpoint)
    student_rope = student_config.rope_scaling_dict
    teacher_rope = rope_lib.rope_scaling_from_hf_config(teacher_hf_config) if teacher_hf_config else None
    teacher_max = (teacher_hf_config or {}).get("max_position_embeddings")
    student_desc = rope_lib.describe_rope(student_rope)
    teacher_desc = rope_lib.describe_rope(teacher_rope) if teacher_rope else "native (no scaling)"
    name = name or os.path.basename(os.path.normpath(checkpoint)) or checkpoint

    carried, teacher_yaml, teacher_body = split_front_matter(teacher_card) if teacher_card else ({}, "", "")
    front = ["---", "library_name: transformers"]
    if license:
        carried["license"] = license
    front += [f"{k}: {carried[k]}" for k in _CARRIED_KEYS if carried.get(k)]
    front += ["tags:", "  - lard_jax", "  - linearard", "  - rope-scaling", "  - long-context", "---", ""]

    rope_json = json.dumps({"rope_type": student_rope.get("rope_type"), **student_rope} if student_rope else None)
    out = front + [
        f"# {name}, RoPE {student_desc}, restored with LinearARD",
        "",
        f"The teacher checkpoint `{checkpoint}` with its RoPE scaled ({student_desc}, "
        f"{teacher_max or '?'} → {student_config.max_position_embeddings} positions) and its attention "
        "projections retrained by LinearARD self-distillation (arXiv 2604.00004) to undo what the scaling "
        "costs on short text. Made with lard_jax (`experiments.restore`).",
        "",
        "## Base model",
        "",
        f"- Teacher: `{checkpoint}`{f' ({teacher_about})' if teacher_about else ''}: RoPE {teacher_desc}, "
        f"max_position_embeddings {teacher_max or '?'}, rope_theta {student_config.rope_theta:g}.",
        f"- This model: `rope_scaling` = `{rope_json}`, max_position_embeddings "
        f"{student_config.max_position_embeddings} (both in config.json); the same architecture, "
        "tokenizer and every weight outside the trained projections are the teacher's.",
        "",
        "## Recipe",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _recipe_rows(config, student_config, train_tokens, export_dtypes)),
        "",
        "Command:",
        "",
        "```bash",
        command or "# run from Python (lard_jax.pipeline.run_restoration); the full config is the run's config.json",
        "```",
        "",
        report_section(report, native_len=native_len, student_rope=student_desc),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/hf_student")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/hf_student")',
        "```",
        "",
        "Loads with transformers 4.51 or later; the RoPE scaling is read from config.json.",
    ]
    if teacher_card:
        out += [
            "",
            "---",
            "",
            "## The teacher's model card",
            "",
            f"Below, unchanged, is the model card that came with the teacher checkpoint `{checkpoint}`. It "
            "describes the teacher, not this model: where it speaks of RoPE, context length or evaluation "
            "results, this model differs as stated above.",
        ]
        if teacher_yaml:
            out += ["", "Its metadata:", "", "```yaml", teacher_yaml, "```"]
        out += ["", teacher_body.strip("\n")]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------
# files
def teacher_card_text(checkpoint_dir: str) -> str | None:
    """The teacher checkpoint's README.md (a Hugging Face model card), if it has one."""
    path = os.path.join(checkpoint_dir, "README.md")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def write_card(out: str, config, student_config, teacher_hf_config: dict, **kwargs) -> str:
    """Write out/README.md = build_card(...); the teacher's card is read from the checkpoint
    directory unless given. Returns the path."""
    if "teacher_card" not in kwargs and os.path.isdir(str(config.model.checkpoint)):
        kwargs["teacher_card"] = teacher_card_text(str(config.model.checkpoint))
    kwargs.setdefault("command", default_command())
    if kwargs.get("train_tokens") is None:
        kwargs["train_tokens"] = default_train_tokens(config, student_config.max_position_embeddings)
    path = os.path.join(out, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(build_card(config, student_config, teacher_hf_config, **kwargs))
    return path


def add_report(out: str, report, *, native_len: int | None = None) -> bool:
    """Fill the evaluation section of out/README.md from a report (report.json's path or its dict).
    Returns False (and changes nothing) when out/README.md has no such section."""
    path = os.path.join(out, "README.md")
    if not os.path.isfile(path):
        return False
    if not isinstance(report, dict):
        with open(report, encoding="utf-8") as f:
            report = json.load(f)
    with open(path, encoding="utf-8") as f:
        card = f.read()
    begin, end = card.find(_EVAL_BEGIN), card.find(_EVAL_END)
    if begin < 0 or end < begin:
        return False
    m = re.search(r"RoPE ([^\n]*?), restored with LinearARD", card)
    section = report_section(report, native_len=native_len, student_rope=m.group(1) if m else "")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(card[:begin] + section + card[end + len(_EVAL_END) :])
    os.replace(tmp, path)
    return True
