"""Every bad input: one line `error: <what>: <why>; <how to fix>`, exit 2, no traceback, before any
weight loads (a weight read would be the only slow part; these tests stay fast because of it).

Most cases run the entry points' main() in-process with stderr captured; the flag-parsing cases
that must hold for a real command line also run as subprocesses."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from experiments import evaluate as evaluate_cli
from experiments import restore as restore_cli
from lard_jax import cli, hf, pipeline, safetensors_io
from lard_jax import data as data_lib
from lard_jax.errors import UserError
from tests.tiny import save_tiny_teacher, write_word_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """One tiny checkpoint (max_position_embeddings 16) and a folder of documents, shared by all tests."""
    d = tmp_path_factory.mktemp("errors")
    save_tiny_teacher(d / "teacher", seed=31, max_position_embeddings=16)
    write_word_documents(d / "data", seed=32, count=12)
    return d


@pytest.fixture(autouse=True)
def _checks_before_weights(request, monkeypatch):
    """Every case here must fail in lard_jax.plan.resolve, before a weight is read: loading weights
    is refused unless a test is marked `reads_weights` (the cases about the weights themselves, or
    that run a whole training first)."""
    if request.node.get_closest_marker("reads_weights") is None:
        monkeypatch.setattr(hf, "load_pretrained", _refuse_weights)


def _ckpt(assets, tmp_path, name="ckpt"):
    """A private copy of the tiny checkpoint to break."""
    out = tmp_path / name
    shutil.copytree(assets / "teacher", out)
    return out


def _argv(assets, tmp_path, *extra, checkpoint=None, source=None):
    return [
        "restore",
        f"--config={ROOT}/configs/base.py",
        f"--config.workdir={tmp_path / 'run'}",
        f"--config.model.checkpoint={checkpoint or assets / 'teacher'}",
        f"--config.data.source={source or assets / 'data'}",
        "--config.model.dtype=float32",
        "--config.model.param_dtype=float32",
        "--config.data.seq_len=16",
        "--config.train.steps=2",
        "--config.train.batch_size=8",
        "--config.train.grad_accum=1",
        "--config.train.lora_rank=0",
        "--config.train.lora_dropout=0",
        "--config.loss.kernel_impl=xla",
        "--config.mesh.num_devices=1",
        "--config.mesh.data=1",
        "--config.student.rope_scaling.factor=4",
        *extra,
    ]


def _fails(capsys, main, argv, *expected):
    """main(argv) exits 2 with exactly one `error:` line holding every expected fragment, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert ";" in lines[0], lines[0]  # <what>: <why>; <how to fix>
    if os.environ.get("SHOW_ERRORS"):
        sys.__stdout__.write(err)
    return err


def _no_weights_read(tmp_path):
    assert not os.path.exists(tmp_path / "run" / "checkpoints"), "failed after training started"


# ---------------------------------------------------------------------------------------------- checkpoint
def test_non_llama_config(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (ck / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, checkpoint=ck), "GPT2LMHeadModel", "not Llama-like")


def test_missing_weights_with_tokenizer(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    os.remove(ck / "model.safetensors")  # config.json + tokenizer files only
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, checkpoint=ck), str(ck), "no weights")


def test_tokenizer_only_folder(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    os.remove(ck / "model.safetensors")
    os.remove(ck / "config.json")
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, checkpoint=ck), "no config.json")


def test_weights_without_tokenizer(assets, tmp_path, capsys, monkeypatch):
    ck = _ckpt(assets, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        os.remove(ck / name)
    monkeypatch.setattr(hf, "load_pretrained", _refuse_weights)
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, checkpoint=ck), "no tokenizer", "--config.data.tokenizer")


def _refuse_weights(*args, **kwargs):
    raise AssertionError("weights were loaded before the input check")


