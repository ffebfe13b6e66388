"""lard_jax.flops against what XLA compiles, and hand-computed numbers for Llama-2-7B / Llama-3-8B shapes.

Two measurements of each small jitted function on CPU:
  * the matmul FLOPs of the optimised HLO (every `dot`: 2 x output elements x contracted size),
    which must equal the formula exactly;
  * XLA's own `cost_analysis()['flops']`, which also counts element-wise work (norms, RoPE,
    softmax, adds), so it may exceed the matmul count: allowed 0% below to 2% above (measured
    0.6-1.1%; 5% for the LoRA-dropout case, whose random bits add 3.2%).
The model uses XLA attention here (full T x T logits, no causal halving), float32.
"""

import re

import flax
import jax
import jax.numpy as jnp
import pytest

from lard_jax import flops
from lard_jax.model import LlamaConfig, LlamaForCausalLM, collect_qkv

T = 64
CFG = LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=T,
)
COST_TOL = 0.02  # cost_analysis counts element-wise FLOPs too (measured 0.6-1.1% above the matmul count)


def _dot_flops(hlo_text: str) -> int:
    shapes = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
        if m:
            shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
    total = 0
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\)", line)
        if not m:
            assert " dot(" not in line, line  # a dot this parser does not understand
            continue
        n = 2
        for x in m.group(1).split(","):
            n *= int(x) if x else 1
        lhs = shapes[m.group(2)]
        for i in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1).split(","):
            n *= lhs[int(i)]
        total += n
    return total


def _measure(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return _dot_flops(compiled.as_text()), float(cost["flops"])


def _check(fn, args, predicted_per_token, tokens=T, cost_tol=COST_TOL):
    dots, xla = _measure(fn, *args)
    predicted = predicted_per_token * tokens
    assert dots == pytest.approx(predicted, rel=1e-9), (dots, predicted)
    assert predicted <= xla <= (1 + cost_tol) * predicted, (xla, predicted)


@pytest.fixture(scope="module")
def setup():
    model = LlamaForCausalLM(CFG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    flat = flax.traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if k[-2] in ("q_proj", "k_proj", "v_proj")}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, T), 0, CFG.vocab_size)
    heads = {"q": CFG.num_attention_heads, "k": CFG.num_key_value_heads, "v": CFG.num_key_value_heads}
    # Random weights on q/k/v: a stand-in for the relation kernel's cotangents (a plain sum
    # would give a broadcast constant that XLA may simplify).
    w = [
        {r: jax.random.normal(jax.random.PRNGKey(10 + i), (1, T, heads[r], CFG.head_dim)) for r in "qkv"}
        for i in range(CFG.num_hidden_layers)
    ]
    return dict(params=params, flat=flat, trainable=trainable, frozen=frozen, ids=ids, w=w)


def _qkv(model, params, ids):
    logits, st = model.apply({"params": params}, ids, mutable=["intermediates"])
    return logits, collect_qkv(st["intermediates"])


def _student_loss(model, lora_rank=0, logit_weight=None):
    """Proxy of the student's part of the step: q/k/v -> weighted sum (value AND gradient, as
    the real step, whose relation kernel needs the student's q/k/v values)."""

    def loss(trainable, frozen, ids, w, *extra):
        full = dict(frozen)
        if lora_rank:
            for k, (a, b) in trainable.items():
                full[k] = frozen[k] + (16.0 / lora_rank) * (a @ b)  # trainer.merge_student's merge
        else:
            full.update(trainable)
        logits, layers = _qkv(model, flax.traverse_util.unflatten_dict(full), ids)
        out = sum(jnp.sum(l[r] * wl[r]) for l, wl in zip(layers, w) for r in "qkv")
        if logit_weight is not None:
            out = out + jnp.sum(logits * extra[0])
        return out

    return jax.value_and_grad(loss)


def _student_total(b):
    return b["student_forward"] + b["student_backward_activations"] + b["student_backward_weights"] + b["lora_factors"]


def test_teacher_forward_without_head(setup):
    model = LlamaForCausalLM(CFG)
    b = flops.executed_flops_per_token(CFG, seq_len=T)
    assert b["convention"] == "executed model FLOPs (no remat recompute)"
    assert not b["attention_causal_halving"]  # XLA attention: full T x T
    _check(lambda p, x: _qkv(model, p, x)[1], (setup["params"], setup["ids"]), b["teacher_forward"])


def test_teacher_forward_relation_layers_subset(setup):
    model = LlamaForCausalLM(CFG)
    b = flops.executed_flops_per_token(CFG, seq_len=T, layers=(1,), relations=("k",))
    _check(lambda p, x: _qkv(model, p, x)[1][1]["k"], (setup["params"], setup["ids"]), b["teacher_forward"])


def test_student_forward_backward_qkv_trainable(setup):
    b = flops.executed_flops_per_token(CFG, seq_len=T)
    _check(
        _student_loss(LlamaForCausalLM(CFG)),
        (setup["trainable"], setup["frozen"], setup["ids"], setup["w"]),
        _student_total(b),
    )


