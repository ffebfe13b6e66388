"""The restored student's hf_student/ (lard_jax.export) is the checkpoint plus the trained tensors:
frozen tensors bit-identical in the checkpoint's dtype, trained ones changed (in the checkpoint's
dtype unless model.export_dtype says otherwise), every other file copied with its mode,
config.json changed only in its RoPE, README.md the student's own card with the teacher's below;
transformers loads it. A NaN/Inf tensor stops the export before anything is written. A GGUF
teacher exports in bfloat16. Also: metrics JSONL deduplicated by step on resume."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from lard_jax import export, hf, model_card, pipeline, safetensors_io, trainer
from lard_jax.errors import UserError
from lard_jax.model import LlamaForCausalLM
from lard_jax.tokenizer import ByteTokenizer
from tests.tiny import save_tiny_teacher, write_word_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINED = ("q_proj", "k_proj", "v_proj")
TEACHER_CARD = "---\nlicense: apache-2.0\n---\n# tiny teacher\nA model card that must travel with the weights.\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A float32 single-file and a float16 two-shard tiny checkpoint with side files, and documents."""
    d = tmp_path_factory.mktemp("export")
    f32 = d / "f32"
    save_tiny_teacher(f32, seed=41, max_position_embeddings=16)
    (f32 / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}))
    (f32 / "README.md").write_text(TEACHER_CARD)
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
    for fname in shards:
        os.chmod(f16 / fname, 0o640)  # the export gives each file its checkpoint counterpart's mode

    write_word_documents(d / "data", seed=42, count=16)
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
        mode = stat.S_IMODE(os.stat(os.path.join(ckpt, fname)).st_mode)
        assert stat.S_IMODE(os.stat(os.path.join(out, fname)).st_mode) == mode, fname
        if fname.endswith(".safetensors"):
            continue
        a, b = open(os.path.join(ckpt, fname), "rb").read(), open(os.path.join(out, fname), "rb").read()
        if fname == "README.md":  # the student's card, the teacher's below it
            card = b.decode()
            assert card.startswith("---\nlibrary_name: transformers\nlicense: apache-2.0\n")
            assert "---\nlicense: apache-2.0\n---" not in card  # one front matter, ours
            assert json.loads(re.search(r"`rope_scaling` = `(\{.*?\})`", card).group(1)) == rope
            assert "```yaml\nlicense: apache-2.0\n```" in card  # the teacher's, as a block
            head, teacher = card.split("## The teacher's model card")
            assert "A model card that must travel with the weights." in teacher and "license: apache-2.0" in teacher
            assert "native (no scaling)" in head and f"max_position_embeddings {max_pos}" in head
        elif fname == "config.json":
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
    export.export_student(c, student, moved, mask, ByteTokenizer(), str(out))
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
        export.export_student(c, student, moved, mask, ByteTokenizer(), str(tmp_path / "x"))


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
    v4 = export.hf_config_with_rope(
        {"rope_theta": 5e5, "rope_scaling": None, "max_position_embeddings": 16, "other": 1}, student
    )
    assert v4 == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "max_position_embeddings": 64,
        "other": 1,
    }
    v5 = export.hf_config_with_rope(
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


# ----------------------------------------------------------------------------------------------
def _moved_student(ckpt, trainable="qkv", rope=None):
    teacher, params = hf.load_pretrained(ckpt)
    student = LlamaForCausalLM(
        teacher.config.replace(rope_scaling=rope or {"rope_type": "linear", "factor": 2.0}, max_position_embeddings=32)
    )
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS[trainable])
    return student, jax.tree_util.tree_map(lambda p, m: p + 1e-3 if m else p, params, mask), mask


