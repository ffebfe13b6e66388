"""lm-evaluation-harness model "lard_jax": any checkpoint lard_jax loads, run by the JAX model.

    python -m lard_jax.evaluation.lm_eval_backend \\
        --model_args pretrained=/runs/x/hf_student,dtype=bfloat16,max_length=32768 \\
        --tasks hellaswag,arc_easy,wikitext --batch_size 8 --output_path /runs/x/lm_eval

or from Python (importing this module registers the model name):

    import lm_eval
    import lard_jax.evaluation.lm_eval_backend  # noqa: F401
    lm_eval.simple_evaluate(model="lard_jax", model_args={"pretrained": "/ckpt/Llama-2-7b-hf",
                            "rope_scaling": '{"rope_type": "linear", "factor": 8.0}'}, tasks=["piqa"])

model_args (the rest of the command line is lm-eval's own):
  pretrained     a local Hugging Face directory, anything `lard_jax.hf.load_pretrained` reads
  tokenizer      tokenizer directory or "byte" (default: `pretrained`)
  rope_scaling   transformers-format dict or its JSON; "native"/"none" for unscaled RoPE;
                 absent: the checkpoint's own
  max_position_embeddings   overrides config.json's (as load_pretrained)
  dtype          float32 (default) | bfloat16 | float16: compute and storage dtype
  batch_size     rows per model call (default 8; "auto" means 8)
  max_length     the model's context in tokens: left truncation of loglikelihood requests,
                 rolling-window size, prompt + generation budget (default / 0: max_position_embeddings,
                 as the harness's hf backend)
  add_bos        "tokenizer" (default: the tokenizer's own special tokens, as lm-eval >= 0.4.9's hf
                 backend with add_bos_token unset) | "always" | "never"
  max_gen_toks   default generation budget when a task sets none (256, as the hf backend)
  attention_impl xla (default) | cudnn

Every convention that changes a number is the hf backend's (lm-eval 0.4.13): `_encode_pair`
tokenisation, empty contexts replaced by bos (else eos), left truncation to `max_length + 1`
tokens of context + continuation, rolling windows of `max_length` tokens that start from the
prefix token (with the tokenizer's default specials the bos itself is the first scored token, as
there), greedy generation stopped at eos or the first stop string. The tests check per-request
log-likelihoods against the hf backend on the shipped tiny teacher (1e-4 per request; rolling: per 32 tokens).

Requests are sorted longest first and batched; every batch is padded to `batch_size` rows and to a
power-of-two width (at least 64, at most `max_length`), so the model compiles once per length
bucket (RoPE types whose frequencies depend on the sequence length, dynamic and longrope, are
never padded). Generation is `lard_jax.generate.greedy_generate` (KV cache; each batch runs the
full `max_gen_toks` steps, then the text is cut at the first stop string).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "lard_jax.evaluation.lm_eval_backend needs lm-evaluation-harness: pip install lm-eval==0.4.13"
    ) from error

from lard_jax.evaluation import multiple_choice
from lard_jax.model import dtype_of

try:
    from lard_jax.generate import greedy_generate
except ImportError:  # pragma: no cover - older trees: full-recompute decoding below
    greedy_generate = None

__all__ = ["LardJaxLM", "main"]

MODEL_NAME = "lard_jax"
_DEFAULT_BATCH = 8
_MIN_BUCKET = 64
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _parse_rope_scaling(value: Any):
    """dict, JSON text, or "native"/"none" (None: native RoPE). Returns the value for load_pretrained."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("native", "none", "null", "default"):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"rope_scaling: not JSON ({e}): {value!r}") from None
        if parsed is not None and not isinstance(parsed, dict):
            raise ValueError(f"rope_scaling must be a JSON object, got {value!r}")
        return parsed
    raise ValueError(f"rope_scaling must be a dict or its JSON, got {type(value).__name__}")


def _batch_size(value: Any) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return _DEFAULT_BATCH
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {value!r}")
    return size