def test_index_names_missing_shard(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    names = list(safetensors_io.open_tensors(str(ck / "model.safetensors")))
    os.rename(ck / "model.safetensors", ck / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _fails(
        capsys,
        restore_cli.main,
        _argv(assets, tmp_path, checkpoint=ck),
        "model-00002-of-00002.safetensors",
        "does not exist",
    )


def test_tensor_of_wrong_shape(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["intermediate_size"] = 40  # the weights have 48
    (ck / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, checkpoint=ck), "mlp.", "has shape", "config.json implies")


def test_truncated_safetensors(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    blob = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(blob[:-100])
    _fails(
        capsys,
        restore_cli.main,
        _argv(assets, tmp_path, checkpoint=ck),
        "model.safetensors",
        "not a readable safetensors file",
    )


@pytest.mark.reads_weights  # NaN is found while the tensors are read
def test_nan_in_checkpoint_named_while_loading(assets, tmp_path, capsys):
    ck = _ckpt(assets, tmp_path)
    tensors = {k: np.asarray(v) for k, v in safetensors_io.open_tensors(str(ck / "model.safetensors")).items()}
    tensors["model.layers.1.post_attention_layernorm.weight"][3] = np.inf
    safetensors_io.save_file(tensors, str(ck / "model.safetensors"), {"format": "pt"})
    _fails(
        capsys,
        restore_cli.main,
        _argv(assets, tmp_path, checkpoint=ck),
        "model.layers.1.post_attention_layernorm.weight",
        "NaN/Inf",
    )
    _no_weights_read(tmp_path)


# ---------------------------------------------------------------------------------------------- data
def test_empty_data_folder(assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, source=tmp_path / "empty"), "folder holds no documents")


def test_extensionless_folder_binary_only_and_text_sniffed(assets, tmp_path, capsys):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "blob1").write_bytes(bytes(range(256)) * 4)
    (folder / "blob2").write_bytes(b"\x00\x01\x02" * 100)
    _fails(
        capsys,
        restore_cli.main,
        _argv(assets, tmp_path, source=folder),
        "no documents",
        "skipped 2 binary or empty file(s) without an extension",
    )
    (folder / "README").write_text("plain text without an extension\n")
    with pytest.warns(UserWarning, match="skipped 2 binary"):
        docs = list(data_lib.read_documents(folder))
    assert docs == ["plain text without an extension\n"]


def test_invalid_utf8(assets, tmp_path, capsys):
    folder = tmp_path / "bad"
    shutil.copytree(assets / "data", folder)
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _fails(
        capsys, restore_cli.main, _argv(assets, tmp_path, source=folder), "latin1.txt", "not valid UTF-8", "re-encode"
    )
    _no_weights_read(tmp_path)


def test_data_smaller_than_one_batch(assets, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "one.txt").write_text("a short document " * 3)
    monkeypatch.setattr(hf, "load_pretrained", _refuse_weights)
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, source=folder), "fewer than one global batch", "pad_short")


