"""Evaluate Hugging Face checkpoints side by side:

  python -m experiments.evaluate --config=configs/eval.py \
      --config.models="teacher=/ckpt/Llama-2-7b-hf,restored=/runs/x/hf_student" \
      --config.scaled_rope='{"rope_type": "linear", "factor": 8.0}' \
      --config.eval.source=/data/pg19/test --config.workdir=/runs/eval

`scaled_rope` (JSON, optional) adds a "scaled" column: the teacher's weights with that RoPE,
untrained. Set --config.eval.harness_tasks="lambada=/data/lambada.jsonl,piqa=/data/piqa.jsonl"
for lm-evaluation-harness-format tasks you bring; they (and the cloze column) are tokenised as
lm-eval's hf backend does: --config.eval.add_bos=tokenizer|always|never (default: the tokenizer's
own special tokens) and --config.eval.max_length (left truncation; 0 = each model's
max_position_embeddings). For the harness itself, see lard_jax/evaluation/lm_eval_backend.py.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.models = ""  # name=hf_dir pairs, comma separated; the one named "teacher" anchors distortion
    c.scaled_rope = ""  # JSON rope-scaling dict for an extra "scaled" model, built from "teacher"
    c.eval.enabled = True
    c.eval.native_len = 4096
    c.eval.ppl_lengths = (1024, 4096, 8192, 16384, 32768)
    c.eval.passkey_lengths = (4096, 8192, 16384, 32768)
    c.eval.niah_lengths = (4096, 16384, 32768)
    c.eval.cloze_samples = 100
    c.eval.passkey_samples = 30
    return c
