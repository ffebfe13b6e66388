"""The authors' recipe, pinned: loss normalisation, schedule, optimizer, LoRA (with dropout), data BOS,
presets. Expected values are computed here by hand from the formulas in the authors' train.py and
data_loader.py (github.com/gracefulning/LinearARD, 23866f6), never by the code under test."""

import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lard_jax import losses, trainable, trainer
from lard_jax.data import BlockLoader, prepare_token_cache
from lard_jax.model import LlamaConfig, LlamaForCausalLM, LoraDense, init_params
from lard_jax.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- loss normalisation
def _row_kl_sum(s, t, mask):
    """float64 dense: sum over valid rows and heads of KL(softmax(t t^T/sqrt d) || softmax(s s^T/sqrt d))."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    b, n, h, d = s.shape
    total = 0.0
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                if not mask[bi, i]:
                    continue
                keys = [j for j in range(i + 1) if mask[bi, j]]
                ls = np.array([s[bi, i, hi] @ s[bi, j, hi] for j in keys]) / math.sqrt(d)
                lt = np.array([t[bi, i, hi] @ t[bi, j, hi] for j in keys]) / math.sqrt(d)
                ps = np.exp(ls - ls.max()) / np.exp(ls - ls.max()).sum()
                pt = np.exp(lt - lt.max()) / np.exp(lt - lt.max()).sum()
                total += float((pt * (np.log(pt) - np.log(ps))).sum())
    return total


@pytest.fixture(scope="module")
def gqa_case():
    """2 layers, batch 2, 6 tokens (the second row padded after 4), 4 query heads, 2 KV heads, d 3."""
    rng = np.random.default_rng(0)
    b, n, hq, hkv, d = 2, 6, 4, 2, 3
    heads = {"q": hq, "k": hkv, "v": hkv}
    layers = [
        [{r: rng.normal(size=(b, n, heads[r], d)).astype(np.float32) * 2 for r in heads} for _ in range(2)]
        for _ in range(2)
    ]
    mask = np.ones((b, n), bool)
    mask[1, 4:] = False
    return layers[0], layers[1], mask, hq


def test_relation_loss_divides_by_query_heads_as_the_authors(gqa_case):
    student, teacher, mask, hq = gqa_case
    n_valid = mask.sum()
    sums = {r: [_row_kl_sum(student[l][r], teacher[l][r], mask) for l in range(2)] for r in ("q", "k", "v")}
    # train.py: every layer's summed row KL of Q, K and V / (attention_mask.sum() * query heads); mean over layers.
    expected = sum(np.mean([x / (n_valid * hq) for x in sums[r]]) for r in sums)
    as_jax = lambda ls: [{r: jnp.asarray(v) for r, v in layer.items()} for layer in ls]
    got, parts = losses.relation_loss(as_jax(student), as_jax(teacher), mask=jnp.asarray(mask), impl="xla")
    np.testing.assert_allclose(float(got), expected, rtol=2e-5)
    np.testing.assert_allclose(float(parts["k"]), np.mean(sums["k"]) / (n_valid * hq), rtol=2e-5)

    # The alternatives must not pass the same check: per-KV-head normalisation and a raw sum.
    per_rel, _ = losses.relation_loss(
        as_jax(student), as_jax(teacher), mask=jnp.asarray(mask), impl="xla", normalize="per_relation_heads"
    )
    per_rel_expected = sum(np.mean([x / (n_valid * h) for x in sums[r]]) for r, h in (("q", hq), ("k", 2), ("v", 2)))
    np.testing.assert_allclose(float(per_rel), per_rel_expected, rtol=2e-5)
    raw = sum(np.mean(sums[r]) for r in sums)
    for wrong in (float(per_rel), raw):
        assert not np.isclose(wrong, expected, rtol=1e-2), (wrong, expected)
    with pytest.raises(ValueError, match="normalize"):
        losses.relation_loss(as_jax(student), as_jax(teacher), impl="xla", normalize="kv_heads")


# ----------------------------------------------------------------------------- schedule and optimizer
def test_schedule_is_the_authors_warmup_from_zero_then_cosine():
    sched = trainer.lr_schedule(2e-5, 4, 144, 0.9)
    # train.py: lr = base * step / warmup for step < warmup; then base * (m + (1-m) * 0.5 * (1 + cos(pi * p))),
    # p = (step - warmup) / (total - warmup).
    by_hand = {
        0: 0.0,
        1: 5e-6,
        2: 1e-5,
        3: 1.5e-5,
        4: 2e-5,
        5: 2e-5 * (0.9 + 0.1 * 0.5 * (1 + math.cos(math.pi / 140))),
        74: 2e-5 * 0.95,
        143: 2e-5 * (0.9 + 0.1 * 0.5 * (1 + math.cos(math.pi * 139 / 140))),
        144: 1.8e-5,
    }
    for step, value in by_hand.items():
        np.testing.assert_allclose(float(sched(step)), value, rtol=1e-6, atol=1e-12, err_msg=str(step))


def test_optimizer_matches_torch_adamw_defaults():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in params.items()} for _ in range(6)]
    opt, sched = trainer.make_optimizer(lr=1e-2, warmup_steps=4, total_steps=6, min_lr_ratio=0.9, clip=5.0)
    state, p = opt.init(params), jax.tree_util.tree_map(jnp.asarray, params)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = torch.optim.AdamW(list(tp.values()), lr=1e-2)  # the authors pass only lr
    for step, g in enumerate(grads):
        updates, state = opt.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), max_norm=5.0)
        for group in topt.param_groups:
            group["lr"] = float(sched(step))
        topt.step()
    for k in params:  # weight decay acts on the bias too, as torch applies it to every parameter given
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- LoRA
def _frozen_projection(rng, e_in=6, e_out=5):
    return {
        "self_attn": {
            "q_proj": {
                "kernel": jnp.asarray(rng.normal(size=(e_in, e_out)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(e_out,)), jnp.float32),
            }
        }
    }


def test_lora_init_is_peft_like():
    frozen = _frozen_projection(np.random.default_rng(2), e_in=64)
    lora = trainable.LoraSpec(rank=32, alpha=64.0, dropout=0.05)
    t = trainable.init_trainable(frozen, trainable.trainable_mask(frozen), lora, jax.random.PRNGKey(0))
    a, b = t["self_attn"]["q_proj"]["lora_a"], t["self_attn"]["q_proj"]["lora_b"]
    assert set(t["self_attn"]["q_proj"]) == {"lora_a", "lora_b"}  # bias "none": biases stay frozen
    assert a.shape == (64, 32) and b.shape == (32, 5) and not np.asarray(b).any()
    assert float(jnp.abs(a).max()) <= 1 / 8 and float(jnp.abs(a).max()) > 0.9 / 8  # U(-1/sqrt(in), 1/sqrt(in))
    assert a.dtype == b.dtype == jnp.float32


class _Probe(nn.Module):
    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


def test_lora_with_dropout_matches_dense_reference():
    rng = np.random.default_rng(3)
    frozen = _frozen_projection(rng)
    lora = trainable.LoraSpec(rank=4, alpha=8.0, dropout=0.25)
    t = trainable.init_trainable(frozen, trainable.trainable_mask(frozen), lora, jax.random.PRNGKey(1))
    t["self_attn"]["q_proj"]["lora_b"] = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    params = trainable.student_params(frozen, t, lora)["self_attn"]["q_proj"]
    x = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    key = jax.random.PRNGKey(7)
    layer = LoraDense(5, use_bias=True, lora_dropout=lora.dropout)
    y = layer.apply({"params": params}, x, rngs={"dropout": key})
    # The same mask: the key the layer draws (top-level scope, first draw) and keep-probability 1 - p.
    keep = np.asarray(jax.random.bernoulli(_Probe().apply({}, rngs={"dropout": key}), 1 - lora.dropout, x.shape))
    assert 0 < keep.mean() < 1
    x64, w, bias = (
        np.asarray(v, np.float64)
        for v in (x, frozen["self_attn"]["q_proj"]["kernel"], frozen["self_attn"]["q_proj"]["bias"])
    )
    a, b = (np.asarray(t["self_attn"]["q_proj"][k], np.float64) for k in ("lora_a", "lora_b"))
    # PEFT: base(x) + lora_B(lora_A(dropout(x))) * alpha / r, dropout = inverted (kept / (1 - p)).
    expected = x64 @ w + bias + ((keep * x64 / (1 - lora.dropout)) @ a @ b) * (lora.alpha / lora.rank)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    # Without a dropout rng (evaluation) the path is deterministic and equals the merged kernel.
    y_eval = layer.apply({"params": params}, x)
    merged = trainable.merge_student(frozen, t, lora)["self_attn"]["q_proj"]
    np.testing.assert_allclose(
        np.asarray(y_eval), np.asarray(nn.Dense(5).apply({"params": merged}, x)), rtol=1e-5, atol=1e-5
    )


def _tiny_model():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(4))
    params = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim == 2 else x, params)
    return model, params


def _lora_trainable(params, lora, seed=5):
    t = trainable.init_trainable(params, trainable.trainable_mask(params), lora, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map_with_path(  # a nonzero B, as after some training
        lambda path, x: (
            jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape) * 0.01
            if getattr(path[-1], "key", "") == "lora_b"
            else x
        ),
        t,
    )


def test_lora_dropout_zero_unmerged_equals_merged_model():
    model, params = _tiny_model()
    ids = jax.random.randint(jax.random.PRNGKey(6), (2, 12), 0, 64)
    with_dropout = trainable.LoraSpec(rank=4, alpha=8.0, dropout=0.1)
    t = _lora_trainable(params, with_dropout)
    student = LlamaForCausalLM(model.config.replace(lora_dropout=with_dropout.dropout))
    unmerged = trainable.student_params(params, t, with_dropout)
    assert "lora_a" in unmerged["model"]["layers_0"]["self_attn"]["q_proj"]
    merged = trainable.merge_student(params, t, trainable.LoraSpec(rank=4, alpha=8.0))
    assert "lora_a" not in merged["model"]["layers_0"]["self_attn"]["q_proj"]
    ref = model.apply({"params": merged}, ids)
    # No dropout rng: deterministic, the same function as the merged weights.
    np.testing.assert_allclose(
        np.asarray(student.apply({"params": unmerged}, ids)), np.asarray(ref), rtol=1e-4, atol=1e-4
    )
    # With a dropout rng the LoRA path is perturbed; the same rng gives the same logits.
    drop1 = student.apply({"params": unmerged}, ids, rngs={"dropout": jax.random.PRNGKey(0)})
    drop2 = student.apply({"params": unmerged}, ids, rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(np.asarray(drop1), np.asarray(ref), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(drop1), np.asarray(drop2))
    # Dropout 0 trains through the merged form, the same tree as merge_student.
    no_drop = trainable.LoraSpec(rank=4, alpha=8.0)
    for a, b in zip(
        jax.tree_util.tree_leaves(trainable.student_params(params, t, no_drop)), jax.tree_util.tree_leaves(merged)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_step_with_lora_dropout_uses_the_step_rng_and_trains():
    model, params = _tiny_model()
    student = LlamaForCausalLM(model.config.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    lora = trainable.LoraSpec(rank=8, alpha=16.0, dropout=0.05)
    t = trainable.init_trainable(params, trainable.trainable_mask(params), lora, jax.random.PRNGKey(0))
    opt, sched = trainer.make_optimizer(lr=1e-2, warmup_steps=1, total_steps=8)
    step = jax.jit(trainer.make_train_step(model, student, trainer.LossSpec(kernel_impl="xla"), lora, opt, sched))
    ids = jax.random.randint(jax.random.PRNGKey(8), (1, 2, 12), 0, 64)
    batch = {"input_ids": ids, "mask": jnp.ones(ids.shape, bool)}

    def run(seed, steps):
        state = trainer.TrainState(jnp.zeros((), jnp.int32), t, opt.init(t), jax.random.PRNGKey(seed))
        history = []
        for _ in range(steps):
            state, m = step(state, params, batch)
            history.append(float(m["loss"]))
        return state, history

    state, history = run(0, 8)
    assert history[0] > 1e-4  # B = 0: the student starts as the scaled, unrestored model
    assert history[-1] < 0.8 * history[0], history
    assert {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(state.trainable)} == {"lora_a", "lora_b"}
    _, other = run(1, 4)
    assert history[0] == other[0]  # B = 0 at step 0: dropout on the LoRA input changes nothing yet
    assert history[2:4] != other[2:4]  # another rng drew other dropout masks, so other gradients


# ----------------------------------------------------------------------------- data
@pytest.fixture
def small_cache(tmp_path):
    rng = np.random.default_rng(9)
    (tmp_path / "src").mkdir()
    for i, n in enumerate((40, 15, 7, 33)):
        (tmp_path / "src" / f"d{i}.txt").write_text("".join(rng.choice(list("abcdefgh"), n)))
    return prepare_token_cache(tmp_path / "src", ByteTokenizer(), tmp_path / "cache", progress=False)


def test_bos_once_per_document_then_blocks(small_cache):
    tok = ByteTokenizer()
    loader = BlockLoader(small_cache, seq_len=8, batch_size=1, bos="document")
    expected = []  # data_loader.py: tokenise the book once (bos first), keep only whole blocks
    for d in range(small_cache.num_documents):
        framed = np.concatenate([[tok.bos_id], small_cache.document(d)])
        expected += [framed[i : i + 8] for i in range(0, len(framed) // 8 * 8, 8)]
    assert loader.num_blocks == len(expected) == 5 + 2 + 1 + 4
    blocks = [loader.block(i) for i in range(loader.num_blocks)]
    for (ids, mask, _), want in zip(blocks, expected):
        assert mask.all()
        np.testing.assert_array_equal(ids, want)
    assert sum(int(b[0][0] == tok.bos_id) for b in blocks) == small_cache.num_documents
    # The per-block option is kept: every block [bos] + 7 document tokens.
    every = BlockLoader(small_cache, seq_len=8, batch_size=1, bos="every_block")
    assert all(every.block(i)[0][0] == tok.bos_id for i in range(every.num_blocks))
    assert every.num_blocks == 5 + 2 + 1 + 4
    np.testing.assert_array_equal(every.block(1)[0][1:], small_cache.document(0)[7:14])
    with pytest.raises(ValueError, match="bos must be"):
        BlockLoader(small_cache, seq_len=8, batch_size=1, bos="first")


# ----------------------------------------------------------------------------- presets
def _load(rel):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize(
    "rel,factor",
    [
        ("configs/paper/llama2_7b_pi32k.py", 8.0),
        ("configs/paper/llama3_8b_linear4x.py", 4.0),
        ("configs/paper/mistral_7b.py", 4.0),
        ("configs/llama2_7b_pi32k.py", 8.0),
    ],
)
def test_paper_presets_are_the_authors_scripts(rel, factor):
    c = _load(rel)
    assert dict(c.student.rope_scaling) == {"rope_type": "linear", "factor": factor}
    t = c.train
    assert (c.data.seq_len, t.steps, t.batch_size, t.grad_accum) == (4096, 144, 2, 2)
    assert t.steps * t.batch_size * t.grad_accum * c.data.seq_len == 2_359_296
    assert (t.lora_rank, t.lora_alpha, t.lora_dropout, t.trainable) == (1024, 2048.0, 0.05, "qkv")
    assert (t.lr, t.warmup_steps, t.min_lr_ratio, t.clip) == (2e-5, 4, 0.9, 5.0)
    assert (t.b1, t.b2, t.eps, t.weight_decay) == (0.9, 0.999, 1e-8, 0.01)
    assert (c.loss.normalize, c.loss.lambda_logit, c.data.bos, c.loss.layers) == ("query_heads", 0.0, "document", ())


def test_base_defaults_follow_the_authors_and_fullproj_is_explicit():
    base = _load("configs/base.py")
    assert (base.train.lora_rank, base.train.lora_dropout, base.train.b2, base.loss.normalize, base.data.bos) == (
        1024,
        0.05,
        0.999,
        "query_heads",
        "document",
    )
    assert _load("configs/paper/llama2_7b_pi32k_fullproj.py").train.lora_rank == 0


def test_longred_is_renamed():
    with pytest.raises(ValueError, match="renamed to 'longred_simplified'"):
        trainer.LossSpec(method="longred")
    assert trainer.LossSpec(method="longred_simplified").method == "longred_simplified"