def _special_text(tokenizer: Any, token_id: int | None) -> str | None:
    """The text of a special token (the harness adds the eos text to every stop list)."""
    if token_id is None:
        return None
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return hf.convert_ids_to_tokens(int(token_id))
    names = getattr(tokenizer, "special_tokens", None)
    return names[token_id] if names is not None and token_id < len(names) else None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model, precision, params, input_ids, targets, positions):
    """One model call serves both request kinds (one compile per batch shape): the log-prob of
    `targets` at every position, whether each is the argmax, and the argmax after `positions - 1`."""
    with jax.default_matmul_precision(precision):
        logits = model.apply({"params": params}, input_ids).astype(jnp.float32)
    # log softmax at the targets only: no second [B, T, vocab] array
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    argmax = jnp.argmax(logits, axis=-1)
    return picked, argmax == targets, jnp.take_along_axis(argmax, (positions - 1)[:, None], axis=1)[:, 0]


@register_model(MODEL_NAME) if __name__ != "__main__" else (lambda cls: cls)
class LardJaxLM(LM):
    """lm-eval `LM` over a lard_jax model: loglikelihood, loglikelihood_rolling, generate_until (greedy)."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        tokenizer: str | None = None,
        rope_scaling: Any = None,
        max_position_embeddings: int | None = None,
        dtype: str = "float32",
        batch_size: Any = None,
        max_length: int | None = None,
        add_bos: Any = "tokenizer",
        max_gen_toks: int = 256,
        attention_impl: str = "xla",
        model=None,
        params=None,
        max_batch_size: Any = None,
        device: Any = None,
        **unused: Any,
    ):
        super().__init__()
        from lard_jax import hf
        from lard_jax.tokenizer import load_tokenizer

        if unused:
            raise ValueError(f"lard_jax model: unknown model_args {sorted(unused)}")
        if model is None:
            if not pretrained:
                raise ValueError("lard_jax model: pass pretrained=<local Hugging Face directory>")
            options: dict[str, Any] = {"dtype": dtype_of(dtype), "attention_impl": attention_impl}
            if rope_scaling not in (None, ""):
                options["rope_scaling"] = _parse_rope_scaling(rope_scaling)
            if max_position_embeddings:
                options["max_position_embeddings"] = int(max_position_embeddings)
            model, params = hf.load_pretrained(str(pretrained), **options)
        elif params is None:
            raise ValueError("lard_jax model: model= needs params=")
        self.model, self.params = model, params
        if tokenizer is None and not pretrained:
            raise ValueError("lard_jax model: pass tokenizer= (a directory or 'byte') with model=")
        self.tokenizer = load_tokenizer(str(tokenizer or pretrained))
        self.batch_size_per_call = _batch_size(batch_size)
        self.add_bos = multiple_choice.bos_mode(add_bos)
        self.max_length = int(max_length or 0) or int(model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.pad_id = int(getattr(self.tokenizer, "pad_id", None) or 0)
        self.eos_id = getattr(self.tokenizer, "eos_id", None)
        self.prefix_id = multiple_choice.prefix_token_id(self.tokenizer)
        rope = model.config.rope_scaling_dict or {}
        self._exact_widths = rope.get("rope_type") in _LENGTH_DEPENDENT_ROPE
        # float32 as in PyTorch: no reduced-precision (TF32) matmuls on GPU.
        self._precision = "highest" if model.config.dtype == "float32" else None

    # ------------------------------------------------------------------ helpers
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    def _bucket(self, width: int) -> int:
        if self._exact_widths:
            return width
        bucket = _MIN_BUCKET
        while bucket < width:
            bucket *= 2
        return max(width, min(bucket, self.max_length))

    def _forward(self, input_ids: np.ndarray, targets: np.ndarray, positions: np.ndarray):
        return jax.device_get(
            _forward(
                self.model,
                self._precision,
                self.params,
                jnp.asarray(input_ids, jnp.int32),
                jnp.asarray(targets, jnp.int32),
                jnp.asarray(positions, jnp.int32),
            )
        )

    def _score_batch(self, input_ids: np.ndarray, spans) -> list[tuple[float, bool]]:
        targets = np.zeros_like(input_ids)
        for row, first, last, continuation in spans:
            targets[row, first:last] = continuation
        log_probs, greedy, _ = self._forward(input_ids, targets, np.ones(len(input_ids), np.int32))
        return [
            (float(np.asarray(log_probs[row, first:last], np.float64).sum()), bool(np.all(greedy[row, first:last])))
            for row, first, last, _ in spans
        ]

    def score_tokens(
        self,
        token_requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        progress: bool = True,
        desc: str = "loglikelihood",
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context ids, continuation ids), harness truncation and batching."""
        return multiple_choice.score_token_requests(
            self._score_batch,
            token_requests,
            batch_size=self.batch_size,
            max_length=self.max_length,
            bucket=self._bucket,
            pad_id=self.pad_id,
            pad_batch=True,
            progress=progress,
            desc=desc,
        )

    # ------------------------------------------------------------------ the LM interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        token_requests = multiple_choice.encode_requests(self.tokenizer, pairs, self.add_bos)
        results = self.score_tokens(token_requests, progress=not disable_tqdm)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, req in enumerate(requests):
            (text,) = req.args
            tokens = multiple_choice.encode(self.tokenizer, text, self.add_bos)
            for window in multiple_choice.rolling_requests(tokens, self.prefix_id, self.max_length):
                windows.append(window)
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (log_likelihood, _) in zip(
            owner, self.score_tokens(windows, progress=not disable_tqdm, desc="loglikelihood_rolling")
        ):
            totals[index] += log_likelihood
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        outputs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            until, max_new = self._generation_settings(requests[indices[0]].args[1])
            budget = self.max_length - max_new
            if budget < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            prompts = {
                i: multiple_choice.encode(self.tokenizer, requests[i].args[0], self.add_bos)[-budget:]
                or [self.prefix_id]
                for i in indices
            }  # an empty prompt conditions on bos (else eos)
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for first in range(0, len(order), self.batch_size):
                batch = order[first : first + self.batch_size]
                for i, text in zip(batch, self._greedy([prompts[i] for i in batch], max_new, until)):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return outputs

    # ------------------------------------------------------------------ generation
    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        kwargs = dict(gen_kwargs or {})
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise ValueError("lard_jax model: only greedy generation (do_sample=False, temperature=0)")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = _special_text(self.tokenizer, self.eos_id)
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_new = self.max_gen_toks
        for key in ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks"):  # last wins
            if kwargs.get(key) is not None:
                max_new = int(kwargs[key])
        return until, max_new

    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy continuations of a batch of prompts, each cut before its first stop string."""
        stops = [s for s in until if s]
        if greedy_generate is not None:  # KV-cached decoding
            # a short batch is filled with copies so every batch has the compiled shape
            rows = prompts + [prompts[0]] * (self.batch_size - len(prompts))
            generated = greedy_generate(
                self.model, self.params, rows, max_new, eos_id=self.eos_id, batch_size=self.batch_size
            )[: len(prompts)]
        else:
            generated = self._greedy_recompute(prompts, max_new, stops)
        texts = []
        for tokens in generated:
            if self.eos_id is not None and self.eos_id in tokens:
                tokens = tokens[: tokens.index(self.eos_id)]
            text = self.tokenizer.decode(tokens)
            for stop in stops:
                text = text.split(stop)[0]
            texts.append(text)
        return texts

    def _greedy_recompute(self, prompts: list[list[int]], max_new: int, stops: list[str]) -> list[list[int]]:
        """Without lard_jax.generate: the whole sequence again per new token, until eos or a stop string."""
        rows = self.batch_size
        width = self._bucket(max(len(p) for p in prompts) + max_new)
        buffer = np.full((rows, width), self.pad_id, np.int32)
        positions = np.ones(rows, np.int32)
        for row, prompt in enumerate(prompts):
            buffer[row, : len(prompt)] = prompt
            positions[row] = len(prompt)
        generated: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_new):
            if not live:
                break
            tokens = self._forward(buffer, np.zeros_like(buffer), positions)[2]
            still = []
            for row in live:
                token = int(tokens[row])
                if self.eos_id is not None and token == self.eos_id:
                    continue
                generated[row].append(token)
                buffer[row, positions[row]] = token
                positions[row] += 1
                if stops and any(s in self.tokenizer.decode(generated[row]) for s in stops):
                    continue
                still.append(row)
            live = still
        return generated

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {
            "lard_jax_dtype": cfg.dtype,
            "lard_jax_rope_scaling": cfg.rope_scaling_dict,
            "lard_jax_max_length": self.max_length,
            "lard_jax_add_bos": self.add_bos,
        }


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with `--model lard_jax` unless another model is named."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("ls", "validate"):
        if args and args[0] == "run":
            args = args[1:]
        if not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
            args = ["--model", MODEL_NAME] + args
        args = ["run"] + args
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":
    # Run as a script this file is `__main__`; the model is registered by importing the module.
    from lard_jax.evaluation.lm_eval_backend import main as _main

    _main()
