"""Llama-2-7B PI x8 with the authors' recipe except the trainable set: full float32 copies of the
q/k/v projections instead of LoRA (this project's earlier default; the paper's text says "q/k/v
trainable" without naming LoRA). Not what the authors' scripts run; see docs/recipe.md.
"""

from configs.paper.common import authors_config


def get_config():
    c = authors_config(rope_scaling={"rope_type": "linear", "factor": 8.0})
    c.train.lora_rank = 0
    c.train.lora_dropout = 0.0
    return c
