"""Restoration objectives as a registry: one module per method, each registering a loss builder
with its own config block (a frozen dataclass of the options only that method reads).

    @register("my_method", Config)
    def build(ctx: Context, cfg: Config):
        def loss_fn(trainable, frozen, batch, rng):
            ...
            return loss, metrics
        return loss_fn

Adding a method = one module here plus its line in BUILTIN below. `trainer.LossSpec(method=...,
**options)` validates the options against the method's Config; `trainer.make_loss_fn` looks the
builder up. `Context` carries what every method needs: the teacher and student models, the LoRA
spec, the student's parameter tree, apply-with-intermediates and the LoRA-dropout keys.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax

from lard_jax.model import LlamaForCausalLM
from lard_jax.trainable import LoraSpec, student_params

RENAMED = {"longred": "longred_simplified"}
BUILTIN = ("linearard", "cpt", "logit_kd", "longred_simplified", "lm")  # module names under lard_jax.methods


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config: type  # frozen dataclass: the method's options and their defaults
    build: Callable  # build(ctx: Context, cfg) -> loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)
    teacher_forward: bool = True  # whether the step runs the teacher (FLOP accounting)


REGISTRY: dict[str, Method] = {}


def register(name: str, config: type, *, teacher_forward: bool = True):
    def deco(build):
        REGISTRY[name] = Method(name, config, build, teacher_forward)
        return build

    return deco


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    if name in RENAMED:
        raise ValueError(
            f"method {name!r} was renamed to {RENAMED[name]!r}: it is a simplified LongReD "
            "(short-text hidden-state cosine + short-to-long logit distillation with skipped position ids; "
            "no long-text LM term, CREAM positions or layer selection of the LongReD paper), not LongReD itself"
        )
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {names()}")
    return REGISTRY[name]


def options_from_block(config_cls: type, block, **extra) -> dict:
    """The method's options read by name from a config block (e.g. ml_collections config.loss); keys
    the method does not have are ignored, tuples/lists become tuples, and an empty tuple for an
    option whose default is None (layer lists) becomes None."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.name in extra:
            out[f.name] = extra[f.name]
            continue
        if f.name not in block:
            continue
        value = block[f.name]
        if isinstance(value, (list, tuple)):
            value = tuple(value)
            if not value and f.default is None:
                value = None
        out[f.name] = value
    return out


@dataclasses.dataclass(frozen=True)
class Context:
    """What a loss builder gets besides its config. `student` is already built with the LoRA
    dropout rate when the LoRA path runs unmerged (`dropout`)."""

    teacher: LlamaForCausalLM
    student: LlamaForCausalLM
    lora: LoraSpec

    @classmethod
    def create(cls, teacher, student, lora: LoraSpec) -> Context:
        if lora.enabled and not lora.merged:
            student = type(student)(student.config.replace(lora_dropout=lora.dropout))
        return cls(teacher, student, lora)

    @property
    def dropout(self) -> bool:
        return self.lora.enabled and not self.lora.merged

    def student_params(self, frozen, trainable):
        return student_params(frozen, trainable, self.lora)

    def dropout_kw(self, rng, salt: int) -> dict:
        """{"dropout_rng": ...} for LlamaForCausalLM (or {} without LoRA dropout)."""
        return {"dropout_rng": jax.random.fold_in(rng, salt)} if self.dropout else {}

    @staticmethod
    def apply(model, params, batch, **kw) -> tuple[Any, Any]:
        """(output, intermediates) of one forward on batch (input_ids, segment_ids, mask)."""
        out, state = model.apply(
            {"params": params},
            batch["input_ids"],
            segment_ids=batch.get("segment_ids"),
            attention_mask=batch.get("mask"),
            mutable=["intermediates"],
            **kw,
        )
        return out, state["intermediates"]


for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