def test_pad_short_keeps_short_documents(assets, tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    for i in range(8):
        (folder / f"d{i}.txt").write_text("tiny")
    c = base.get_config()
    c.workdir, c.data.source, c.data.seq_len, c.data.tokenizer = str(tmp_path / "w"), str(folder), 16, "byte"
    with pytest.raises(pipeline.ConfigError, match="pad_short"):
        pipeline.build_loader(c, data_lib_tokenizer(), seq_len=16, batch_size=8, grad_accum=1)
    c.data.pad_short = True
    loader = pipeline.build_loader(c, data_lib_tokenizer(), seq_len=16, batch_size=8, grad_accum=1)
    assert loader.num_blocks == 8


def data_lib_tokenizer():
    from lard_jax.tokenizer import ByteTokenizer

    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------- workdir, config
def test_workdir_not_writable(assets, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    argv = _argv(assets, tmp_path) + [f"--config.workdir={tmp_path / 'a_file' / 'run'}"]
    _fails(capsys, restore_cli.main, argv, "config.workdir", "not writable")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_workdir_read_only(assets, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, restore_cli.main, _argv(assets, tmp_path) + [f"--config.workdir={ro}"], "not writable")
    finally:
        ro.chmod(0o700)


def test_seq_len_beyond_teacher_needs_allow_long(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf, "load_pretrained", _refuse_weights)
    _fails(
        capsys,
        restore_cli.main,
        _argv(assets, tmp_path, "--config.data.seq_len=32"),
        "config.data.seq_len=32",
        "max_position_embeddings 16",
        "data.allow_long=True",
    )
    # allowed explicitly: the run gets past that check (and stops at the weights, refused here)
    with pytest.raises(AssertionError, match="weights were loaded"):
        restore_cli.main(_argv(assets, tmp_path, "--config.data.seq_len=32", "--config.data.allow_long=True"))


def test_eval_length_beyond_student_rope_warns(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf, "load_pretrained", _refuse_weights)
    small = tmp_path / "small"
    small.mkdir()
    (small / "one.txt").write_text("a short document " * 3)
    err = _fails(
        capsys,
        restore_cli.main,
        _argv(
            assets,
            tmp_path,
            "--config.eval.enabled=True",
            f"--config.eval.source={assets / 'data'}",
            "--config.eval.passkey_lengths=(300,)",
            "--config.eval.ppl_lengths=(32,)",
            source=small,
        ),
        "fewer than one global batch",
    )
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any("passkey_lengths: 300" in w and "max_position_embeddings 64" in w for w in warnings), err
    assert not any("ppl_lengths" in w for w in warnings), err  # 32 <= 64: no warning


def test_resume_with_changed_steps_needs_extend(assets, tmp_path, capsys):
    c = base.get_config()
    c.workdir = str(tmp_path / "run")
    os.makedirs(tmp_path / "run" / "checkpoints")
    c.train.steps = 5
    (tmp_path / "run" / "config.json").write_text(c.to_json_best_effort())
    c.train.steps = 9
    with pytest.raises(pipeline.ConfigError, match="train.extend=True"):
        pipeline.check_resumable(c)
    c.train.extend = True
    pipeline.check_resumable(c)  # allowed
    # through the entry point: one line, before any weight
    argv = _argv(assets, tmp_path, "--config.train.steps=3")
    config, _ = cli.parse(_argv(assets, tmp_path), config_required_hint="")
    (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())
    _fails(capsys, restore_cli.main, argv, "config.train.steps=3", "2-step run", "--config.train.extend=True")


def test_a_finished_run_is_not_trained_again_by_accident(assets, tmp_path, capsys):
    """After a finished run the training checkpoints are gone (the default): the same command again
    would start from step 0, so it stops with the two ways on, unless train.retrain says so."""
    run = tmp_path / "run"
    c = base.get_config()
    c.workdir = str(run)
    os.makedirs(run / "hf_student")
    (run / "summary.json").write_text("{}")
    with pytest.raises(pipeline.ConfigError, match="train.retrain=True"):
        pipeline.check_not_finished(c)
    c.train.retrain = True
    pipeline.check_not_finished(c)  # asked for
    c.train.retrain = False
    os.makedirs(run / "checkpoints")  # kept (train.keep_checkpoints_after): a rerun resumes, nothing retrains
    pipeline.check_not_finished(c)
    shutil.rmtree(run / "checkpoints")
    # through the entry point: one line, before any weight (this module's autouse fixture)
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path), "holds a finished run", "--config.train.retrain=True")
    assert not (run / "config.json").exists()  # stopped before the run wrote anything


@pytest.mark.parametrize("key,value", [("remat", "ful"), ("scan_grads", "bf16")])
def test_unknown_model_choice_fails_before_weights(assets, tmp_path, capsys, key, value):
    _fails(capsys, restore_cli.main, _argv(assets, tmp_path, f"--config.model.{key}={value}"), f"config.model.{key}")
    _no_weights_read(tmp_path)


