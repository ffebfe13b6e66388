"""Perplexity as a function of context length, on held-out token sequences.

Each length L is measured on non-overlapping windows tokens[i*L:(i+1)*L] of every held-out
document (documents shorter than L contribute none); the model reads each window from scratch
and the perplexity is exp(mean NLL) over all L-1 predicted tokens of all windows. A RoPE-scaled
model that lost its short-context skill shows it at small L; one that never learned to use the
longer range shows it at large L.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

__all__ = ["LogitsFn", "token_log_probs", "perplexity_vs_length"]

_POSITIONS_PER_SLICE = 512

LogitsFn = Callable[[np.ndarray], np.ndarray]  # int32 [B, T] -> float32 [B, T, V]


def token_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[..., target] for every position, computed stably in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_normaliser = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return picked - log_normaliser


def _windows(token_docs: Iterable[Sequence[int]], length: int, max_windows: int | None) -> list[np.ndarray]:
    windows = []
    for doc in token_docs:
        doc = np.asarray(doc)
        for start in range(0, len(doc) - length + 1, length):
            if max_windows is not None and len(windows) >= max_windows:
                return windows
            windows.append(doc[start : start + length].astype(np.int32))
    return windows


def perplexity_vs_length(
    logits_fn: LogitsFn,
    token_docs: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    max_windows: int | None = 16,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[int, float]:
    """{length: perplexity}; a length no document reaches is left out (with a warning).

    Windows are taken in document order, at most `max_windows` per length, so every model of a
    comparison sees the same tokens. A `logits_fn` with a `token_scores(input_ids, targets)`
    attribute (`lard_jax.evaluation.adapters.logits_fn_for`) is asked for the targets' log-probs
    (float32 log softmax on the device) instead of the whole logits (float64 on the host).
    """
    results = {}
    for length in lengths:
        if length < 2:
            raise ValueError(f"a window needs at least 2 tokens to predict one, got length {length}")
        windows = _windows(token_docs, length, max_windows)
        if not windows:
            warnings.warn(
                f"perplexity: no held-out document has {length} tokens; length {length} skipped", stacklevel=2
            )
            continue
        total_nll, total_tokens = 0.0, 0
        batches = range(0, len(windows), batch_size)
        token_scores = getattr(logits_fn, "token_scores", None)
        for first in tqdm(batches, desc=f"ppl@{length}", disable=not progress):
            input_ids = np.stack(windows[first : first + batch_size])
            if token_scores is not None:  # log-probs formed on the device: [B, T] to the host, not [B, T, V]
                targets = np.zeros_like(input_ids)
                targets[:, :-1] = input_ids[:, 1:]
                log_probs = np.asarray(token_scores(input_ids, targets)[0], np.float64)[:, : length - 1]
                total_nll -= float(log_probs.sum())
                total_tokens += log_probs.size
                continue
            logits = logits_fn(input_ids)
            # In slices of positions: at 32K tokens x 32K vocab a whole row in float64 is 8 GB.
            for row in range(input_ids.shape[0]):
                for lo in range(0, length - 1, _POSITIONS_PER_SLICE):
                    hi = min(lo + _POSITIONS_PER_SLICE, length - 1)
                    log_probs = token_log_probs(logits[row, lo:hi], input_ids[row, lo + 1 : hi + 1])
                    total_nll -= float(log_probs.sum())
                    total_tokens += log_probs.size
        results[int(length)] = math.exp(total_nll / total_tokens)
    return results
