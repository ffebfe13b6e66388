"""Tiny random llama.cpp GGUF checkpoints for tests (a shared helper, like tests/tiny.py): a byte-level
BPE trained here, weights from lard_jax.model.init_params written the way convert_hf_to_gguf.py
writes them (q/k rows permuted), F32/F16 tensors."""

import json

import jax
import numpy as np

from lard_jax import hf
from lard_jax.model import LlamaConfig, init_params

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Position interpolation stretches rotary embeddings to longer contexts!",
    "  leading spaces, numbers 12345 and punctuation: (a) [b] {c}?",
    "Ünïcödé text — with dashes, émojis 🙂 and 日本語.",
    "line one\nline two\n\ttabbed line",
]
CORPUS = (
    SENTENCES
    + [
        "Large language models read text as tokens; a tokenizer splits words into pieces.",
        "Attention relations between queries and keys are distilled from the teacher to the student.",
    ]
    * 3
)
SPECIALS = ["<unk>", "<s>", "</s>"]
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_TOP["lm_head.weight"] = "output.weight"
_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def train_bpe(vocab_size: int = 400, corpus=None) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b" strings) of a byte-level BPE with SPECIALS first,
    trained on `corpus` (default CORPUS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face Llama tensor name."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{_BLOCK[parts[-2]]}.{parts[-1]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute(): each head's two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(path, *, seed: int = 3, pre: str = "default", chat_template: str | None = None) -> LlamaConfig:
    """A 2-layer llama GGUF with its tokenizer at `path`; returns the model's config."""
    import gguf

    tokens, merges = train_bpe()
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    _, params = init_params(cfg, jax.random.PRNGKey(seed))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "rope.dimension_count": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
    }.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, (our_path, transpose) in hf.hf_tensor_names(cfg).items():
        leaf = params
        for key in our_path:
            leaf = leaf[key]
        tensor = np.asarray(leaf, np.float32)
        tensor = np.ascontiguousarray(tensor.T if transpose else tensor)
        if ".q_proj." in name:
            tensor = llamacpp_permute(tensor, cfg.num_attention_heads)
        elif ".k_proj." in name:
            tensor = llamacpp_permute(tensor, cfg.num_key_value_heads)
        w.add_tensor(gguf_name(name), tensor if tensor.ndim == 1 else tensor.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg
