"""Mistral-7B-v0.1 (GQA), linear PI x4, trained at 4096 tokens: its 4096-token sliding window cuts
nothing off at that length, so full causal attention is exact there (lard_jax does not implement the window)."""
from configs import base


def get_config():
    c = base.get_config()
    c.student.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    c.data.seq_len = 4096
    c.train.steps = 130
    c.train.batch_size = 2
    c.train.grad_accum = 4
    c.model.remat = "full"
    c.train.checkpoint_every = 25
    return c
