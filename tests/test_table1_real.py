"""experiments/table1_real.py's bookkeeping on CPU: the prompt cache a later call reuses, and the
row clock that adds up a row's seconds over calls."""

import json

import numpy as np
import pytest

from experiments import table1_real
from lard_jax.evaluation import synthetic
from lard_jax.tokenizer import ByteTokenizer


class _ShiftedBytes(ByteTokenizer):
    """Another tokenizer (ids shifted by one): its fingerprint differs from ByteTokenizer's."""

    def encode(self, text, add_bos=False):
        return [i + 1 for i in super().encode(text, add_bos=add_bos)]


def test_prompt_cache_round_trip_and_tokenizer_fingerprint(tmp_path):
    path = str(tmp_path / "prompts.pkl.gz")
    tok = ByteTokenizer()
    echo = lambda ids, n: list(ids[-n:])  # noqa: E731  (a deterministic stand-in for a model)

    first = table1_real.PromptCache(path, tok)
    out = synthetic.evaluate_synthetic(
        echo, tok, "passkey", [300, 400], [0.5], 2, 0, progress=False, examples_cache=first.examples
    )
    assert len(first.examples) == 4
    first.save()

    again = table1_real.PromptCache(path, tok)  # a later process with the same tokenizer
    assert again.examples.keys() == first.examples.keys()
    assert all(again.examples[k]["prompt_ids"] == first.examples[k]["prompt_ids"] for k in first.examples)
    built = []
    original = synthetic.TASKS["passkey"]
    synthetic.TASKS["passkey"] = lambda *a: built.append(a) or original(*a)
    try:
        out_again = synthetic.evaluate_synthetic(
            echo, tok, "passkey", [300, 400], [0.5], 2, 0, progress=False, examples_cache=again.examples
        )
    finally:
        synthetic.TASKS["passkey"] = original
    assert not built and out_again["by_length"] == out["by_length"]

    other = table1_real.PromptCache(path, _ShiftedBytes())  # another tokenizer: the file is not used
    assert other.examples == {}


def test_row_clock_adds_seconds_over_calls(tmp_path):
    path = str(tmp_path / "row" / "train_seconds.json")
    with table1_real.RowClock(path, every_s=0.01) as clock:
        pass
    first = clock.total_at_exit
    with open(path) as f:
        assert json.load(f)["seconds"] == first
    with table1_real.RowClock(path, every_s=0.01) as clock:
        pass
    assert clock.before == first and clock.total_at_exit >= first


class _BosBytes(ByteTokenizer):
    """The byte ids, but another bos id: prompts built with bos differ, the plain ids do not."""

    def encode(self, text, add_bos=False):
        ids = super().encode(text, add_bos=False)
        return ([250] + ids) if add_bos else ids


def test_prompt_cache_fingerprint_sees_the_bos(tmp_path):
    path = str(tmp_path / "p.pkl.gz")
    cache = table1_real.PromptCache(path, ByteTokenizer())
    cache.examples[("passkey", 0, 300, 500, 0, None)] = {"prompt_ids": [1, 2, 3]}
    cache.save()
    assert len(table1_real.PromptCache(path, ByteTokenizer()).examples) == 1
    assert table1_real.PromptCache(path, _BosBytes()).examples == {}