def _config(ckpt, **model):
    c = base.get_config()
    c.workdir = os.path.dirname(os.path.dirname(ckpt))
    c.model.checkpoint = ckpt
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_tensor_is_refused_and_nothing_written(assets, tmp_path, bad):
    ckpt = str(assets / "f16")
    student, moved, mask = _moved_student(ckpt)
    name = "model.layers.1.self_attn.k_proj.weight"
    leaf = moved["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
    moved["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"] = leaf.at[3, 5].set(bad)
    out = tmp_path / "hf_student"
    with pytest.raises(export.ExportError) as e:
        export.export_student(_config(ckpt), student, moved, mask, ByteTokenizer(), str(out))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert name in msg and "1 NaN/Inf" in msg and "config.train.lr" in msg and str(out) in msg
    assert sorted(os.listdir(tmp_path)) == []  # no hf_student/, no staging folder
    # an earlier export in its place stays as it was
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(export.ExportError):
        export.export_student(_config(ckpt), student, moved, mask, ByteTokenizer(), str(out))
    assert sorted(os.listdir(tmp_path)) == ["hf_student"] and os.listdir(out) == ["config.json"]


def test_overflow_in_the_stored_dtype_is_refused(assets, tmp_path):
    ckpt = str(assets / "f16")
    student, moved, mask = _moved_student(ckpt)
    leaf = moved["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    moved["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] = leaf.at[0, 0].set(1e6)  # float16 max is 65504
    with pytest.raises(export.ExportError) as e:
        export.export_student(_config(ckpt), student, moved, mask, ByteTokenizer(), str(tmp_path / "hf"))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "float16" in msg
    assert "--config.model.export_dtype=float32" in msg and not os.listdir(tmp_path)
    export.export_student(
        _config(ckpt, export_dtype="float32"), student, moved, mask, ByteTokenizer(), str(tmp_path / "hf")
    )
    assert os.path.isfile(tmp_path / "hf" / "config.json")


def test_re_export_replaces_the_previous_one(assets, tmp_path):
    ckpt = str(assets / "f32")
    student, moved, mask = _moved_student(ckpt)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    export.export_student(_config(ckpt), student, moved, mask, ByteTokenizer(), str(out))
    assert "stale.txt" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["hf"]


def test_card_without_teacher_card_and_with_report(assets, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(assets / "f32", ckpt)
    os.remove(ckpt / "README.md")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        os.remove(ckpt / f)  # none: the export ships the run's tokenizer
    student, moved, mask = _moved_student(str(ckpt))
    out = tmp_path / "hf"
    c = _config(str(ckpt))
    export.export_student(c, student, moved, mask, ByteTokenizer(), str(out), train_tokens=12345, command="cmd x")
    card = (out / "README.md").read_text()
    assert "The teacher's model card" not in card and "12,345" in card and "```bash\ncmd x\n```" in card
    assert "Not evaluated yet" in card
    assert stat.S_IMODE(os.stat(out / "README.md").st_mode) == safetensors_io.default_file_mode()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    rows = {
        "teacher": (19.4, 12.7, 0.85, 1.0),
        "scaled": (94.8, 114.8, 0.775, 0.0),
        "restored": (28.9, 22.8, 0.85, 0.0),
    }
    report = {
        "models": {
            k: {"short_ppl": a, "ppl_vs_length": {"1024": b}, "cloze_acc": c, "passkey": {"2048": d}}
            for k, (a, b, c, d) in rows.items()
        }
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert model_card.add_report(str(out), str(tmp_path / "report.json"), native_len=256)
    card2 = (out / "README.md").read_text()
    assert "Not evaluated yet" not in card2 and card2.count("## Evaluation") == 1
    assert "| held-out perplexity at 256 | 19.4 | 94.8 | 28.9 |" in card2
    assert "| held-out perplexity at 1024 | 12.7 | 115 | 22.8 |" in card2
    assert "| passkey accuracy at 2048 | 1 | 0 | 0 |" in card2 and "= 0.87." in card2
    assert card2.replace(card2[card2.index("<!-- lard_jax:evaluation") :], "") == card.replace(
        card[card.index("<!-- lard_jax:evaluation") :], ""
    )  # nothing else changed
    assert model_card.add_report(str(out), report, native_len=256)  # idempotent
    assert (out / "README.md").read_text() == card2


def test_default_command_and_front_matter():
    assert model_card.default_command(["/x/experiments/restore.py", "--config=c.py", "--config.a=b c"]) == (
        "python -m experiments.restore --config=c.py '--config.a=b c'"
    )
    assert model_card.default_command(["pytest"]) is None
    keys, yaml, body = model_card.split_front_matter(TEACHER_CARD)
    assert keys == {"license": "apache-2.0"} and yaml == "license: apache-2.0" and body.startswith("# tiny")


# ----------------------------------------------------------------------------------------------
# a GGUF teacher
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from tests.tiny_gguf import save_tiny_gguf

    path = tmp_path_factory.mktemp("gguf_teacher") / "tiny.gguf"
    save_tiny_gguf(path)
    return str(path)


@pytest.mark.parametrize("dtype", ["checkpoint", "float32"])
def test_gguf_teacher_exports_bfloat16_by_default(tiny_gguf, tmp_path, dtype):
    import ml_dtypes

    from lard_jax.tokenizer import load_tokenizer

    student, moved, mask = _moved_student(tiny_gguf, rope={"rope_type": "yarn", "factor": 4.0})
    c = _config(tiny_gguf, export_dtype=dtype)
    out = tmp_path / "hf_student"
    export.export_student(c, student, moved, mask, load_tokenizer(tiny_gguf), str(out), train_tokens=10)
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "checkpoint" else np.dtype(np.float32)
    tensors, _ = _tensors(out)
    assert {a.dtype for _, a in tensors.values()} == {want}
    q = tensors["model.layers.0.self_attn.q_proj.weight"][1].astype(np.float32)
    np.testing.assert_allclose(q, np.asarray(moved["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]).T, atol=1e-2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == want.name and cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["max_position_embeddings"] == 32 and cfg["bos_token_id"] == 1
    assert sorted(os.listdir(out)) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    default = safetensors_io.default_file_mode()
    assert {stat.S_IMODE(os.stat(out / f).st_mode) for f in os.listdir(out)} == {default}  # no 0600 weights
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["model_max_length"] == 32
    card = (out / "README.md").read_text()
    assert "tiny.gguf" in card and want.name in card and "yarn x4.0" in card
    if dtype == "float32":
        _transformers_loads_gguf_export(str(out), tiny_gguf)


def _transformers_loads_gguf_export(out, gguf_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lard_jax.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(gguf_path)
    text = "river stone light"
    assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ours.encode(text)])).logits).all()
