"""The embedded default: restore the shipped tiny teacher on CPU in a few minutes.

  python -m experiments.restore --config=configs/demo.py

Teacher: lard_jax/assets/tiny_teacher (a small LLaMA pretrained by this project, native
context 256 byte tokens; see its README.md). Student: linear position interpolation x4 (to 1024).
Data: Python's bundled documentation (pydoc topics + stdlib docstrings), split by document;
held-out documents are never trained on. Evaluates teacher / scaled / restored and writes
report.json, report.md and plots into the workdir.
"""
import os

from configs import base

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = base.get_config()
    c.workdir = os.path.join(_ROOT, "runs", "demo")
    c.model.checkpoint = os.path.join(_ROOT, "lard_jax", "assets", "tiny_teacher")
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.student.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    c.data.source = "builtin:train"
    c.data.tokenizer = "byte"
    c.data.seq_len = 256  # the teacher's native length, as the paper trains at 4096 for Llama-2
    c.data.mode = "per_document"
    c.loss.kernel_impl = "auto"
    c.train.steps = 160
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.lr = 1e-3  # a 4M-parameter model with few steps wants a larger rate than 7B's 2e-5
    c.train.warmup_steps = 4
    c.train.min_lr_ratio = 0.1
    c.train.checkpoint_every = 40
    c.train.log_every = 10
    c.eval.enabled = True
    c.eval.source = "builtin:heldout"
    c.eval.max_windows = 64
    c.eval.passkey_samples = 12
    c.eval.passkey_lengths = (1024,)  # 4x native (the passkey prompt alone needs ~250 byte tokens)
    c.eval.cloze_samples = 40
    return c
