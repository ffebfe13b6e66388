"""Model shapes of the paper's checkpoints, for benchmarks and FLOP checks with random weights.

The values are those of the models' Hugging Face `config.json` files; a real run reads them from the
checkpoint instead (lard_jax.hf.config_from_hf).
"""

from __future__ import annotations

MODEL_SHAPES: dict[str, dict] = {
    "llama2_7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "llama3_8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "smollm2_135m": dict(  # HuggingFaceTB/SmolLM2-135M(-Instruct): the real-model runs' shape
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
}
