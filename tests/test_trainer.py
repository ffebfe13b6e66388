"""Restoration training on tiny models: masked update, loss behaviour, sharding, resume, config errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lard_jax import compile_cache, hf, losses, pipeline, safetensors_io, trainer
from lard_jax.model import LlamaForCausalLM, relation_inputs
from tests.conftest import cpu_env
from tests.tiny import save_tiny_teacher, write_word_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random teacher checkpoint and a folder of text documents."""
    d = tmp_path_factory.mktemp("assets")
    save_tiny_teacher(d / "teacher", seed=11, max_position_embeddings=16)
    write_word_documents(d / "data", seed=12, count=24)
    return d


def _config(assets, workdir, **train):
    c = base.get_config()
    c.workdir = str(workdir)
    c.model.checkpoint = str(assets / "teacher")
    c.model.dtype = c.model.param_dtype = "float32"
    c.data.source = str(assets / "data")
    c.data.seq_len = 16
    c.student.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.lr = 3e-3
    c.train.warmup_steps = 1
    c.loss.kernel_impl = "xla"
    for k, v in train.items():
        c.train[k] = v
    return c


def _tensors(path):
    return {k: np.asarray(v) for k, v in safetensors_io.open_tensors(os.path.join(path, "model.safetensors")).items()}


@pytest.mark.parametrize("lora", ["authors_lora", "full_projections"])
def test_masked_update_changes_only_attention_projections(assets, tmp_path, lora):
    # The default is the authors' LoRA (r 1024, dropout 0.05: the unmerged path, merged at export).
    c = _config(assets, tmp_path / "run", **({} if lora == "authors_lora" else dict(lora_rank=0, lora_dropout=0.0)))
    pipeline.run_restoration(c)
    teacher = _tensors(str(assets / "teacher"))
    student = _tensors(str(tmp_path / "run" / "hf_student"))
    assert teacher.keys() == student.keys()
    trained = [k for k in teacher if any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    assert len(trained) == 6
    for k in teacher:
        if k in trained:
            assert not np.array_equal(teacher[k], student[k]), k
        else:
            np.testing.assert_array_equal(teacher[k], student[k], err_msg=k)
    lines = open(tmp_path / "run" / "metrics_stage1.jsonl").read().splitlines()
    assert len(lines) == 4 and all(key in lines[0] for key in ("relation_q", "relation_k", "relation_v", "grad_norm"))


def test_lora_and_qkvo(assets, tmp_path):
    c = _config(assets, tmp_path / "run", lora_rank=2, trainable="qkvo", steps=2)
    pipeline.run_restoration(c)
    teacher, student = _tensors(str(assets / "teacher")), _tensors(str(tmp_path / "run" / "hf_student"))
    changed = {k for k in teacher if not np.array_equal(teacher[k], student[k])}
    # The last layer's o_proj feeds no relation the loss reads, so it gets no gradient.
    expected = {k for k in teacher if any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj"))}
    assert changed == expected - {"model.layers.1.self_attn.o_proj.weight"}


def _models(assets, factor):
    teacher, params = hf.load_pretrained(str(assets / "teacher"))
    student = LlamaForCausalLM(teacher.config.replace(rope_scaling={"rope_type": "linear", "factor": factor}))
    return teacher, student, params


def test_relation_loss_zero_for_identical_and_decreases(assets):
    ids = jax.random.randint(jax.random.PRNGKey(13), (4, 16), 3, 259)
    teacher, same, params = _models(assets, 1.0)
    _, t_layers = relation_inputs(teacher, params, ids)
    _, s_layers = relation_inputs(same, params, ids)
    loss, _ = losses.relation_loss(s_layers, t_layers, impl="xla")
    assert abs(float(loss)) < 1e-6

    teacher, student, params = _models(assets, 4.0)
    mask = trainer.trainable_mask(params)
    lora = trainer.LoraSpec()
    trainable = trainer.init_trainable(params, mask, lora, jax.random.PRNGKey(0))
    opt, sched = trainer.make_optimizer(lr=3e-3, warmup_steps=1, total_steps=6, min_lr_ratio=0.5)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable), jax.random.PRNGKey(0))
    step = jax.jit(trainer.make_train_step(teacher, student, trainer.LossSpec(kernel_impl="xla"), lora, opt, sched))
    batch = {"input_ids": ids[None], "mask": jnp.ones((1, 4, 16), bool)}
    history = []
    for _ in range(6):
        state, m = step(state, params, batch)
        history.append(float(m["loss"]))
    assert history[0] > 1e-4
    assert history[-1] < 0.7 * history[0], history