def test_student_lora(setup):
    r = 8
    lora = {
        k: (0.1 * jax.random.normal(jax.random.PRNGKey(2), (v.shape[0], r)), jnp.zeros((r, v.shape[1])))
        for k, v in setup["trainable"].items()
    }
    b = flops.executed_flops_per_token(CFG, seq_len=T, lora_rank=r)
    assert b["lora_factors"] > 0
    _check(
        _student_loss(LlamaForCausalLM(CFG), lora_rank=r),
        (lora, setup["flat"], setup["ids"], setup["w"]),
        _student_total(b),
    )


def test_student_with_logit_loss(setup):
    """lambda_logit > 0: the LM head and every layer are live; the head gets dX, no dW."""
    wl = jax.random.normal(jax.random.PRNGKey(3), (1, T, CFG.vocab_size))
    b = flops.executed_flops_per_token(CFG, seq_len=T, lambda_logit=1.0)
    _check(
        _student_loss(LlamaForCausalLM(CFG), logit_weight=True),
        (setup["trainable"], setup["frozen"], setup["ids"], setup["w"], wl),
        _student_total(b),
    )


def test_remat_full_recompute(setup):
    """Remat recompute is executed but outside the model convention: reported separately."""
    cfg = CFG.replace(remat="full")
    b = flops.executed_flops_per_token(cfg, seq_len=T, remat="full")
    none = flops.executed_flops_per_token(CFG, seq_len=T)
    assert b["model_total"] == none["model_total"] and b["remat_recompute"] > 0
    _check(
        _student_loss(LlamaForCausalLM(cfg)),
        (setup["trainable"], setup["frozen"], setup["ids"], setup["w"]),
        _student_total(b) + b["remat_recompute"],
    )


# ---------------------------------------------------------------------------------- 7B / 8B shapes
LLAMA2_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    attention_impl="cudnn",
)
LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    attention_impl="cudnn",
)


