"""Method `lm` (pretraining: next-token cross entropy of the model alone), the projection set "all",
the trainer's mesh helpers (init_trainable_sharded / init_state / jit_train_step), and the passkey
windows the tiny teacher trains on (lard_jax.evaluation.synthetic.make_passkey_window)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lard_jax import flops, methods, trainer
from lard_jax import sharding as sharding_lib
from lard_jax.evaluation import synthetic
from lard_jax.model import LlamaConfig, init_params
from lard_jax.tokenizer import ByteTokenizer

CFG = LlamaConfig(
    vocab_size=259,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
T = 16
LM = trainer.LossSpec(method="lm")
NO_LORA = trainer.LoraSpec()


def _random_model(seed):
    """A tiny random model with weights 4x the init's, so the logits are far from uniform."""
    model, params = init_params(CFG, jax.random.PRNGKey(seed))
    return model, jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim == 2 else x, params)


def _split_all(params):
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS["all"])
    return trainer.frozen_part(params, mask, NO_LORA), trainer.init_trainable(
        params, mask, NO_LORA, jax.random.PRNGKey(0)
    )


def _hand_cross_entropy(logits, targets, weights):
    """float32 mean of -log softmax(logits)[target] over the positions where weights is True."""
    logits = np.asarray(logits, np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return np.float32((nll * weights).sum() / weights.sum())


def test_lm_is_registered_without_teacher_and_has_no_options():
    assert "lm" in trainer.METHODS and methods.get("lm").teacher_forward is False
    with pytest.raises(ValueError, match="has no option"):
        trainer.LossSpec(method="lm", temperature=2.0)


def test_lm_loss_equals_hand_written_cross_entropy():
    model, params = _random_model(seed=21)
    frozen, trainable = _split_all(params)
    assert frozen == {}  # "all": nothing is read from the frozen tree
    loss_fn = jax.jit(trainer.make_loss_fn(model, model, LM, NO_LORA))
    rng = np.random.default_rng(22)
    ids = rng.integers(3, CFG.vocab_size, (3, T + 1)).astype(np.int32)
    key = jax.random.PRNGKey(23)

    # input_ids only: token i + 1 predicted from position i
    logits = model.apply({"params": params}, ids[:, :-1])
    loss, metrics = loss_fn(trainable, frozen, {"input_ids": jnp.asarray(ids[:, :-1])}, key)
    expected = _hand_cross_entropy(logits[:, :-1], ids[:, 1:-1], np.ones((3, T - 1)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["lm"]) == float(loss)

    # with a padding mask: a position counts when it and the next token are real
    mask = rng.random((3, T)) > 0.25
    loss, _ = loss_fn(trainable, frozen, {"input_ids": jnp.asarray(ids[:, :-1]), "mask": jnp.asarray(mask)}, key)
    logits_masked = model.apply({"params": params}, ids[:, :-1], attention_mask=jnp.asarray(mask))
    expected = _hand_cross_entropy(logits_masked[:, :-1], ids[:, 1:-1], mask[:, :-1] & mask[:, 1:])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

    # explicit targets (a window of T + 1 tokens trained at T positions); targets < 0 are ignored
    targets = ids[:, 1:].copy()
    ignored = rng.random((3, T)) < 0.2
    targets[ignored] = -1
    batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(targets)}
    loss, _ = loss_fn(trainable, frozen, batch, key)
    expected = _hand_cross_entropy(logits, np.maximum(targets, 0), ~ignored)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_projection_set_all_splits_and_merges():
    _, params = _random_model(seed=31)
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS["all"])
    assert all(jax.tree_util.tree_leaves(mask))
    frozen, trainable = _split_all(params)
    merged = trainer.student_params(frozen, trainable, NO_LORA)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # with LoRA the factors adapt frozen kernels: the frozen tree stays whole
    lora = trainer.LoraSpec(rank=2)
    assert trainer.frozen_part(params, mask, lora) is params
    with pytest.raises(TypeError, match="sequence of names"):
        trainer.trainable_mask(params, "qkv")


def test_flops_rejects_lm_and_all_cleanly():
    with pytest.raises(ValueError, match="not in the FLOP model"):
        flops.executed_flops_per_token(CFG, seq_len=T, method="lm")
    with pytest.raises(ValueError, match="not in the FLOP model"):
        flops.executed_flops_per_token(CFG, seq_len=T, method="cpt", trainable=trainer.PROJECTION_SETS["all"])


