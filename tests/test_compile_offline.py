"""experiments/compile_offline and bench_restore_step.abstract_step, on CPU (no CUDA plugin here).

The GPU figures themselves need the plugin (the module's docstring); what CI can check is that the
abstract step is the step bench_restore_step builds and times (same compiled memory on CPU, where
both compile), and that the tool reads work from HLO and fails with its setup line without the plugin."""

import pytest

from experiments import bench_restore_step as bench
from experiments import compile_offline
from lard_jax import sharding as sharding_lib

SEQ = 64


def _plugin_present() -> bool:
    try:
        compile_offline.compile_only_device()
    except compile_offline.SetupError:
        return False
    return True


@pytest.mark.parametrize("layout,fused,remat", [("scan", True, "dots_no_batch"), ("loop", False, "none")])
def test_abstract_step_compiles_like_the_built_step(layout, fused, remat):
    shape = bench.SHAPES["tiny"]
    kw = dict(seq_len=SEQ, batch_per_device=2, remat=remat, kernel_impl="auto", attention_impl="xla")
    built = bench.build_step(shape, layout=layout, fused=fused, **kw)
    with sharding_lib.use_mesh(built.mesh):
        real = built.step.lower(built.state, built.frozen, built.batch).compile()
    step, args = bench.abstract_step(shape, layout=layout, fused=fused, **kw)
    abstract = step.lower(*args).compile()
    # the same program: the same buffers, argument tree and donation
    assert bench._compiled_bytes(abstract) == bench._compiled_bytes(real)
    assert abstract.memory_analysis().alias_size_in_bytes == real.memory_analysis().alias_size_in_bytes > 0
    work = compile_offline.executed_work(abstract)
    assert work["dot_gflops"] == pytest.approx(compile_offline.executed_work(real)["dot_gflops"])
    assert work["dot_gflops"] > 0
    assert (work["attention_fwd_calls"], work["attention_bwd_calls"], work["attention_fwd_recomputed"]) == (0, 0, None)


def test_executed_work_counts_attention_recomputes():
    """Two scanned layers' worth of cuDNN calls: a forward body with teacher and student forwards
    (2 calls x 3 trips) and a backward body with one rerun forward and one backward (x 3 trips)."""

    def call(name, target):
        return f'  %{name} = (bf16[2,4]) custom-call(bf16[2,4] %p), custom_call_target="{target}"'

    fwd, bwd = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
    trip = 'backend_config={"known_trip_count":{"n":"3"}}'
    hlo = "\n".join(
        [
            "%fwd_body (p: bf16[2,4]) -> bf16[2,4] {",
            "  %p = bf16[2,4] parameter(0)",
            call("a", fwd),
            call("b", fwd),
            "}",
            "%bwd_body (p: bf16[2,4]) -> bf16[2,4] {",
            "  %p = bf16[2,4] parameter(0)",
            call("c", fwd),
            call("d", bwd),
            "}",
            "ENTRY %main (p: bf16[2,4]) -> bf16[2,4] {",
            "  %p = bf16[2,4] parameter(0)",
            f"  %w1 = bf16[2,4] while(bf16[2,4] %p), condition=%c, body=%fwd_body, {trip}",
            f"  ROOT %w2 = bf16[2,4] while(bf16[2,4] %w1), condition=%c, body=%bwd_body, {trip}",
            "}",
        ]
    )

    class Compiled:
        def as_text(self):
            return hlo

    work = compile_offline.executed_work(Compiled())
    assert (work["attention_fwd_calls"], work["attention_bwd_calls"]) == (9, 3)
    assert work["attention_fwd_recomputed"] == 3
    assert work["unknown_trip_counts"] == 0


@pytest.mark.skipif(_plugin_present(), reason="the CUDA plugin is installed: the setup error cannot happen")
def test_without_the_plugin_the_tool_says_how_to_set_it_up(capsys):
    with pytest.raises(compile_offline.SetupError, match="jax-cuda13-plugin"):
        compile_offline.compile_only_device()
    with pytest.raises(SystemExit) as exit_info:
        compile_offline.main(["--models", "tiny", "--seq_len", "64"])
    assert exit_info.value.code == 2
    assert "jax-cuda13-plugin" in capsys.readouterr().err


def test_bad_arguments_are_refused_before_compiling(capsys):
    with pytest.raises(SystemExit):
        compile_offline.main(["--models", "llama9_70b"])
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compile_offline.main(["--variants", "scan/fused/sometimes"])
    assert "remat must be one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown target"):
        compile_offline.compile_only_device("a100")
