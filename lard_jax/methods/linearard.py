"""LinearARD (paper sec. 3): the relation KL of Q·Qᵀ, K·Kᵀ, V·Vᵀ per layer (losses.relation_loss),
optionally plus logit KD. `fused` (default): teacher and student run layer by layer in one paired
pass and each layer's KL is computed there (losses.fused_relation_loss); the same value."""

from __future__ import annotations

import dataclasses

import jax

from lard_jax import losses
from lard_jax.methods import Context, register
from lard_jax.model import collect_qkv, final_logits, stacked_qkv
from pallas_kernels.blocks import check_fields


@dataclasses.dataclass(frozen=True)
class Config:
    relations: tuple = ("q", "k", "v")
    layers: tuple | None = None  # None = all
    lambda_attn: float = 1.0
    lambda_logit: float = 0.0
    temperature: float = 1.0  # of the logit-KD term
    kernel_impl: str = "auto"
    # relation kernel BlockSizes overrides as (field, value) pairs (a dict is accepted), on top of
    # the impl's defaults, e.g. (("merge_d_left", False),) with kernel_impl "pallas_mgpu" for an A/B
    # of a step (experiments/bench_restore_step.py --kernel_impl pallas_mgpu:merge_d_left=0). () = the
    # defaults. With kernel_impl "auto" on a GPU, overrides keep the Triton kernel (relation_kl's rule).
    kernel_blocks: tuple = ()
    normalize: str = "query_heads"  # losses.NORMALIZATIONS: "query_heads" (authors) | "per_relation_heads"
    fused: bool = True

    def __post_init__(self):
        if self.normalize not in losses.NORMALIZATIONS:
            raise ValueError(f"unknown normalize {self.normalize!r}; expected one of {losses.NORMALIZATIONS}")
        object.__setattr__(self, "relations", tuple(self.relations))
        blocks = self.kernel_blocks.items() if isinstance(self.kernel_blocks, dict) else self.kernel_blocks
        blocks = tuple(sorted((str(k), v) for k, v in blocks))
        check_fields([k for k, _ in blocks], "kernel_blocks")
        object.__setattr__(self, "kernel_blocks", blocks)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


def kernel_impl_for(impl: str, scan_layers: bool) -> str:
    """The relation kernel a step runs: "auto", except that per-layer (unscanned) layers on a GPU
    take the Triton kernel. "auto" picks the Mosaic GPU kernel on Hopper at head dims 64 and 128, and each
    call site of a Mosaic GPU kernel is compiled on its own: a scanned step has one per kernel (its
    compile took 13.7 s against 3.8 s with Triton on Llama-2-7B shapes), a per-layer one has one per
    layer (on the H200 the loop layout's 7B step was still compiling when its 170 s limit ended it; the
    cause is inferred from those two figures, not profiled: docs/kernel_notes.md).
    An explicit impl is kept."""
    if impl == "auto" and not scan_layers and jax.default_backend() == "gpu":
        return "pallas_gpu"
    return impl


@register("linearard", Config)
def build(ctx: Context, cfg: Config):
    teacher, student = ctx.teacher, ctx.student
    impl = kernel_impl_for(cfg.kernel_impl, student.config.scan_layers)

    def loss_fn(trainable, frozen, batch, rng):
        s_params = ctx.student_params(frozen, trainable)
        t_frozen = jax.lax.stop_gradient(frozen)
        drop = ctx.dropout_kw(rng, 0x10)
        mask, seg = batch.get("mask"), batch.get("segment_ids")
        if cfg.fused:
            attn, parts, hidden = losses.fused_relation_loss(
                teacher.config,
                student.config,
                t_frozen,
                s_params,
                batch["input_ids"],
                mask=mask,
                segment_ids=seg,
                relations=cfg.relations,
                layers=cfg.layers,
                impl=impl,
                block_sizes=dict(cfg.kernel_blocks),
                normalize=cfg.normalize,
                dropout_rng=drop.get("dropout_rng"),
                return_hidden=bool(cfg.lambda_logit),
            )
            logits = lambda: (
                final_logits(teacher.config, t_frozen, hidden[0]),  # noqa: E731
                final_logits(student.config, s_params, hidden[1]),
            )
        else:
            t_logits, t_inter = ctx.apply(teacher, t_frozen, batch)
            s_logits, s_inter = ctx.apply(student, s_params, batch, **drop)
            s_qkv, t_qkv = stacked_qkv(s_inter), stacked_qkv(t_inter)  # scan_layers: the stacks as sown
            if s_qkv is None or t_qkv is None:
                s_qkv, t_qkv = collect_qkv(s_inter), collect_qkv(t_inter)
            attn, parts = losses.relation_loss(
                s_qkv,
                t_qkv,
                mask=mask,
                segment_ids=seg,
                relations=cfg.relations,
                layers=cfg.layers,
                impl=impl,
                block_sizes=dict(cfg.kernel_blocks),
                normalize=cfg.normalize,
                num_query_heads=student.config.num_attention_heads,
            )
            logits = lambda: (t_logits, s_logits)  # noqa: E731
        loss = cfg.lambda_attn * attn
        metrics = {**{f"relation_{r}": v for r, v in parts.items()}, "relation": attn}
        if cfg.lambda_logit:
            t_logits, s_logits = logits()
            kd = losses.logit_kd_loss(s_logits, t_logits, mask, cfg.temperature)
            metrics["logit_kd"] = kd
            loss = loss + cfg.lambda_logit * kd
        return loss, metrics

    return loss_fn
