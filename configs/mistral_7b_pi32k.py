"""Kept for old command lines: the same as configs/paper/mistral_7b.py (the authors' Mistral-7B recipe,
linear x4 at 4096 tokens, LoRA r 1024 on q/k/v). See docs/recipe.md.
"""

from configs.paper.mistral_7b import get_config  # noqa: F401
