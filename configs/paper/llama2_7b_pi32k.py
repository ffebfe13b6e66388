"""Llama-2-7B, linear position interpolation x8 (4K -> 32K): the authors' scripts/train_linearard_llama2.sh.

  python -m experiments.restore --config=configs/paper/llama2_7b_pi32k.py \
      --config.model.checkpoint=/ckpt/Llama-2-7b-hf --config.data.source=/data/pg19/train \
      --config.workdir=/runs/llama2_pi32k

144 steps x (2 sequences x accumulation 2) x 4096 = 2.36M tokens, as in the script (the paper's
text says 4.25M; docs/recipe.md). LoRA r 1024 / alpha 2048 / dropout 0.05 on q, k, v; AdamW with
torch defaults; lr 2e-5, warmup 4 from 0, cosine to 0.9x; clip 5.0. Full-projection variant:
configs/paper/llama2_7b_pi32k_fullproj.py.
"""

from configs.paper.common import authors_config


def get_config():
    return authors_config(rope_scaling={"rope_type": "linear", "factor": 8.0})
