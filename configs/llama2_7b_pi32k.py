"""Kept for old command lines: the same as configs/paper/llama2_7b_pi32k.py (the authors' Llama-2-7B
linear x8 recipe). It used to run 130 steps x 8 sequences (4.26M tokens, the paper's count) with full
projections and AdamW b2 0.95; docs/recipe.md says what changed and why.
"""

from configs.paper.llama2_7b_pi32k import get_config  # noqa: F401
