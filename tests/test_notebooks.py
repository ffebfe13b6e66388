"""The notebooks in experiments/notebooks/, executed end to end on CPU in tiny mode (nbclient).

Each notebook reads LARD_NOTEBOOK_TINY=1 (skip installs, tiny model, few steps) and
LARD_NOTEBOOK_WORKDIR (where every output goes), and runs with experiments/notebooks/ as its
working directory, as Jupyter or Colab would open it.
"""

import json
import math
import os

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from lard_jax import safetensors_io  # noqa: E402
from tests import conftest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")


def _execute(name: str, workdir, *, fast_compile: bool) -> "nbformat.NotebookNode":
    """`fast_compile`: the kernel and every Python it starts compile with the suite's flags
    (tests/conftest.py), for a notebook whose time is compiling (a few training steps); a notebook
    that evaluates runs its programs more than it compiles them, faster with XLA's defaults."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    env = dict(
        os.environ,
        LARD_NOTEBOOK_TINY="1",
        LARD_NOTEBOOK_WORKDIR=str(workdir),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices: a notebook (or its subprocesses) picks its own
    if fast_compile:
        env = conftest.with_site_flags(env, conftest.in_effect())
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", allow_errors=False, resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute(env=env)
    return nb


def _outputs(nb, output_type=None):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if output_type is None or out.get("output_type") == output_type:
                yield out


def _text(nb) -> str:
    parts = []
    for out in _outputs(nb):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        else:
            data = out.get("data", {})
            parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "\n".join(parts)


def _tensors(folder):
    return {k: np.asarray(v) for k, v in safetensors_io.open_tensors(os.path.join(folder, "model.safetensors")).items()}


@pytest.mark.parametrize("name", ["quickstart_colab.ipynb", "tpu_vm_multihost.ipynb"])
def test_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    assert all(not c.outputs and c.execution_count is None for c in code_cells)


@pytest.mark.slow
def test_quickstart_colab(tmp_path):
    workdir = tmp_path / "quickstart"
    nb = _execute("quickstart_colab.ipynb", workdir, fast_compile=False)  # 20 steps and an evaluation

    report = json.loads((workdir / "report.json").read_text())
    assert report["meta"]["model_order"] == ["teacher", "scaled", "restored"]
    for name in ("teacher", "scaled", "restored"):
        metrics = report["models"][name]
        assert math.isfinite(metrics["short_ppl"]) and metrics["short_ppl"] > 1
        assert 0 <= metrics["cloze_acc"] <= 1 and "320" in metrics["passkey"]
    assert set(report["distortion"]) == {"scaled", "restored"}
    for path in (
        "report.md",
        "summary.json",
        "metrics_stage1.jsonl",
        "hf_student/config.json",
        "hf_student/model.safetensors",
        "hf_student/tokenizer.json",
        "loss_curve.png",  # (passkey at one length: a table row, no plot)
    ):
        assert (workdir / path).is_file(), path
    lines = (workdir / "metrics_stage1.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10, 15, 20]

    # the side-by-side table, the loss plot and the report's PNGs were shown
    markdown = [o["data"]["text/markdown"] for o in _outputs(nb, "display_data") if "text/markdown" in o["data"]]
    assert any("| metric | teacher | scaled | restored |" in m for m in markdown)
    images = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(images) >= 1 + len(list(workdir.glob("*.png")))
    assert "linear" in _text(nb)  # the restored student's config carries the scaled RoPE


@pytest.mark.slow
def test_tpu_vm_multihost(tmp_path):
    workdir = tmp_path / "multihost"
    nb = _execute("tpu_vm_multihost.ipynb", workdir, fast_compile=True)  # 3 runs of 4 steps: compilation
    text = _text(nb)

    # the pod command the guide prints
    assert "gcloud compute tpus tpu-vm ssh" in text and "--worker=all" in text
    assert "--config.distributed=True" in text and "python -m experiments.restore" in text

    # the same entry point ran on 8 fake CPU devices, as one process and as two "hosts"
    one, two = workdir / "one_process", workdir / "two_processes"
    for run in (one, two):
        config = json.loads((run / "config.json").read_text())
        assert config["mesh"] | {"num_devices": 0, "rules": []} == {
            "data": 2,
            "fsdp": 2,
            "tensor": 2,
            "num_devices": 0,
            "rules": [],
        }
        assert len((run / "metrics_stage1.jsonl").read_text().splitlines()) == 4
    a, b = _tensors(one / "hf_student"), _tensors(two / "hf_student")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
