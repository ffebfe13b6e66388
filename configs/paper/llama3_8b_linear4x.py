"""Llama-3-8B, linear position interpolation x4, trained at 4096 tokens: the authors'
scripts/train_linearard_llama3.sh (not YaRN, not the native 8192 length).

144 steps x 4 sequences x 4096 = 2.36M tokens; LoRA r 1024 / alpha 2048 / dropout 0.05 on q, k, v
(GQA: 32 query, 8 KV heads; the relation loss divides K and V by the query-head count, as train.py).
"""

from configs.paper.common import authors_config


def get_config():
    return authors_config(rope_scaling={"rope_type": "linear", "factor": 4.0})