@pytest.mark.parametrize("method", ["cpt", "logit_kd", "longred_simplified"])
def test_baseline_methods_run_and_train(assets, method):
    teacher, student, params = _models(assets, 4.0)
    mask = trainer.trainable_mask(params)
    lora = trainer.LoraSpec()
    trainable = trainer.init_trainable(params, mask, lora, jax.random.PRNGKey(0))
    opt, sched = trainer.make_optimizer(lr=3e-3, warmup_steps=1, total_steps=4)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable), jax.random.PRNGKey(1))
    step = jax.jit(trainer.make_train_step(teacher, student, trainer.LossSpec(method=method), lora, opt, sched))
    ids = jax.random.randint(jax.random.PRNGKey(14), (1, 4, 16), 3, 259)
    first = None
    for _ in range(4):
        state, m = step(state, params, {"input_ids": ids, "mask": jnp.ones(ids.shape, bool)})
        first = float(m["loss"]) if first is None else first
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) < first


def test_sharded_equals_unsharded(assets, tmp_path):
    one = _config(assets, tmp_path / "one")
    one.mesh.data, one.mesh.fsdp, one.mesh.tensor, one.mesh.num_devices = 1, 1, 1, 1
    pipeline.run_restoration(one)
    many = _config(assets, tmp_path / "many")
    many.mesh.data, many.mesh.fsdp, many.mesh.tensor = 2, 2, 2
    pipeline.run_restoration(many)
    a, b = _tensors(str(tmp_path / "one" / "hf_student")), _tensors(str(tmp_path / "many" / "hf_student"))
    for k in a:
        # atol: float32 reassociation across the 8-way partitioned matmuls, after 4 Adam steps (which
        # normalise tiny gradients): with remat "dots_no_batch" (the default since 2026-12-04) one
        # weight of 1024 differed by 1.3e-6
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=3e-6, err_msg=k)
    la = [float(l.split('"loss": ')[1].split(",")[0]) for l in open(tmp_path / "one" / "metrics_stage1.jsonl")]
    lb = [float(l.split('"loss": ')[1].split(",")[0]) for l in open(tmp_path / "many" / "metrics_stage1.jsonl")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def _cli(assets, workdir, *extra):
    args = [
        sys.executable,
        "-m",
        "experiments.restore",
        f"--config={ROOT}/configs/base.py",
        f"--config.workdir={workdir}",
        f"--config.model.checkpoint={assets / 'teacher'}",
        f"--config.data.source={assets / 'data'}",
        "--config.model.dtype=float32",
        "--config.model.param_dtype=float32",
        "--config.data.seq_len=16",
        "--config.train.steps=6",
        "--config.train.batch_size=4",
        "--config.train.grad_accum=2",
        "--config.train.checkpoint_every=2",
        "--config.train.lr=0.003",
        "--config.loss.kernel_impl=xla",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        *extra,
    ]
    return subprocess.run(args, cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(assets, tmp_path):
    straight = _cli(assets, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # the same programs: the crashed run loads the straight run's instead of compiling them again
    cache = compile_cache.CACHE_SUBDIR
    shutil.copytree(tmp_path / "straight" / cache, tmp_path / "resumed" / cache)
    crashed = _cli(assets, tmp_path / "resumed", "--config.train.crash_after_step=4")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert not os.path.exists(tmp_path / "resumed" / "hf_student")
    resumed = _cli(assets, tmp_path / "resumed", "--config.train.keep_checkpoints_after=True")  # for `other`
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout
    other = _cli(assets, tmp_path / "resumed", "--config.train.lr=0.01")  # same workdir, other recipe
    assert other.returncode != 0 and "different config (train.lr differ)" in other.stderr
    a = _tensors(str(tmp_path / "straight" / "hf_student"))
    b = _tensors(str(tmp_path / "resumed" / "hf_student"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_errors(assets, tmp_path):
    c = _config(assets, tmp_path / "x")
    c.model.checkpoint = ""
    with pytest.raises(pipeline.ConfigError, match="model.checkpoint is not set"):
        pipeline.run_restoration(c)
    c = _config(assets, tmp_path / "x")
    c.data.source = str(tmp_path / "nope")
    with pytest.raises(pipeline.ConfigError, match="data.source: not found"):
        pipeline.run_restoration(c)
    c = _config(assets, tmp_path / "x")
    c.student.rope_scaling = None
    with pytest.raises(pipeline.ConfigError, match="nothing to restore"):
        pipeline.run_restoration(c)
    c = _config(assets, tmp_path / "x", batch_size=3)
    with pytest.raises(pipeline.ConfigError, match="not divisible"):
        pipeline.run_restoration(c)
    c = _config(assets, tmp_path / "x")
    c.student.rope_scaling = {"rope_type": "warp", "factor": 2.0}
    with pytest.raises(pipeline.ConfigError, match="warp"):
        pipeline.run_restoration(c)
    c = _config(assets, tmp_path / "x")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, 1, 1
    with pytest.raises(pipeline.ConfigError, match="mesh"):
        pipeline.run_restoration(c)
    c = _config(assets, tmp_path / "x")
    c.eval.enabled, c.eval.source, c.eval.passkey_lengths = True, str(assets / "data"), (100,)
    with pytest.raises(pipeline.ConfigError, match="passkey at length 100"):
        pipeline.run_restoration(c)
    assert not os.path.exists(tmp_path / "x" / "checkpoints")  # failed before any training
    bad = _cli(assets, tmp_path / "cli", "--config.train.stepz=3")
    assert bad.returncode != 0 and "stepz" in bad.stderr


def _tb_events(folder):
    """(file, Event) for every record of every TensorBoard event file in `folder` (TFRecord framing:
    length u64, crc u32, payload, crc u32), oldest file first."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            out.append((name, event))
            i += 12 + n + 4
    return out


def test_metrics_log_resume_purges_tensorboard_and_jsonl(tmp_path):
    """A resumed stage logs each step once: JSONL records past the checkpoint are dropped, and the
    new TensorBoard file starts with a purge marker (SessionLog START at resume + 1), which makes
    TensorBoard hide the older files' values from that step on (TensorBoard's purge_step rule,
    applied here by hand)."""
    import time

    from tensorboardX.proto import event_pb2

    first = pipeline.MetricsLog(str(tmp_path), "stage1")
    for step in range(1, 7):
        first.write(step, {"loss": 10.0 + step})
    first.writer.close()
    time.sleep(1.1)  # a new event file name (tensorboardX names files by the second)
    resumed = pipeline.MetricsLog(str(tmp_path), "stage1", resume_step=4)
    for step in (5, 6):
        resumed.write(step, {"loss": 20.0 + step})
    resumed.writer.close()

    records = [json.loads(line) for line in open(tmp_path / "metrics_stage1.jsonl")]
    want = [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0)]
    assert [(r["step"], r["loss"]) for r in records] == want

    events = _tb_events(tmp_path / "tensorboard" / "stage1")
    files = sorted({f for f, _ in events})
    assert len(files) == 2
    starts = [e.step for f, e in events if f == files[1] and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [5]
    shown = {}
    for _, e in events:
        if e.session_log.status == event_pb2.SessionLog.START:
            shown = {s: v for s, v in shown.items() if s < e.step}  # the purge: later steps of older files go
        for v in e.summary.value:
            if v.tag == "loss":
                shown[e.step] = v.simple_value
    assert sorted(shown.items()) == want
