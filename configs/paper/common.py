"""The authors' training recipe, set explicitly (not inherited) so a preset never drifts with configs/base.py.

Source: github.com/gracefulning/LinearARD, train.py and scripts/train_linearard_*.sh (commit 23866f6,
2026-05-31); differences from the paper (arXiv 2604.00004) and from the code are in docs/recipe.md.
"""

from configs import base


def authors_config(*, rope_scaling: dict, steps: int = 144):
    c = base.get_config()
    c.student.rope_scaling = rope_scaling
    c.model.dtype = "bfloat16"  # teacher and student loaded in bf16 (torch_dtype=torch.bfloat16)
    c.model.param_dtype = "bfloat16"
    c.model.trainable_dtype = "float32"  # PEFT keeps adapters in float32 (autocast_adapter_dtype)
    c.model.remat = "full"  # --use-gradient-checkpointing true
    c.data.seq_len = 4096  # --ctx-len 4096
    c.data.mode = "per_document"  # PG-19 books cut into blocks, no packing across books
    c.data.add_bos = True
    c.data.bos = "document"  # bos once per book (data_loader.py), not per block
    c.loss.method = "linearard"
    c.loss.relations = ("q", "k", "v")
    c.loss.layers = ()  # all layers
    c.loss.normalize = "query_heads"
    c.loss.lambda_attn = 1.0  # --lam-a 1.0
    c.loss.lambda_logit = 0.0  # --lam-l 0.0
    c.loss.temperature = 1.0
    c.train.trainable = "qkv"
    c.train.lora_rank = 1024
    c.train.lora_alpha = 2048.0
    c.train.lora_dropout = 0.05
    c.train.steps = steps  # --steps 144
    c.train.batch_size = 2  # --num-gpus 2 x --batch-size 1
    c.train.grad_accum = 2  # --grad-accum 2  -> 144 x 4 x 4096 = 2,359,296 tokens
    c.train.lr = 2e-5
    c.train.warmup_steps = 4
    c.train.min_lr_ratio = 0.9
    c.train.clip = 5.0  # --max-grad-norm 5.0
    c.train.weight_decay = 0.01  # torch.optim.AdamW defaults
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.checkpoint_every = 24
    return c
