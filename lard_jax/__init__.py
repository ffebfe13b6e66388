"""lard_jax: LinearARD (linear-memory attention distillation for RoPE restoration) in JAX/Flax."""
