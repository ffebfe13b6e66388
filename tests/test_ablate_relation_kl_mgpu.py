"""experiments/ablate_relation_kl_mgpu.py and relation_kl_mgpu's `ablate=` (timing instrumentation):
every variant lowers for "cuda" on CPU, each ablation changes the kernel it names, and bad input is
refused. Times need a GPU (the runbook's call)."""

import jax
import pytest

from experiments import ablate_relation_kl_mgpu as ablate_mod
from pallas_kernels import relation_kl_mgpu
from tests.kernel_cases import cuda_text


def test_dry_run_lowers_every_variant_with_the_ping_pong(tmp_path):
    result = ablate_mod.main(
        ["--dry_run", "--schedule_barrier", "--cases", "1,256,2,64", "--out", str(tmp_path / "a.json")]
    )
    rows = result["rows"]
    assert len(rows) == len(ablate_mod.FWD_VARIANTS) + len(ablate_mod.BWD_VARIANTS)
    assert all(r["lowered"] for r in rows) and result["schedule_barrier"]


@pytest.mark.parametrize("ablate", [("exp",), ("teacher_logits",), ("d_left",)])
def test_each_ablation_changes_the_kernel_it_names(ablate):
    (s, t), g = ablate_mod.inputs(1, 256, 2, 64, abstract=True)
    bwd_args = (s, t, g, g, g)
    for kind, args in (("fwd", (s, t)), ("bwd", bwd_args)):
        if kind == "fwd" and ablate == ("d_left",):  # the backward's only (test_bad_input_is_refused)
            continue
        as_is = cuda_text(ablate_mod.kernel(kind, (), 64, False), *args)
        assert cuda_text(ablate_mod.kernel(kind, ablate, 64, False), *args) != as_is


def test_bad_input_is_refused(capsys):
    x = jax.ShapeDtypeStruct((1, 256, 2, 64), jax.numpy.bfloat16)
    with pytest.raises(ValueError, match="not in"):
        relation_kl_mgpu.mosaic_forward(x, x, x, x, scale=0.125, causal=True, ablate=("d_left",))
    with pytest.raises(ValueError, match="bogus"):
        relation_kl_mgpu.mosaic_backward_fused(
            x, x, x, x, None, None, None, scale=0.125, causal=True, ablate=("bogus",)
        )
    with pytest.raises(SystemExit):
        ablate_mod.main(["--dry_run", "--cases", "1,256,2"])
    assert "B,T,H,D" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate_mod.main(["--dry_run", "--blocks", "128"])
    assert "FQ,FK:BQ,BK" in capsys.readouterr().err


def test_blocks_reach_each_kernel():
    """--blocks: D 64's default (128 x 64) and a forward and backward on different blocks."""
    assert ablate_mod.parse_blocks("128,64") == ((128, 64), (128, 64))
    assert ablate_mod.parse_blocks("64,128:128,64") == ((64, 128), (128, 64))
    (s, t), g = ablate_mod.inputs(1, 256, 2, 64, abstract=True)
    bwd = lambda blocks: cuda_text(ablate_mod.kernel("bwd", (), 64, False, blocks=blocks), s, t, g, g, g)  # noqa: E731
    assert bwd((128, 64)) != bwd((64, 64))
    result = ablate_mod.main(["--dry_run", "--blocks", "64,128:128,64", "--cases", "1,256,2,64"])
    assert result["blocks"] == {"fwd": [64, 128], "bwd": [128, 64]} and all(r["lowered"] for r in result["rows"])
