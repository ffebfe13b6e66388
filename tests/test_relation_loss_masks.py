"""relation_loss under the batch masks lard_jax.data builds: the causal-only fast path for
per-document blocks (losses.one_document_from_start) equals the masked kernel, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from lard_jax import losses


def _layers(rng, b, t, n_layers=2, h=4, kv=2, d=8):
    def one():
        return {r: jnp.asarray(rng.normal(size=(b, t, h if r == "q" else kv, d)), jnp.float32) for r in "qkv"}

    return [one() for _ in range(n_layers)], [one() for _ in range(n_layers)]


def _old_relation_loss(student, teacher, mask, seg):
    """The masked kernel on every layer and relation (what relation_loss computed before the fast path)."""
    n_valid = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    parts = {}
    for r in "qkv":
        per = []
        for s, te in zip(student, teacher):
            kl = pallas_kernels.self_relation_kl(
                s[r], jax.lax.stop_gradient(te[r]), mask=mask, segment_ids=seg, causal=True, impl="xla"
            )
            per.append(kl.sum() / (n_valid * student[0]["q"].shape[2]))
        parts[r] = jnp.mean(jnp.stack(per))
    return sum(parts.values())


@pytest.mark.parametrize("kind", ["per_document", "packed", "left_padding"])
def test_relation_loss_equals_masked_kernel(kind):
    rng = np.random.default_rng(len(kind))
    b, t = 3, 37
    student, teacher = _layers(rng, b, t)
    lengths = np.array([t, 20, 9])
    if kind == "per_document":  # lard_jax.data's per_document blocks: ids 1/0 and the same mask
        mask = np.arange(t)[None] < lengths[:, None]
        seg = mask.astype(np.int32)
    elif kind == "packed":
        seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
        mask = np.ones((b, t), bool)
    else:
        mask = np.arange(t)[None] >= np.array([0, 5, 11])[:, None]
        seg = mask.astype(np.int32)
    mask, seg = jnp.asarray(mask), jnp.asarray(seg, jnp.int32)
    expect_fast = kind == "per_document"
    assert bool(losses.one_document_from_start(mask, seg, (b, t))) == expect_fast

    def new(st):
        return losses.relation_loss(st, teacher, mask=mask, segment_ids=seg, impl="xla")[0]

    def old(st):
        return _old_relation_loss(st, teacher, mask, seg)

    np.testing.assert_allclose(float(jax.jit(new)(student)), float(jax.jit(old)(student)), rtol=1e-5)
    g_new, g_old = jax.jit(jax.grad(new))(student), jax.jit(jax.grad(old))(student)
    for a, r in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-6, rtol=1e-4)