def test_evaluate_without_config(capsys):
    _fails(capsys, evaluate_cli.main, ["evaluate"], "--config is not set", "configs/eval.py")


def test_evaluate_bad_models_and_checkpoint(assets, tmp_path, capsys):
    argv = [
        "evaluate",
        f"--config={ROOT}/configs/eval.py",
        f"--config.workdir={tmp_path / 'ev'}",
        f"--config.eval.source={assets / 'data'}",
    ]
    _fails(capsys, evaluate_cli.main, argv + ["--config.models=teacher"], "name=path")
    _fails(capsys, evaluate_cli.main, argv + [f"--config.models=teacher={tmp_path / 'nope'}"], "directory not found")


def test_misspelt_config_key_suggests(capsys):
    _fails(
        capsys,
        restore_cli.main,
        ["restore", f"--config={ROOT}/configs/demo.py", "--config.train.stepz=3"],
        "--config.train.stepz",
        "did you mean --config.train.steps?",
    )
    _fails(
        capsys,
        restore_cli.main,
        ["restore", f"--config={ROOT}/configs/demo.py", "--debgu"],
        "--debgu",
        "did you mean --debug?",
    )


def _subprocess(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_misspelt_flag_on_a_real_command_line():
    out = _subprocess("experiments.restore", "--config=configs/demo.py", "--config.student.rope_scalin.factor=2")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(
        "error: --config.student.rope_scalin.factor: no such config key; did you mean --config.student.rope_scaling"
    ), out.stderr


def test_debug_shows_the_traceback(capsys):
    rc = evaluate_cli.main(["evaluate", f"--config={ROOT}/configs/eval.py", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "error: config.workdir is not set" in err


# ---------------------------------------------------------------------------------------------- discoverability
@pytest.mark.parametrize(
    "module,config_file", [("experiments.restore", "configs/base.py"), ("experiments.evaluate", "configs/eval.py")]
)
def test_help_lists_every_key_with_default_and_help(module, config_file):
    out = _subprocess(module, "--help")
    assert out.returncode == 0, out.stderr
    config = cli.load_config_file(os.path.join(ROOT, config_file))
    helps = cli.help_texts(cli.BASE_CONFIG, os.path.join(ROOT, config_file))
    lines = out.stdout.splitlines()
    for key, value in cli.flat_keys(config).items():
        flag = f"--config.{key}={cli._show(value)}"
        row = [i for i, line in enumerate(lines) if line.strip().startswith(flag)]
        assert row, f"{flag} missing from --help"
        assert helps.get(key), f"config key {key} has no help comment in {config_file} or configs/base.py"
        text = lines[row[0]] + lines[row[0] + 1]  # a long flag puts its help on the next line
        assert helps[key][:30] in text, key


def test_single_rope_keys_and_json_dicts_override():
    config, _ = cli.parse(
        [
            "restore",
            f"--config={ROOT}/configs/demo.py",
            "--config.student.rope_scaling.rope_type=yarn",
            "--config.student.rope_scaling.original_max_position_embeddings=4096",
            "--config.student.rope_scaling.factor=8",
        ],
        config_required_hint="",
    )
    assert pipeline._rope_dict(config) == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}
    config, _ = cli.parse(
        [
            "restore",
            f"--config={ROOT}/configs/base.py",
            '--config.student.rope_scaling={"rope_type": "llama3", "factor": 8.0, '
            '"low_freq_factor": 1.0, "high_freq_factor": 4.0}',
        ],
        config_required_hint="",
    )
    assert pipeline._rope_dict(config)["rope_type"] == "llama3"
    config, _ = cli.parse(
        ["restore", f"--config={ROOT}/configs/base.py", '--config.loss.relations=("q","k")'], config_required_hint=""
    )
    assert tuple(config.loss.relations) == ("q", "k")


def test_user_error_classes():
    assert issubclass(pipeline.ConfigError, UserError) and issubclass(hf.CheckpointError, UserError)
    assert issubclass(safetensors_io.SafetensorsError, UserError)
