"""Mistral-7B-v0.1, the authors' scripts/train_linearard_mistral.sh: linear position interpolation
x4 (the factor in the script as we read it at commit c68f9fb; docs/recipe.md), trained at 4096.

At 4096 tokens Mistral's 4096-token sliding window cuts nothing off, so lard_jax's full causal
attention is exact there (the window is not implemented). 144 steps x 4 x 4096 = 2.36M tokens.
"""

from configs.paper.common import authors_config


def get_config():
    return authors_config(rope_scaling={"rope_type": "linear", "factor": 4.0})
