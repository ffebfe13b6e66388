"""Llama-2-7B, linear position interpolation x8 (4K -> 32K), the paper's reference recipe.

  python -m experiments.restore --config=configs/llama2_7b_pi32k.py \
      --config.model.checkpoint=/ckpt/Llama-2-7b-hf --config.data.source=/data/pg19/train \
      --config.workdir=/runs/llama2_pi32k

Budget: 130 steps x 8 sequences (2 GPUs x batch 1 x accumulation 2 ... doubled here into one
global batch of 2 x accum 4) x 4096 tokens ~ 4.26M tokens, as in the paper (~4.25M).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.student.rope_scaling = {"rope_type": "linear", "factor": 8.0}
    c.data.seq_len = 4096
    c.train.steps = 130
    c.train.batch_size = 2
    c.train.grad_accum = 4
    c.train.lr = 2e-5
    c.train.warmup_steps = 4
    c.train.min_lr_ratio = 0.9
    c.train.clip = 5.0
    c.model.remat = "full"
    c.train.checkpoint_every = 25
    return c