def _train(mesh, model, params, batch, steps):
    """`steps` library steps (method lm, projection set "all") on `mesh`: (trainable before, state
    after, losses). There is no teacher: the model is passed as both."""
    model_params = jax.device_put(params, sharding_lib.param_shardings(params, mesh))
    mask = trainer.trainable_mask(model_params, trainer.PROJECTION_SETS["all"])
    frozen = trainer.frozen_part(model_params, mask, NO_LORA)
    trainable = trainer.init_trainable_sharded(model_params, mask, NO_LORA, jax.random.PRNGKey(0), mesh)
    optimizer, schedule = trainer.make_optimizer(lr=1e-2, warmup_steps=0, total_steps=steps, weight_decay=0.0)
    state = trainer.init_state(trainable, optimizer, jax.random.PRNGKey(1), mesh)
    before = jax.tree_util.tree_map(np.asarray, state.trainable)
    shardings = trainer.state_shardings(state)
    step = trainer.jit_train_step(model, model, LM, NO_LORA, optimizer, schedule, state)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    batch = jax.device_put(batch, rows)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert trainer.state_shardings(state) == shardings  # the step keeps the state where init_state put it
    return before, state, losses


def test_all_trains_every_parameter_and_mesh_equals_one_device():
    model, params = _random_model(seed=41)
    rng = np.random.default_rng(42)
    ids = rng.integers(3, CFG.vocab_size, (1, 8, T)).astype(np.int32)
    batch = {"input_ids": ids}
    one = sharding_lib.make_mesh(devices=jax.devices()[:1])
    before, state, losses = _train(one, model, params, batch, steps=3)
    assert losses[-1] < losses[0], losses
    after = jax.tree_util.tree_map(np.asarray, state.trainable)
    unchanged = [
        jax.tree_util.keystr(path)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves(after))
        if np.array_equal(a, b)
    ]
    assert not unchanged, unchanged
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(params)

    many = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    _, state_many, losses_many = _train(many, model, params, batch, steps=3)
    np.testing.assert_allclose(losses_many, losses, rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(state_many.trainable), jax.tree_util.tree_leaves(after)):
        # Adam divides by sqrt(v): rounding of tiny gradients moves an element by up to ~2e-5 (steps ~1e-2)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("length", [104, 129, 300, 1024])
def test_passkey_window_has_the_exact_length_and_the_answer_at_the_end(length):
    tok = ByteTokenizer()
    rng = np.random.default_rng(length)
    depths = []
    for _ in range(20):
        example = synthetic.make_passkey_window(rng, tok, length)
        ids, key = example["prompt_ids"], example["answers"][0]
        assert len(ids) == example["length"] == length and ids[0] == tok.bos_id
        assert tok.decode(ids).endswith(f"What is the pass key? The pass key is {key}.")
        positions = example["answer_positions"]
        assert positions == list(range(length - 6, length - 1))
        assert tok.decode([ids[p] for p in positions]) == key and tok.decode(ids[-1:]) == "."
        assert tok.decode(ids).count(f"The pass key is {key}. Remember it. {key} is the pass key.") == 1
        depths.append(example["depth"])
    if length > 200:
        assert min(depths) < 0.3 and max(depths) > 0.7  # the needle's depth is spread over the prompt


def test_passkey_windows_batch_and_errors():
    tok = ByteTokenizer()
    ids, answers = synthetic.passkey_windows(7, 5, 160, tok)
    assert ids.shape == (5, 160) and ids.dtype == np.int32 and answers.shape == (5, 5)
    again, _ = synthetic.passkey_windows(7, 5, 160, tok)
    np.testing.assert_array_equal(ids, again)  # one seed, one batch
    with pytest.raises(ValueError, match="too short"):
        synthetic.make_passkey_window(np.random.default_rng(0), tok, 103)

    class WordTokenizer:  # several characters per token: the window cannot be cut to the token
        def encode(self, text, add_bos=True):
            return [1] * add_bos + [3 + len(w) for w in text.split(" ")]

    with pytest.raises(ValueError, match="one token per ASCII character"):
        synthetic.make_passkey_window(np.random.default_rng(0), WordTokenizer(), 200)
