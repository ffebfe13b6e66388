"""Shared helpers of the relation_kl kernel tests (tests/test_relation_kl*.py).

Not a test module: the float64 dense reference, error measure, input builders,
the case options, the f32 contract check, lowering for "cuda" (`cuda_text`), and the `rng` fixture (defined as
`rng_fixture`; a test module that imports `rng_fixture` gets the fixture "rng").
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import relation_kl


@pytest.fixture(name="rng")
def rng_fixture(request):
    """Fresh inputs per test, reproducible: seeded by the test's own name."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


# ---------------------------------------------------------------- reference ---


def reference64(sl, sr, tl, tr, w, *, mask=None, segment_ids=None, causal=True, scale=None):
    """Dense float64 KL rows and d(sum(w * kl))/d(sl, sr), straight from the
    definition (log-softmax rows, autodiff), independent of the kernels."""
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
        sl, sr, tl, tr, w = map(f64, (sl, sr, tl, tr, w))
        B, T, H, D = sl.shape
        G = H // sr.shape[2]
        scale = D**-0.5 if scale is None else scale
        valid = np.ones((B, 1, T, T), bool)
        if causal:
            valid &= np.tril(np.ones((T, T), bool))
        if mask is not None:
            valid &= np.asarray(mask)[:, None, None, :]
        if segment_ids is not None:
            s = np.asarray(segment_ids)
            valid &= s[:, None, :, None] == s[:, None, None, :]
        row_ok = valid.any(-1)
        if mask is not None:
            row_ok &= np.asarray(mask)[:, None, :]

        def log_p(left, right):
            right = jnp.repeat(right, G, axis=2)
            z = scale * jnp.einsum("bihd,bjhd->bhij", left, right)
            z = jnp.where(valid, z, -1e300)
            return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)

        def kl_rows(sl, sr):
            lt, ls = log_p(tl, tr), log_p(sl, sr)
            kl = jnp.where(valid, jnp.exp(lt) * (lt - ls), 0.0).sum(-1)
            return jnp.where(row_ok, kl, 0.0)

        # One compiled function (eager op-by-op dispatch is slower on CPU).
        loss = lambda a, b: (jnp.sum(w * kl_rows(a, b)), kl_rows(a, b))
        (_, kl), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(sl, sr)
        return np.asarray(kl), tuple(np.asarray(g) for g in grads)


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


# ------------------------------------------------------------------- inputs ---


def make_inputs(rng, B, T, H, Hr, D, dtype=jnp.float32, std=1.0):
    def draw(h):
        return jnp.asarray(std * rng.standard_normal((B, T, h, D)), jnp.float32).astype(dtype)

    sl, sr, tl, tr = draw(H), draw(Hr), draw(H), draw(Hr)
    w = jnp.asarray(rng.standard_normal((B, H, T)), jnp.float32)
    return sl, sr, tl, tr, w


def packed_segments(rng, B, T):
    cuts = np.sort(rng.choice(np.arange(1, T), size=(B, 2), replace=True), axis=1)
    pos = np.arange(T)[None]
    return jnp.asarray((pos >= cuts[:, :1]).astype(np.int32) + (pos >= cuts[:, 1:]).astype(np.int32) * 5)


def case_kwargs(rng, B, T, opts):
    """relation_kl keyword arguments of a CASES entry: causal/scale, padding mask, segments."""
    kw = {"causal": opts.get("causal", True), "scale": opts.get("scale")}
    if opts.get("mask"):
        lengths = rng.integers(1, T, size=B)
        lengths[0] = T
        if B > 2:
            lengths[-1] = 0  # a fully padded sequence
        kw["mask"] = jnp.asarray(np.arange(T)[None] < lengths[:, None])
    if opts.get("segments"):
        kw["segment_ids"] = packed_segments(rng, B, T)
    return kw


# ------------------------------------------------------------------- checks ---


def kl_and_grads(sl, sr, tl, tr, w, **kw):
    """KL rows and d(sum(w * kl))/d(sl, sr) of relation_kl(**kw), traced and
    compiled once."""

    def loss(a, b):
        kl = relation_kl(a, b, tl, tr, **kw)
        return jnp.sum(w * kl), kl

    (_, kl), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(sl, sr)
    return kl, grads


def assert_matches_reference(kl, grads, ref, ref_grads, kw):
    """f32 tolerances of the contract; padded rows exactly zero, padded keys no gradient."""
    (d_sl, d_sr), (r_sl, r_sr) = grads, ref_grads
    assert kl.dtype == jnp.float32
    assert rel_err(kl, ref) <= 1e-5
    assert rel_err(d_sl, r_sl) <= 1e-4
    assert rel_err(d_sr, r_sr) <= 1e-4
    if "mask" in kw:
        pad = ~np.asarray(kw["mask"])
        assert np.all(np.asarray(kl)[np.broadcast_to(pad[:, None], kl.shape)] == 0)
        assert np.all(np.asarray(d_sr)[pad] == 0)
        assert np.all(np.asarray(d_sl)[pad] == 0)


def cuda_text(fn, *args):
    """The text of fn (jitted here) lowered for "cuda" on this machine: the Mosaic GPU kernels
    lower without a GPU (their values are checked on one)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def pallas_call_costs(fn, *args):
    """{kernel name: CostEstimate} of every pallas_call in fn's jaxpr (nested
    jaxprs included, kernel bodies not)."""
    found = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                meta = eqn.params.get("name_and_src_info")
                name = getattr(meta, "name", None) or eqn.params.get("name")
                found[name] = eqn.params["cost_estimate"]
                continue
            for v in eqn.params.values():
                for sub in v if isinstance(v, (list, tuple)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found
