"""experiments/bench_restore_step: --layout / --fused / --layouts_all, on CPU with the tiny shape."""

import json
import subprocess
import sys

from experiments import bench_restore_step as bench


def test_defaults_are_the_configs_defaults():
    from configs import base

    c = base.get_config()
    assert bench.DEFAULT_LAYOUT == ("scan" if c.model.scan_layers else "loop")
    assert bench.DEFAULT_FUSED == c.loss.fused
    assert bench.DEFAULT_REMAT == c.model.remat
    assert (bench.DEFAULT_LAYOUT, bench.DEFAULT_FUSED) in bench.LAYOUTS_ALL


def test_bench_does_not_import_ml_collections():
    """The GPU machine has no ml_collections: the bench must not need it."""
    code = "import sys, experiments.bench_restore_step; sys.exit('ml_collections' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_layouts_all_runs_three_layouts_in_one_process(tmp_path, capsys):
    out = tmp_path / "layouts.json"
    argv = ["--models", "tiny", "--seq_len", "64", "--reps", "1", "--layouts_all", "--out", str(out)]
    results = bench.main(argv)
    assert [(r["layout"], r["fused"]) for r in results] == list(bench.LAYOUTS_ALL)
    assert all("error" not in r and "split_s" not in r for r in results), results
    losses = [r["loss"] for r in results]  # the same step in every layout
    assert max(losses) - min(losses) <= 1e-3 * max(abs(x) for x in losses)
    saved = json.loads(out.read_text())
    assert saved["command"].endswith(" ".join(argv))
    table = saved["layouts"]
    assert [(r["layout"], r["fused"], r["default"]) for r in table] == [
        ("loop", False, False),
        ("scan", False, False),
        ("scan", True, True),
    ]
    assert max(r["ratio_to_best"] for r in table) == 1.0
    assert all(r["compiled_gib"] > 0 for r in table)
    assert "<- default" in capsys.readouterr().out


def test_layout_and_fused_flags():
    parse = bench.build_parser().parse_args
    args = parse([])
    assert (args.layout, args.fused, args.layouts_all) == (bench.DEFAULT_LAYOUT, bench.DEFAULT_FUSED, False)
    args = parse(["--layout", "loop", "--no_fused"])
    assert (args.layout, args.fused) == ("loop", False)
    assert parse(["--fused"]).fused is True


def test_layouts_table_ratios():
    table = bench.layouts_table(
        [
            {
                "model": "m",
                "devices": 1,
                "layout": "loop",
                "fused": False,
                "tokens_per_s": 100.0,
                "step_s": 1.0,
                "peak_gib": 2.0,
            },
            {
                "model": "m",
                "devices": 1,
                "layout": "scan",
                "fused": True,
                "remat": bench.DEFAULT_REMAT,
                "tokens_per_s": 50.0,
                "step_s": 2.0,
                "peak_gib": 2.0,
                "compiled_gib": 1.0,
            },
            {"model": "m", "devices": 1, "layout": "scan", "fused": False, "error": "OOM"},
        ]
    )
    assert [r["ratio_to_best"] for r in table] == [1.0, 0.5]
    assert [r["default"] for r in table] == [False, True]


def test_variants_compare_remat_policies_in_one_process(tmp_path, capsys):
    out = tmp_path / "variants.json"
    argv = ["--models", "tiny", "--seq_len", "64", "--reps", "1", "--out", str(out)]
    results = bench.main(argv + ["--variants", "loop/unfused/full,scan/fused/dots_no_batch_attention"])
    assert [(r["layout"], r["fused"], r["remat"]) for r in results] == [
        ("loop", False, "full"),
        ("scan", True, "dots_no_batch_attention"),
    ]
    assert all("error" not in r and "split_s" not in r for r in results), results
    assert abs(results[0]["loss"] - results[1]["loss"]) <= 1e-3 * abs(results[0]["loss"])  # the same step
    table = json.loads(out.read_text())["layouts"]
    assert [(r["layout"], r["remat"], r["default"]) for r in table] == [
        ("loop", "full", False),
        ("scan", "dots_no_batch_attention", True),
    ]
    printed = capsys.readouterr().out  # the table names each run's remat policy
    assert any(
        " scan " in ln and " fused " in ln and " dots_no_batch_attention " in ln and "<- default" in ln
        for ln in printed.splitlines()
    )


def test_variants_are_checked_before_anything_runs():
    assert bench.parse_variants("scan/fused/dots_no_batch, loop / unfused / none") == [
        ("scan", True, "dots_no_batch"),
        ("loop", False, "none"),
    ]
    for bad, says in (
        ("scan/fused", "layout/loss/remat"),
        ("grid/fused/full", "layout must be"),
        ("scan/fusd/full", "loss must be"),
        ("scan/fused/everything", "remat must be"),
        (",", "empty"),
    ):
        try:
            bench.parse_variants(bad)
        except ValueError as e:
            assert says in str(e), (bad, e)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_scan_memory_cpu_compares_every_variant(tmp_path):
    from experiments import scan_memory_cpu

    out = scan_memory_cpu.main(["--seq_len", "64", "--layers", "3", "--out", str(tmp_path / "m.json")])
    rows = {(r["layout"], r["fused"], r["remat"]): r for r in out["rows"]}
    assert set(rows) == set(scan_memory_cpu.VARIANTS)
    assert all(0 < r["temp_gib"] <= r["compiled_gib"] for r in rows.values())
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == out["rows"]
