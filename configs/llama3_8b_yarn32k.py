"""Llama-3-8B (native 8K, theta 500K), YaRN x4 to 32K; trained at the native 8192 length."""
from configs import base


def get_config():
    c = base.get_config()
    c.student.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    c.data.seq_len = 8192
    c.train.steps = 65  # 65 x 8 x 8192 ~ 4.26M tokens, the paper's budget
    c.train.batch_size = 2
    c.train.grad_accum = 4
    c.model.remat = "full"
    c.train.checkpoint_every = 25
    return c
