"""Evaluation of teacher, RoPE-scaled and restored models, each step testable without a model.

Model access is always a caller-supplied function (a jitted forward wrapped to numpy):
- `logits_fn(input_ids int32 [B, T]) -> float32 [B, T, V]` for perplexity and multiple choice;
- `generate_fn(prompt_ids, max_new_tokens) -> list[int]` (greedy) for the synthetic tasks;
- `qkv_fn(input_ids) -> [dict(q, k, v)] per layer` for the relation-distortion probe.
"""

from lard_jax.evaluation.distortion import relation_distortion
from lard_jax.evaluation.multiple_choice import read_task, score_task
from lard_jax.evaluation.perplexity import perplexity_vs_length
from lard_jax.evaluation.report import write_report
from lard_jax.evaluation.synthetic import TASKS as SYNTHETIC_TASKS
from lard_jax.evaluation.synthetic import evaluate_synthetic, score_prediction

__all__ = [
    "perplexity_vs_length",
    "read_task",
    "score_task",
    "evaluate_synthetic",
    "score_prediction",
    "SYNTHETIC_TASKS",
    "relation_distortion",
    "write_report",
]
