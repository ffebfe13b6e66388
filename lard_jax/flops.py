"""FLOP accounting for one restoration step: what the compiled step executes, per token.

Convention: **executed model FLOPs (no remat recompute)**. Only matrix multiplications are
counted (2 FLOPs per multiply-add); norms, RoPE, softmax and other element-wise work are not.
A matmul is counted when the jitted step runs it, which is not always the textbook "6N":

  * teacher forward: the frozen model's forward. With the LinearARD loss alone
    (lambda_logit == 0) the logits are dead code and XLA removes the LM head; the last layer
    the relation loss reads contributes only its q/k/v projections (its attention, o_proj and
    MLP feed nothing), and layers above it are removed entirely.
  * student forward: the same live set as the teacher (the student's logits are equally dead),
    less layer 0's q/k/v products that use the frozen kernel (untrained projections, or the base
    kernel of unmerged LoRA): their input, norm(embedding), is the teacher's too, and XLA
    computes them once (`student_forward_shared_with_teacher`, measured in tests/test_flops.py).
  * student backward, activations: input gradients (dX) of every live matmul on a path from
    the loss back to a trainable weight. The embeddings never need input gradients, so the
    first layer's q/k/v projections get no dX. The frozen MLP and o_proj weights get dX only.
  * student backward, weights: weight gradients (dW) of the trainable projections only. LoRA
    (`lard_jax.trainable`) runs one of two ways:
      merged (no LoRA dropout, `lora_merged=True`): the student's kernel is W + s·A·B, so the
      dense gradient of the merged kernel is still formed per token (counted in the weights);
      the factor matmuls (the merge A·B, dA = dW·Bᵀ, dB = Aᵀ·dW) run once per micro-batch and
      are reported amortised per token as `lora_factors`;
      unmerged (LoRA dropout > 0, the authors' PEFT setting, `lora_merged=False`): y = x·W +
      (x·A)·B per token: forward +2·r·(in+out); backward d(xA) = dY·Bᵀ and, where dX is needed,
      d(xA)·Aᵀ (activations), dA and dB (weights); no dense dW.
  * attention score/value matmuls (Q·Kᵀ and P·V forward; dP, dV, dQ, dK backward). Causal
    halving (T²/2 key-query pairs instead of T²) is counted when the implementation skips the
    masked tiles: "cudnn", "blockwise" and "pallas_tpu" do; "xla" builds the full T×T logits and
    masks them (no halving). Flash-style backward passes recompute score tiles: cuDNN 1 matmul,
    "blockwise" 2 (its `jax.checkpoint` reruns each query block's forward), Pallas TPU 3 (the dK/dV
    and dQ kernels each recompute Q·Kᵀ and dP = dO·Vᵀ is done twice); these are executed but not
    model work: `attention_flash_recompute`. ("blockwise" skips whole key blocks, so it executes
    somewhat more than T²/2 pairs; the halved count is the convention here.)

Not in `model_total` and reported separately:
  * the relation-KL kernel: per layer, relation and head, forward = two T×T×D logit matmuls
    (teacher and student) = 2·T·T·D FLOPs with causal halving (4·T·T·D without), i.e.
    2·T·D per token; backward = two gradient matmuls (d_left, d_right) of the same size;
    the kernels' backward also recomputes both logit tiles in each of its two passes
    (`relation_bwd_recompute_matmuls=4`, the Pallas GPU/TPU kernels and the chunked XLA impl),
    reported as `relation_backward_recompute`. (docs/bench_relation_kl.md's "effective"
    6·T²·D·H counts forward + backward + one recompute; the kernels execute 8·T²·D·H.)
  * remat recompute (`remat != "none"`): forward matmuls rerun in the backward pass,
    executed but not model FLOPs (`remat_recompute`).

`executed_total` adds everything above: all matmul FLOPs the step runs (hardware FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence

CONVENTION = "executed model FLOPs (no remat recompute)"
# attention_impl -> (causal halving, score-sized matmuls recomputed in the backward)
ATTENTION_CONVENTIONS = {"xla": (False, 0), "cudnn": (True, 1), "blockwise": (True, 2), "pallas_tpu": (True, 3)}
RELATION_TO_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
_METHODS = ("linearard", "cpt", "logit_kd", "longred_simplified", "longred")
# Steps this FLOP model does not describe (every parameter trainable: embedding and head weight
# gradients, dX down to the embeddings); callers that estimate MFU catch the ValueError.
_NOT_MODELLED = {"lm": "pretraining (every parameter trainable)"}


def _proj_shapes(cfg) -> dict[str, tuple[int, int]]:
    e, h, kv, d, m = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        "q_proj": (e, h * d),
        "k_proj": (e, kv * d),
        "v_proj": (e, kv * d),
        "o_proj": (h * d, e),
        "gate_proj": (e, m),
        "up_proj": (e, m),
        "down_proj": (m, e),
    }


def _remat_recompute_layer(layer: int, remat: str, attention_impl: str, shapes, attn_fwd: float) -> float:
    """Matmul FLOPs/token a remat policy reruns in the backward of one fully live layer.

    "full": every forward matmul whose output the backward needs: q, k, v (attention backward),
    the attention core (its output and softmax statistics), o_proj (the MLP's input), gate and up
    (SiLU backward); not down_proj, whose output only feeds the next layer (saved at the layer
    boundary); the same in every layer (tests/test_flops.py, XLA:CPU). Until 2026-12-04 the loop
    layout's `nn.remat` ran without JAX's CSE barrier and XLA:CPU shared layer 0's attention half
    with the forward (on an H200 the loop apparently recomputed no layer); the barrier is kept
    outside scans now
    (model._remat_layer). "dots" / "dots_no_batch": dot outputs are saved and the XLA attention is
    not rerun (measured on CPU); the other attention implementations are custom calls or loops
    and rerun their forward (cuDNN: measured in a deviceless H200 compile, one rerun per layer,
    experiments/compile_offline.py). "dots_no_batch_attention" also keeps cuDNN's residuals
    (attention.with_named_residuals): no rerun for cuDNN; blockwise and Pallas still rerun.
    Unmerged LoRA under "full" also reruns x·A and (x·A)·B in every layer and x·A in a partial top
    layer (added by the caller; measured)."""
    if remat == "none":
        return 0.0
    if remat == "full":
        rerun = tuple(n for n in shapes if n != "down_proj")
        return sum(2.0 * shapes[n][0] * shapes[n][1] for n in rerun) + attn_fwd
    if remat in ("dots", "dots_no_batch"):
        return attn_fwd if attention_impl != "xla" else 0.0
    if remat == "dots_no_batch_attention":
        return attn_fwd if attention_impl not in ("xla", "cudnn") else 0.0
    raise ValueError(f"unknown remat {remat!r}")


def executed_flops_per_token(
    cfg,
    *,
    seq_len: int,
    method: str = "linearard",
    trainable: Sequence[str] = ("q_proj", "k_proj", "v_proj"),
    lora_rank: int = 0,
    lora_merged: bool = True,
    lambda_logit: float = 0.0,
    relations: Sequence[str] = ("q", "k", "v"),
    layers: Sequence[int] | None = None,
    remat: str = "none",
    attention_impl: str | None = None,
    relation_causal_halving: bool = True,
    relation_bwd_recompute_matmuls: int = 4,
    hidden_layers: Sequence[int] | None = None,
    micro_batch: int = 1,
) -> dict:
    """Per-token matmul FLOPs of one training step of `lard_jax.trainer`, broken down.

    cfg: a `LlamaConfig`; seq_len: T; trainable: the student's trainable projections (every
    layer, as `trainer.trainable_mask`); lora_rank > 0: LoRA on them, lora_merged=False for the
    unmerged path the trainer takes with LoRA dropout; layers: the relation loss's layers (None =
    all); attention_impl: a key of ATTENTION_CONVENTIONS, default cfg.attention_impl ("auto" is
    resolved on the current backend by lard_jax.attention.resolve_impl, as for calls without
    segment ids or padding); hidden_layers: longred_simplified's hidden-state layers (None = all);
    micro_batch: sequences per forward (amortises the per-micro-batch LoRA factor matmuls).

    Returns FLOPs per token (floats) under the keys described in the module docstring, with
    `model_total` = teacher_forward + student_forward + student_backward_activations +
    student_backward_weights + lora_factors, and the convention named under "convention".
    """
    if method in _NOT_MODELLED:
        raise ValueError(
            f"method {method!r}: {_NOT_MODELLED[method]} is not in the FLOP model; expected one of {_METHODS}"
        )
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_METHODS}")
    attention_impl = attention_impl or getattr(cfg, "attention_impl", "xla")
    if attention_impl == "auto":
        from lard_jax import attention as attn_lib

        attention_impl = attn_lib.resolve_impl("auto", dtype=cfg.dtype, head_dim=cfg.head_dim)
    if attention_impl not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention_impl must be one of {sorted(ATTENTION_CONVENTIONS)}, got {attention_impl!r}")
    bad = [r for r in relations if r not in RELATION_TO_PROJ]
    if bad:
        raise ValueError(f"unknown relations {bad}")
    shapes = _proj_shapes(cfg)
    if "*" in trainable:  # lard_jax.trainable.ALL: the projection set "all"
        raise ValueError("trainable 'all' (every parameter) is not in the FLOP model; pass attention/MLP projections")
    bad = [p for p in trainable if p not in shapes]
    if bad:
        raise ValueError(f"unknown projections {bad}; expected some of {sorted(shapes)}")
    n_layers, t = cfg.num_hidden_layers, float(seq_len)
    h, kv, d, e, v = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size, cfg.vocab_size)
    causal_attn, attn_recompute_mm = ATTENTION_CONVENTIONS[attention_impl]
    t_attn = t / 2 if causal_attn else t  # keys per query the attention executes
    attn_mm = 2.0 * t_attn * d * h  # one score- or value-sized matmul, per token per layer
    attn_fwd, attn_bwd = 2 * attn_mm, 4 * attn_mm
    attn_flash_recompute = attn_recompute_mm * attn_mm
    unmerged = bool(lora_rank) and not lora_merged
    # unmerged LoRA, per token: forward x·A and (xA)·B; d(xA) = dY·Bᵀ; dX += d(xA)·Aᵀ; dA, dB
    lora_fwd = {n: 2.0 * lora_rank * (i + o) for n, (i, o) in shapes.items()} if unmerged else {}
    proj = {n: 2.0 * i * o for n, (i, o) in shapes.items()}  # forward FLOPs/token; dX and dW are the same size
    full_layer_fwd = sum(proj.values()) + attn_fwd
    head = 2.0 * e * v

    # ---- which outputs each forward pass must produce
    rel_layers = sorted(set(range(n_layers) if layers is None else [l % n_layers for l in layers]))
    rel_projs = {RELATION_TO_PROJ[r] for r in relations}
    hid = set(range(n_layers) if hidden_layers is None else [l % n_layers for l in hidden_layers])

    def pass_spec(head_live: bool, qkv_layers, hidden):
        """Per layer: ("full" | set of live projections); layer outputs needed -> full layer."""
        out_used, spec, above_live = [False] * n_layers, [None] * n_layers, head_live
        for l in reversed(range(n_layers)):
            out_used[l] = above_live or l in hidden
            if out_used[l]:
                spec[l] = "full"
            else:
                spec[l] = set(rel_projs) if l in qkv_layers else set()
            above_live = above_live or bool(spec[l])
        return spec

    def live(s):
        return () if not s else tuple(shapes) if s == "full" else tuple(s)

    def forward(spec, head_live, student=False):
        f = sum(full_layer_fwd if s == "full" else sum(proj[p] for p in s) for s in spec)
        if student and unmerged:
            f += sum(lora_fwd[p] for s in spec for p in live(s) if p in trainable)
        if student and teacher_passes:
            # Layer 0's q/k/v read norm(embedding), the same for teacher and student (RoPE comes
            # after the projection): where the student uses the frozen kernel too (not trainable,
            # or unmerged LoRA's base kernel), XLA computes the product once (CSE; measured).
            f -= shared_layer0(spec)
        return f + (head if head_live else 0.0)

    def shared_layer0(spec):
        return sum(
            proj[p]
            for p in live(spec[0])
            if p in ("q_proj", "k_proj", "v_proj")
            and p in live(teacher_passes[0][0][0])
            and (p not in trainable or unmerged)
        )

    def backward(spec, head_live):
        """(activations, weights, attention-core part, flash recompute, remat recompute, lora kernels)"""
        act = wts = core = flash = rem = 0.0
        lora_kernels = set()
        if head_live:
            act += head  # dX of the frozen head
        for l, s in enumerate(spec):
            if not s:
                continue
            if s == "full":
                with_cot = list(shapes)  # every matmul of the layer carries a cotangent
                core += attn_bwd
                act += attn_bwd
                flash += attn_flash_recompute
                rem += _remat_recompute_layer(l, remat, attention_impl, shapes, attn_fwd)
                if remat == "full" and unmerged:  # the LoRA path of q/k/v reruns too (measured)
                    rem += sum(lora_fwd[p] for p in trainable if p in ("q_proj", "k_proj", "v_proj"))
            else:
                with_cot = sorted(s)
                if remat == "full" and unmerged:  # x·A, for dB (measured)
                    rem += sum(2.0 * shapes[p][0] * lora_rank for p in with_cot if p in trainable)
            for p in with_cot:
                # dX: always inside a layer; for q/k/v only if the layer's input needs a gradient
                # (trainable weights below it; layer 0's input is the frozen embedding).
                needs_dx = p not in ("q_proj", "k_proj", "v_proj") or l > 0
                if needs_dx:
                    act += proj[p]
                if p not in trainable:
                    continue
                i, o = shapes[p]
                if unmerged:  # d(xA) = dY·Bᵀ, dX via A; dA = xᵀ·d(xA), dB = (xA)ᵀ·dY
                    act += 2.0 * o * lora_rank + (2.0 * lora_rank * i if needs_dx else 0.0)
                    wts += 2.0 * i * lora_rank + 2.0 * lora_rank * o
                else:  # dense dW (of the merged kernel under merged LoRA)
                    wts += proj[p]
                    lora_kernels.add((l, p))
        return act, wts, core, flash, rem, lora_kernels

    # ---- the passes each method runs
    head_in_linearard = method == "linearard" and bool(lambda_logit)
    teacher_passes, student_passes = [], []  # (spec, head_live)
    if method == "linearard":
        sp = pass_spec(head_in_linearard, rel_layers, set())
        teacher_passes.append((sp, head_in_linearard))
        student_passes.append((sp, head_in_linearard))
    elif method == "cpt":
        student_passes.append((pass_spec(True, [], set()), True))
    elif method == "logit_kd":
        sp = pass_spec(True, [], set())
        teacher_passes.append((sp, True))
        student_passes.append((sp, True))
    else:  # longred_simplified: teacher logits + hidden states; student hidden states; student at long positions
        teacher_passes.append((pass_spec(True, [], hid), True))
        student_passes.append((pass_spec(False, [], hid), False))
        student_passes.append((pass_spec(True, [], set()), True))

    out = {
        "convention": CONVENTION,
        "method": method,
        "seq_len": seq_len,
        "attention_impl": attention_impl,
        "attention_causal_halving": causal_attn,
        "relation_causal_halving": bool(relation_causal_halving),
        "remat": remat,
        "lora_rank": lora_rank,
        "lora_merged": bool(lora_rank) and not unmerged,
        "trainable": list(trainable),
    }
    out["teacher_forward"] = sum(forward(s, hl) for s, hl in teacher_passes)
    out["student_forward"] = sum(forward(s, hl, student=True) for s, hl in student_passes)
    # not in student_forward: layer-0 projections the student shares with the teacher (XLA CSE)
    out["student_forward_shared_with_teacher"] = (
        sum(shared_layer0(s) for s, _ in student_passes) if teacher_passes else 0.0
    )
    act = wts = core = flash = rem = 0.0
    lora_kernels = set()
    for s, hl in student_passes:
        a, w, c, f, r, lk = backward(s, hl)
        act, wts, core, flash, rem = act + a, wts + w, core + c, flash + f, rem + r
        lora_kernels |= lk
    out["student_backward_activations"] = act
    out["student_backward_weights"] = wts
    lora = 0.0
    if lora_rank and not unmerged:  # merge A·B, dA = dW·Bᵀ, dB = Aᵀ·dW: per kernel per micro-batch
        lora = sum(3 * 2.0 * shapes[p][0] * lora_rank * shapes[p][1] for _, p in lora_kernels)
        lora /= micro_batch * t
    out["lora_factors"] = lora
    n_fwd_layers = sum(1 for s, _ in teacher_passes + student_passes for x in s if x == "full")
    out["of_which_attention_core"] = n_fwd_layers * attn_fwd + core
    out["model_total"] = out["teacher_forward"] + out["student_forward"] + act + wts + lora

    # ---- relation kernel (LinearARD only), separately
    rel_fwd = rel_bwd = rel_rec = 0.0
    if method == "linearard":
        t_rel = t / 2 if relation_causal_halving else t
        for r in relations:
            heads = h if r == "q" else kv
            mm = 2.0 * t_rel * d * heads  # one T×T×D logit-sized matmul, per token
            rel_fwd += len(rel_layers) * 2 * mm
            rel_bwd += len(rel_layers) * 2 * mm
            rel_rec += len(rel_layers) * relation_bwd_recompute_matmuls * mm
    out["relation_forward"] = rel_fwd
    out["relation_backward"] = rel_bwd
    out["relation_total"] = rel_fwd + rel_bwd
    out["relation_backward_recompute"] = rel_rec
    out["attention_flash_recompute"] = flash
    out["remat_recompute"] = rem
    out["executed_total"] = out["model_total"] + out["relation_total"] + rel_rec + flash + rem
    return {
        k: float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seq_len" and k != "lora_rank"
        else v
        for k, v in out.items()
    }


def mfu(
    flops_per_token: float | dict,
    tokens_per_second: float,
    peak_flops_per_device: float | None,
    devices: int = 1,
    key: str = "model_total",
) -> float | None:
    """Model FLOPs utilisation: flops/token x tokens/s over the devices' peak rate (None if the peak
    is unknown). `flops_per_token` may be an `executed_flops_per_token` dict (then `key` picks the
    numerator: "model_total" for MFU in the executed convention, "executed_total" for hardware
    FLOPs utilisation)."""
    if isinstance(flops_per_token, dict):
        flops_per_token = flops_per_token[key]
    if not peak_flops_per_device:
        return None
    return flops_per_token * tokens_per_second / (peak_flops_per_device * devices)


def format_breakdown(b: dict, unit: float = 1e9) -> str:
    """One line per numeric entry, in GFLOP/token."""
    return "\n".join(f"{k:32s} {v / unit:10.3f}" for k, v in b.items() if isinstance(v, float))