def test_train_rows_spend_the_stated_tokens_at_the_stated_rates():
    base = table1_real.load_config("configs/smollm2_135m_pi32k.py")
    rows = table1_real.train_rows(base, big_mult=10, extra_lrs=[1e-3], extra_cpt_lrs=[3e-3], extra_big_lrs=[3e-3])
    unit = base.train.steps * base.train.batch_size * base.train.grad_accum * base.data.seq_len

    def tokens(r):
        return r["steps"] * r.get("batch", base.train.batch_size) * r.get("accum", base.train.grad_accum) * r["seq_len"]

    long_len = int(base.data.seq_len * float(base.student.rope_scaling["factor"]))
    assert tokens(rows["linearard"]) == unit
    assert rows["cpt_1x"]["seq_len"] == long_len and abs(tokens(rows["cpt_1x"]) - unit) < long_len
    assert abs(tokens(rows["cpt_Nx"]) - 10 * unit) < long_len
    assert tokens(rows["longred_simplified_Nx"]) == 10 * unit
    assert rows["linearard_lr0.001"]["lr"] == 1e-3 and tokens(rows["linearard_lr0.001"]) == unit
    assert rows["cpt_1x_lr0.003"] == dict(rows["cpt_1x"], lr=3e-3)
    assert rows["linearard_cpt_lr0.003"] == dict(rows["linearard_cpt"], lr=3e-3, stage2_lr=3e-3)
    assert "lr" not in rows["linearard"] and "lr" not in rows["cpt_1x"]  # the config's rate
    assert rows["cpt_Nx_lr0.003"] == dict(rows["cpt_Nx"], lr=3e-3)
    assert rows["longred_simplified_Nx_lr0.003"] == dict(rows["longred_simplified_Nx"], lr=3e-3)


def test_data_is_required_only_to_run_rows(tmp_path, capsys):
    with pytest.raises(SystemExit):
        table1_real.main(["--out", str(tmp_path), "--rows", "teacher"])
    assert "--data and --heldout are required" in capsys.readouterr().err
    (tmp_path / "table1_real.json").write_text(json.dumps({"rows": {}, "meta": {}}))
    table1_real.main(["--out", str(tmp_path), "--plot_only"])  # no --data needed to redraw
    assert (tmp_path / "table1_real_table.md").exists()


