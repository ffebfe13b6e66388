"""Tiny random checkpoints for tests: a byte-tokenizer LLaMA saved in Hugging Face format."""

import jax

from lard_jax import hf
from lard_jax.model import LlamaConfig, init_params
from lard_jax.tokenizer import ByteTokenizer


def save_tiny_teacher(path, *, seed: int, max_position_embeddings: int, weight_scale: float = 8.0) -> None:
    """Weights `weight_scale` x the init's, so relation maps are far from uniform and RoPE matters."""
    cfg = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(lambda x: x * weight_scale if x.ndim == 2 else x, params)
    hf.save_pretrained(str(path), model, params)
    ByteTokenizer().save_pretrained(str(path))


WORDS = "alpha beta gamma delta river stone light shadow under over".split()


def write_word_documents(folder, *, seed: int, count: int, words_per_doc: int = 40) -> None:
    """`count` text files doc<i>.txt of random words (a pipeline run's training data) in `folder`."""
    import os

    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        with open(os.path.join(folder, f"doc{i}.txt"), "w") as f:
            f.write(" ".join(rng.choice(WORDS, words_per_doc)))
