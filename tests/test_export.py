"""The restored student's hf_student/ is the checkpoint plus the trained tensors, nothing else changed:
frozen tensors bit-identical in the checkpoint's dtype, trained ones changed (in the checkpoint's
dtype unless model.export_dtype=float32), every other file copied, config.json changed only in
its RoPE; transformers loads it. Also: metrics JSONL deduplicated by step on resume."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from lard_jax import hf, pipeline, safetensors_io, trainer
from lard_jax.model import LlamaForCausalLM
from lard_jax.tokenizer import ByteTokenizer
from tests.tiny import save_tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINED = ("q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A float32 single-file and a float16 two-shard tiny checkpoint with side files, and documents."""
    d = tmp_path_factory.mktemp("export")
    f32 = d / "f32"
    save_tiny_teacher(f32, seed=41, max_position_embeddings=16)
    (f32 / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}))
    (f32 / "README.md").write_text("# tiny teacher\nA model card that must travel with the weights.\n")
    (f32 / "notes.txt").write_text("any other file\n")
    cfg = json.loads((f32 / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2, custom_field={"kept": [1, 2]})
    (f32 / "config.json").write_text(json.dumps(cfg, indent=1))

    f16 = d / "f16"
    shutil.copytree(f32, f16)
    os.remove(f16 / "model.safetensors")
    tensors = {k: np.asarray(v) for k, v in safetensors_io.open_tensors(str(f32 / "model.safetensors")).items()}
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for fname, members in shards.items():
        safetensors_io.save_file(
            {n: tensors[n].astype(np.float16) for n in members}, str(f16 / fname), {"format": "pt"}
        )
        weight_map.update({n: fname for n in members})
    total = sum(tensors[n].astype(np.float16).nbytes for n in names)
    (f16 / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg["torch_dtype"] = "float16"
    (f16 / "config.json").write_text(json.dumps(cfg, indent=1))

    rng = np.random.default_rng(42)
    words = "alpha beta gamma delta river stone light shadow under over".split()
    (d / "data").mkdir()
    for i in range(16):
        (d / "data" / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 40)))
    return d


def _tensors(folder):
    out, meta = {}, {}
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".safetensors"):
            f = safetensors_io.open_tensors(os.path.join(folder, fname), check_finite=False)
            meta[fname] = f.metadata()
            out.update({n: (fname, np.asarray(f[n])) for n in f})
    return out, meta


def check_export(ckpt, out, *, trained=_TRAINED, trained_dtype=None, rope=None, max_pos=None):
    """Everything in `out` equals `ckpt` except the trained tensors and config.json's RoPE."""
    ckpt, out = str(ckpt), str(out)
    src_files = sorted(f for f in os.listdir(ckpt) if not f.startswith("."))
    assert sorted(os.listdir(out)) == src_files
    src, src_meta = _tensors(ckpt)
    dst, dst_meta = _tensors(out)
    assert src.keys() == dst.keys() and src_meta == dst_meta
    changed = 0
    for name, (fname, a) in src.items():
        dfname, b = dst[name]
        assert dfname == fname, name  # same shard layout
        if any(p in name for p in trained):
            assert b.dtype == (trained_dtype or a.dtype), name
            assert not np.array_equal(a.astype(np.float32), b.astype(np.float32)), f"{name} did not train"
            changed += 1
        else:
            assert b.dtype == a.dtype and a.shape == b.shape, name
            assert a.tobytes() == b.tobytes(), f"{name} is not bit-identical to the checkpoint"
    assert changed == 2 * len(trained)  # two layers
    for fname in src_files:
        if fname.endswith(".safetensors"):
            continue
        a, b = open(os.path.join(ckpt, fname), "rb").read(), open(os.path.join(out, fname), "rb").read()
        if fname == "config.json":
            a, b = json.loads(a), json.loads(b)
            assert b["rope_scaling"] == rope
            assert b["max_position_embeddings"] == max_pos
            for key in ("rope_scaling", "max_position_embeddings"):
                a.pop(key, None), b.pop(key, None)
            assert a == b
        elif fname == "model.safetensors.index.json" and trained_dtype is not None:
            a, b = json.loads(a), json.loads(b)
            assert a["weight_map"] == b["weight_map"]
        else:
            assert a == b, f"{fname} differs"


def _transformers_loads(out, seq_len=24):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("river stone light", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 259 and torch.isfinite(logits).all()
    return model


def test_cli_export_of_float16_sharded_checkpoint(assets, tmp_path):
    """Trained in float32 with frozen weights stored in bfloat16 (param_dtype): the export still
    holds the checkpoint's float16 bytes for every frozen tensor."""
    work = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "experiments.restore",
        f"--config={ROOT}/configs/base.py",
        f"--config.workdir={work}",
        f"--config.model.checkpoint={assets / 'f16'}",
        f"--config.data.source={assets / 'data'}",
        "--config.model.dtype=float32",
        "--config.model.param_dtype=bfloat16",
        "--config.data.seq_len=16",
        "--config.train.steps=3",
        "--config.train.batch_size=4",
        "--config.train.grad_accum=1",
        "--config.train.lr=0.01",
        "--config.train.lora_rank=0",
        "--config.train.lora_dropout=0",
        "--config.loss.kernel_impl=xla",
        "--config.mesh.num_devices=1",
        "--config.mesh.data=1",
        "--config.student.rope_scaling.factor=4",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = work / "hf_student"
    check_export(assets / "f16", out, rope={"rope_type": "linear", "factor": 4.0}, max_pos=64)
    model = _transformers_loads(str(out))
    assert model.config.rope_scaling["factor"] == 4.0 and model.config.max_position_embeddings == 64


def test_pipeline_export_of_float32_checkpoint_with_lora(assets, tmp_path):
    c = base.get_config()
    c.workdir = str(tmp_path / "run")
    c.model.checkpoint = str(assets / "f32")
    c.model.dtype = c.model.param_dtype = "float32"
    c.data.source = str(assets / "data")
    c.data.seq_len = 16
    c.student.rope_scaling = {"rope_type": "yarn", "factor": 2.0}
    c.train.steps, c.train.batch_size, c.train.grad_accum, c.train.lr, c.train.warmup_steps = 3, 8, 1, 1e-2, 1
    c.train.lora_rank, c.train.lora_alpha, c.train.lora_dropout = 2, 4.0, 0.0  # merged into q/k/v on export
    c.loss.kernel_impl = "xla"
    c.mesh.num_devices, c.mesh.data = 1, 1
    pipeline.run_restoration(c)
    out = tmp_path / "run" / "hf_student"
    check_export(assets / "f32", out, rope={"rope_type": "yarn", "factor": 2.0}, max_pos=32)
    _transformers_loads(str(out))


def test_export_dtype_float32_and_index(assets, tmp_path):
    """export_student on its own: trained tensors in float32 on request, the index's total_size follows."""
    ckpt = str(assets / "f16")
    teacher, params = hf.load_pretrained(ckpt)
    student = LlamaForCausalLM(
        teacher.config.replace(rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=32)
    )
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS["qkvo"])
    moved = jax.tree_util.tree_map(lambda p, m: p + 1e-3 if m else p, params, mask)
    c = base.get_config()
    c.model.checkpoint = ckpt
    c.model.export_dtype = "float32"
    out = tmp_path / "hf"
    pipeline.export_student(c, student, moved, mask, ByteTokenizer(), str(out))
    check_export(
        ckpt,
        out,
        trained=_TRAINED + ("o_proj",),
        trained_dtype=np.float32,
        rope={"rope_type": "linear", "factor": 2.0},
        max_pos=32,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors, _ = _tensors(out)
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tensors.values())
    c.model.export_dtype = "float64"
    with pytest.raises(pipeline.ConfigError, match="export_dtype"):
        pipeline.export_student(c, student, moved, mask, ByteTokenizer(), str(tmp_path / "x"))


def test_config_json_rope_in_either_style():
    cfg = hf.config_from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 8,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        }
    )
    student = cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}, max_position_embeddings=64)
    v4 = pipeline._hf_config_with_rope(
        {"rope_theta": 5e5, "rope_scaling": None, "max_position_embeddings": 16, "other": 1}, student
    )
    assert v4 == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "max_position_embeddings": 64,
        "other": 1,
    }
    v5 = pipeline._hf_config_with_rope(
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "max_position_embeddings": 64}, student
    )
    assert v5 == {
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
        "max_position_embeddings": 64,
    }


def test_metrics_deduplicated_by_step_on_resume(tmp_path):
    log = pipeline.MetricsLog(str(tmp_path), "stage1")
    for step in (1, 2, 3, 4):
        log.write(step, {"loss": float(step)})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # cut short by the crash
    resumed = pipeline.MetricsLog(str(tmp_path), "stage1", resume_step=2)  # last checkpoint: step 2
    for step in (3, 4):
        resumed.write(step, {"loss": 10.0 + step})
    records = [json.loads(line) for line in open(log.path)]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [1.0, 2.0, 13.0, 14.0]


def test_safetensors_io_reads_slices_bf16_and_rejects_corruption(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4)).astype(ml_dtypes.bfloat16)
    b = rng.normal(size=(5,)).astype(np.float16)
    path = str(tmp_path / "x.safetensors")
    safetensors_io.save_file({"a": a, "b": b}, path, {"format": "pt"})
    f = safetensors_io.open_tensors(path)
    assert f["a"].dtype == ml_dtypes.bfloat16 and f["a"].shape == (6, 4) and f.metadata() == {"format": "pt"}
    np.testing.assert_array_equal(f["a"][2:4], a[2:4])
    np.testing.assert_array_equal(f["a"].T[1:3, 0:5], a.T[1:3, 0:5])  # a device's slice of a transposed view
    np.testing.assert_array_equal(np.asarray(f["b"]), b)
    with pytest.raises(safetensors_io.SafetensorsError, match="x.safetensors"):
        open(path + "2", "wb").write(open(path, "rb").read()[:-3])
        safetensors_io.open_tensors(path + "2")