def test_one_table_never_mixes_rows_trained_on_different_text(tmp_path, capsys):
    saved = {"rows": {"cpt_1x": {"data_mode": "per_document", "eval": {}}}, "meta": {}}
    (tmp_path / "table1_real.json").write_text(json.dumps(saved))
    argv = ["--out", str(tmp_path), "--data", "x.jsonl", "--heldout", "y.jsonl", "--rows", "linearard"]
    argv += ["--checkpoint", str(tmp_path / "missing.gguf"), "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match="another --data_mode .*cpt_1x"):
        table1_real.main(argv)


@pytest.mark.slow
def test_a_rehearsal_on_the_tiny_teacher_trains_evaluates_and_resumes(tmp_path):
    """The driver end to end on CPU (the GPU runs it for real): a packed LinearARD row of 2 steps,
    evaluated with every column and its counts; a second call finds the row done and adds nothing."""
    from lard_jax.sources import resolve_source

    train, heldout = (resolve_source(f"builtin:{s}", str(tmp_path / "text")) for s in ("train", "heldout"))
    argv = ["--config", "configs/demo.py", "--data", train, "--heldout", heldout, "--workdir", str(tmp_path / "w")]
    argv += ["--out", str(tmp_path / "out"), "--rows", "linearard", "--steps", "2", "--lengths", "1024"]
    argv += ["--depths", "0.5", "--samples_per_depth", "2", "--ppl_windows", "2", "--long_windows", "1"]
    argv += ["--long_len", "1024", "--cloze_samples", "4", "--eval_dtype", "float32", "--gen_batch", "2"]
    table1_real.main(argv)
    saved = json.loads((tmp_path / "out" / "table1_real.json").read_text())
    row = saved["rows"]["linearard"]
    base = table1_real.load_config("configs/demo.py")
    assert row["data_mode"] == "packed" and row["lr"] == base.train.lr
    assert row["train_tokens"] == 2 * base.train.batch_size * base.train.grad_accum * base.data.seq_len
    ev = row["eval"]
    assert np.isfinite(ev["ppl@256"]) and np.isfinite(ev["stream_ppl@1024"])
    for cell in ("cloze_acc", "passkey@1024", "niah_single@1024", "niah_multikey@1024"):
        lo, hi = ev[f"{cell}_ci"]
        assert 0 <= lo <= ev[cell] <= hi <= 1 and ev[f"{cell}_n"] == (4 if cell == "cloze_acc" else 2)
    assert saved["meta"]["calls"][0]["rows"] == ["linearard"]

    table1_real.main(argv)  # resumed: the row is done, nothing retrained
    again = json.loads((tmp_path / "out" / "table1_real.json").read_text())
    assert again["rows"]["linearard"] == row and again["meta"]["calls"][1]["rows"] == []


def test_a_row_stopped_by_a_signal_is_left_to_resume_not_recorded(tmp_path, monkeypatch, capsys):
    """A row longer than one device call (cpt_Nx) is stopped by `timeout -s TERM`: the pipeline
    checkpoints and raises Preempted; the driver records nothing for it, starts no further row and
    says how to resume (the next call reruns it and the pipeline resumes from the checkpoint)."""
    from lard_jax.preemption import Preempted
    from lard_jax.sources import resolve_source

    ran = []

    def fake_row(name, *a, **k):
        ran.append(name)
        if name == "linearard":
            raise Preempted("stage1 stopped at step 7 by SIGTERM")
        return {"eval": {}}

    monkeypatch.setattr(table1_real, "run_and_evaluate", fake_row)
    train, heldout = (resolve_source(f"builtin:{s}", str(tmp_path / "text")) for s in ("train", "heldout"))
    argv = ["--config", "configs/demo.py", "--data", train, "--heldout", heldout, "--workdir", str(tmp_path / "w")]
    argv += ["--out", str(tmp_path / "out"), "--rows", "linearard,cpt_1x", "--lengths", "1024", "--long_len", "1024"]
    table1_real.main(argv)
    saved = json.loads((tmp_path / "out" / "table1_real.json").read_text())
    assert ran == ["linearard"] and "linearard" not in saved["rows"]
    assert saved["meta"]["calls"][-1]["rows"] == []
    assert "call again to resume the row" in capsys.readouterr().out


def test_rows_written_before_data_mode_existed_count_as_per_document(tmp_path):
    saved = {"rows": {"linearard": {"train_tokens": 10, "eval": {}}, "teacher": {"eval": {}}}, "meta": {}}
    (tmp_path / "table1_real.json").write_text(json.dumps(saved))
    argv = ["--out", str(tmp_path), "--data", "x.jsonl", "--heldout", "y.jsonl", "--rows", "teacher"]
    with pytest.raises(SystemExit, match="another --data_mode .*linearard"):
        table1_real.main(argv)
    assert table1_real.row_data_mode({"eval": {}}, "packed") == "packed"  # evaluation-only rows read no text


def test_a_finished_run_is_reused_only_if_trained_as_the_row_says(tmp_path):
    from ml_collections import ConfigDict

    c = ConfigDict(
        {
            "workdir": str(tmp_path),
            "data": {"mode": "packed", "seq_len": 256},
            "loss": {"method": "linearard"},
            "train": {"lr": 3e-3, "steps": 130},
            "stage2": {"lr": 2e-5, "steps": 0},
        }
    )
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    table1_real.check_reused(c)  # the same run: reused
    other = c.to_dict()
    other["data"]["mode"] = "per_document"
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="data.mode='per_document', this row needs 'packed'"):
        table1_real.check_reused(c)


def test_meta_notes_survive_a_later_call():
    import argparse

    base = table1_real.load_config("configs/smollm2_135m_pi32k.py")
    args = argparse.Namespace(config="c.py", big_mult=10)
    previous = {"merge_note": "kept", "calls": [{"rows": ["teacher"]}], "args": {"old": 1}}
    meta = table1_real.build_meta(previous, args, base, 8192)
    assert meta["merge_note"] == "kept" and meta["calls"] == previous["calls"] and meta["args"] == vars(args)
    assert meta["calls"] is not previous["calls"]  # appending this call leaves the caller's list alone
