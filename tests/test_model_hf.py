"""Model and Hugging Face import/export against transformers' PyTorch Llama on CPU."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from lard_jax import hf
from lard_jax.model import LlamaConfig, init_params, relation_inputs

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 24.0, "beta_slow": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def _hf_config(rng, *, heads, kv_heads, bias, rope, max_pos=24, head_dim=16):
    cfg = dict(
        vocab_size=int(rng.integers(50, 120)),
        hidden_size=heads * head_dim,
        intermediate_size=int(rng.integers(40, 100)),
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=float(rng.choice([10000.0, 500000.0])),
        attention_bias=bias,
        tie_word_embeddings=bool(rng.integers(2)),
    )
    if rope is not None:
        cfg["rope_scaling"] = dict(rope)
    return transformers.LlamaConfig(**cfg)


def _random_hf_model(tmp_path, rng, **kw):
    torch.manual_seed(int(rng.integers(1 << 30)))
    config = _hf_config(rng, **kw)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # default init has zero biases and unit norms: randomise everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == config.hidden_size else 0.0))
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return model, str(path)


def _hf_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(ids)).logits.float(), -1).numpy()


@pytest.mark.parametrize("rope_name", list(ROPES) + ["longrope"])
@pytest.mark.parametrize("layout", ["mha", "gqa_bias"])
def test_logits_match_transformers(tmp_path, rope_name, layout):
    rng = np.random.default_rng(abs(hash((rope_name, layout))) % (1 << 32))
    heads, kv = (4, 4) if layout == "mha" else (4, 2)
    rope = ROPES.get(rope_name)
    if rope_name == "longrope":
        rope = {
            "rope_type": "longrope",
            "short_factor": list(rng.uniform(1, 2, 8)),
            "long_factor": list(rng.uniform(2, 6, 8)),
            "original_max_position_embeddings": 12,
        }
    ref_model, path = _random_hf_model(tmp_path, rng, heads=heads, kv_heads=kv, bias=layout != "mha", rope=rope)
    model, params = hf.load_pretrained(path)
    # Longer than the original maximum, so dynamic/longrope/yarn take their long-sequence branch.
    ids = rng.integers(0, model.config.vocab_size, (2, 40))
    ours = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(ids)), -1))
    np.testing.assert_array_less(np.abs(ours - _hf_logprobs(ref_model, ids)).max(), 1e-4)


def test_bf16_compute_close_to_float32(tmp_path):
    rng = np.random.default_rng(1)
    ref_model, path = _random_hf_model(tmp_path, rng, heads=4, kv_heads=2, bias=False, rope=ROPES["linear"])
    model, params = hf.load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ids = rng.integers(0, model.config.vocab_size, (2, 33))
    ours = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(ids)), -1))
    ref = _hf_logprobs(ref_model, ids)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through 2 layers of
    # O(1)-norm activations and logits of magnitude ~10 the log-probs drift by a few 1e-2.
    err = np.abs(ours - ref)
    assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())


def test_sown_qk_equal_transformers_rotated(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    ref_model, path = _random_hf_model(tmp_path, rng, heads=4, kv_heads=2, bias=True, rope=ROPES["yarn"])
    captured = []
    original = modeling_llama.apply_rotary_pos_emb

    def recording(q, k, cos, sin, *a, **kw):
        out = original(q, k, cos, sin, *a, **kw)
        captured.append([t.detach().numpy().transpose(0, 2, 1, 3) for t in out])  # -> [B, T, H, D]
        return out

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", recording)
    ids = rng.integers(0, ref_model.config.vocab_size, (1, 30))
    _hf_logprobs(ref_model, ids)
    model, params = hf.load_pretrained(path)
    _, layers = relation_inputs(model, params, jnp.asarray(ids))
    assert len(layers) == len(captured) == 2
    for ours, (q_ref, k_ref) in zip(layers, captured):
        np.testing.assert_allclose(np.asarray(ours["q"]), q_ref, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(ours["k"]), k_ref, atol=2e-5, rtol=1e-4)


def test_sowing_does_not_change_logits():
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 11), 0, 61)
    logits, layers = relation_inputs(model, params, ids)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.apply({"params": params}, ids)))
    assert layers[0]["q"].shape == (2, 11, 4, 8) and layers[0]["k"].shape == (2, 11, 1, 8)


@pytest.mark.parametrize("tied,qkv_bias", [(False, False), (True, True)])
def test_export_import_round_trip(tmp_path, tied, qkv_bias):
    cfg = LlamaConfig(
        vocab_size=71,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        qkv_bias=qkv_bias,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    model, params = init_params(cfg, jax.random.PRNGKey(5))
    params = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(6), x.shape), params)
    out = str(tmp_path / "export")
    hf.save_pretrained(out, model, params)
    model2, params2 = hf.load_pretrained(out)
    assert model2.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
    # transformers reads it and agrees on the logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(7).integers(0, 71, (2, 20))
    ours = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(ids)), -1))
    np.testing.assert_array_less(np.abs(ours - _hf_logprobs(ref, ids)).max(), 1e-4)
    assert ref.config.rope_parameters["rope_type"] == "linear"


def test_sharded_checkpoint_onto_mesh(tmp_path):
    from lard_jax import sharding

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(8))
    out = str(tmp_path / "sharded")
    hf.save_pretrained(out, model, params, max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    _, loaded = hf.load_pretrained(out, mesh=mesh)
    q = loaded["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        hf.load_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(str(tmp_path / "empty"))
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(9))
    good = str(tmp_path / "good")
    hf.save_pretrained(good, model, params)

    def edit(**changes):
        with open(os.path.join(good, "config.json")) as f:
            c = json.load(f)
        c.update(changes)
        with open(os.path.join(good, "config.json"), "w") as f:
            json.dump(c, f)

    edit(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(hf.CheckpointError, match="not Llama-like"):
        hf.load_pretrained(good)
    edit(architectures=["LlamaForCausalLM"], model_type="llama", rope_scaling={"rope_type": "warp", "factor": 2})
    with pytest.raises(ValueError, match="warp"):
        hf.load_pretrained(good)
    edit(rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="factor"):
        hf.load_pretrained(good)
    edit(rope_scaling=None, intermediate_size=25)
    with pytest.raises(hf.CheckpointError, match="mlp.gate_proj.weight has shape"):
        hf.load_pretrained(good)
    edit(intermediate_size=24, num_hidden_layers=2)
    with pytest.raises(hf.CheckpointError, match="missing"):
        hf.load_pretrained(good)
    with pytest.raises(ValueError, match="input_ids"):
        model.apply({"params": params}, jnp.ones((3,), jnp.int32))