@pytest.mark.parametrize("cfg,kv_dim,mlp", [(LLAMA2_7B, 4096, 11008), (LLAMA3_8B, 1024, 14336)])
def test_hand_computed_7b_8b(cfg, kv_dim, mlp):
    """T = 4096, all 32 layers, Q/K/V relations, cuDNN attention (causal halving), no logit loss.
    Per token: q and o are 2*4096*4096 = 33.55 MFLOP, k and v 2*4096*kv_dim, MLP 3*2*4096*mlp;
    one causal score- or value-sized attention matmul 2*(T/2)*128*32 = 16.78 MFLOP."""
    e, t, ls = 4096, 4096, 32
    q = o = 2 * e * e
    k = v = 2 * e * kv_dim
    qkv = q + k + v
    mlp3 = 3 * 2 * e * mlp
    a = 2 * (t / 2) * 128 * 32
    layer = qkv + o + mlp3 + 2 * a
    fwd = (ls - 1) * layer + qkv  # top layer: only its q/k/v feed the loss; no LM head
    bwd_act = (ls - 1) * (mlp3 + o + 4 * a) + (ls - 1) * qkv  # dX; layer 0's q/k/v need none
    bwd_w = ls * qkv
    b = flops.executed_flops_per_token(cfg, seq_len=t, remat="full")
    assert b["teacher_forward"] == pytest.approx(fwd) and b["student_forward"] == pytest.approx(fwd)
    assert b["student_backward_activations"] == pytest.approx(bwd_act)
    assert b["student_backward_weights"] == pytest.approx(bwd_w)
    assert b["model_total"] == pytest.approx(2 * fwd + bwd_act + bwd_w)
    rel_heads = 32 + 2 * (kv_dim // 128)
    assert b["relation_forward"] == pytest.approx(ls * rel_heads * 2 * 2 * (t / 2) * 128)
    assert b["relation_backward"] == pytest.approx(b["relation_forward"])
    assert b["relation_backward_recompute"] == pytest.approx(2 * b["relation_forward"])
    assert b["attention_flash_recompute"] == pytest.approx((ls - 1) * a)
    expected = {4096: 45.225, 1024: 46.439}[kv_dim]  # GFLOP/token (docs/bench_restore_step.md)
    assert b["model_total"] / 1e9 == pytest.approx(expected, abs=5e-4)


def test_mfu_helper():
    b = flops.executed_flops_per_token(LLAMA2_7B, seq_len=4096)
    assert flops.mfu(b, 1000.0, 1e15) == pytest.approx(b["model_total"] * 1000.0 / 1e15)
    assert flops.mfu(b, 1000.0, 1e15, devices=2, key="executed_total") == pytest.approx(
        b["executed_total"] * 1000.0 / 2e15
    )
    assert flops.mfu(1.0, 1.0, None) is None


def test_student_lora_unmerged(setup):
    """LoRA with dropout (the authors' PEFT setting): model.LoraDense's unmerged x·W + (x·A)·B path."""
    r = 8
    cfg = CFG.replace(lora_dropout=0.05)
    model = LlamaForCausalLM(cfg)
    lora = {}
    for k, v in setup["trainable"].items():
        lora[k[:-1] + ("lora_a",)] = 0.1 * jax.random.normal(jax.random.PRNGKey(4), (v.shape[0], r))
        lora[k[:-1] + ("lora_b",)] = 0.1 * jax.random.normal(jax.random.PRNGKey(5), (r, v.shape[1]))

    def loss(trainable, flat, ids, w, key):
        params = flax.traverse_util.unflatten_dict({**flat, **trainable})
        _, st = model.apply({"params": params}, ids, mutable=["intermediates"], rngs={"dropout": key})
        layers = collect_qkv(st["intermediates"])
        return sum(jnp.sum(l[x] * wl[x]) for l, wl in zip(layers, w) for x in "qkv")

    b = flops.executed_flops_per_token(cfg, seq_len=T, lora_rank=r, lora_merged=False)
    assert b["lora_factors"] == 0 and not b["lora_merged"]
    # In the real step XLA shares the student's layer-0 base q/k/v products with the teacher's
    # (test_trainer_step); this proxy has no teacher, so it computes them.
    assert b["student_forward_shared_with_teacher"] == 2 * 256 * (256 + 2 * 128)
    # the dropout's random bits (threefry) add element-wise work: measured 3.2% above the matmuls
    _check(
        jax.value_and_grad(loss),
        (lora, setup["flat"], setup["ids"], setup["w"], jax.random.PRNGKey(6)),
        _student_total(b) + b["student_forward_shared_with_teacher"],
        cost_tol=0.05,
    )


# ---------------------------------------------------------------------------------- the trainer's step
@pytest.mark.parametrize("remat,lambda_logit,lora_rank", [("none", 0.0, 0), ("full", 0.5, 0), ("full", 0.0, 8)])
def test_trainer_step(remat, lambda_logit, lora_rank):
    """The whole jitted trainer step (teacher, student, relation loss, AdamW), matmuls only.
    kernel_impl="reference" is the dense relation KL (full T x T logits, autodiff backward: no
    causal halving, no recompute); the chunked and Pallas impls loop (lax.fori_loop / Pallas
    grids), which HLO text cannot count. One micro-batch, so the accumulation scan's body runs once."""
    from lard_jax import trainer

    cfg = CFG.replace(remat=remat)
    teacher = LlamaForCausalLM(cfg)
    student = LlamaForCausalLM(cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    frozen = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    lora = trainer.LoraSpec(rank=lora_rank, alpha=16.0, dropout=0.05 if lora_rank else 0.0)  # unmerged LoRA
    trainable = trainer.init_trainable(frozen, trainer.trainable_mask(frozen), lora, jax.random.PRNGKey(1))
    optimizer, schedule = trainer.make_optimizer(lr=1e-4, warmup_steps=1, total_steps=10)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), jax.random.PRNGKey(2))
    spec = trainer.LossSpec(kernel_impl="reference", lambda_logit=lambda_logit)
    step = trainer.make_train_step(teacher, student, spec, lora, optimizer, schedule)
    batch = {"input_ids": jax.random.randint(jax.random.PRNGKey(3), (1, 1, T), 0, CFG.vocab_size)}
    dots = _dot_flops(jax.jit(step).lower(state, frozen, batch).compile().as_text())
    b = flops.executed_flops_per_token(
        cfg,
        seq_len=T,
        lambda_logit=lambda_logit,
        remat=remat,
        lora_rank=lora_rank,
        lora_merged=lora.merged,
        relation_causal_halving=False,
        relation_bwd_recompute_matmuls=0,
    )
    assert dots == pytest.approx((b["model_total"] + b["relation_total"] + b["remat_recompute"]) * T, rel=1e-9)


def test_attention_residuals_policy_counts_no_cudnn_rerun():
    """remat "dots_no_batch_attention" keeps cuDNN's residuals (attention.with_named_residuals):
    no attention forward rerun for cuDNN or dense XLA; blockwise still reruns it."""
    kw = dict(seq_len=T, remat="dots_no_batch_attention")
    for impl, reruns in (("cudnn", False), ("xla", False), ("blockwise", True)):
        b = flops.executed_flops_per_token(CFG, attention_impl=impl, **kw)
        old = flops.executed_flops_per_token(CFG, attention_impl=impl, seq_len=T, remat="dots_no_batch")
        if reruns:
            assert b["remat_recompute"] == old["remat_recompute"] > 0
        else:
            assert b["remat_recompute"] == 0.0
    cudnn_old = flops.executed_flops_per_token(CFG, attention_impl="cudnn", seq_len=T, remat="dots_no_batch")
    assert cudnn_old["remat_recompute"] > 0  # the rerun the deviceless compile counts (31 per 7B step)
