"""pallas_kernels.relation_kl against an independent float64 dense reference.

The Pallas kernels run in interpret mode on CPU (impl="pallas_gpu",
interpret=True); "xla" is the linear-memory JAX version. Shapes and blocks are
small (non-square blocks, T not a multiple of them) so the interpreter is quick.
Tolerances: f32 forward 1e-5 and gradients 1e-4 in relative norm (f32 rounding
over at most a few hundred terms); bf16 1e-2 (8-bit mantissa inputs, dS cast to
bf16 before the gradient matmuls).
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import BlockSizes, relation_kl, self_relation_kl

# Mixed tile shapes; T is padded to 32 inside the wrapper.
SMALL_BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                          block_q_dk=32, block_k_dk=16)
IMPLS = ["xla", "pallas_gpu"]


@pytest.fixture
def rng(request):
  """Fresh inputs per test, reproducible: seeded by the test's own name."""
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _kw(impl):
  return dict(impl=impl, interpret=True, block_sizes=SMALL_BLOCKS)


# ---------------------------------------------------------------- reference ---

def reference64(sl, sr, tl, tr, w, *, mask=None, segment_ids=None, causal=True,
                scale=None):
  """Dense float64 KL rows and d(sum(w * kl))/d(sl, sr), straight from the
  definition (log-softmax rows, autodiff), independent of the kernels."""
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    sl, sr, tl, tr, w = map(f64, (sl, sr, tl, tr, w))
    B, T, H, D = sl.shape
    G = H // sr.shape[2]
    scale = D ** -0.5 if scale is None else scale
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


def make_inputs(rng, B, T, H, Hr, D, dtype=jnp.float32, std=1.0):
  def draw(h):
    return jnp.asarray(std * rng.standard_normal((B, T, h, D)), jnp.float32).astype(dtype)
  sl, sr, tl, tr = draw(H), draw(Hr), draw(H), draw(Hr)
  w = jnp.asarray(rng.standard_normal((B, H, T)), jnp.float32)
  return sl, sr, tl, tr, w


def kl_and_grads(impl, sl, sr, tl, tr, w, **kw):
  """KL rows and d(sum(w * kl))/d(sl, sr), traced and compiled once."""
  def loss(a, b):
    kl = relation_kl(a, b, tl, tr, **_kw(impl), **kw)
    return jnp.sum(w * kl), kl
  (_, kl), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(sl, sr)
  return kl, grads


def packed_segments(rng, B, T):
  cuts = np.sort(rng.choice(np.arange(1, T), size=(B, 2), replace=True), axis=1)
  pos = np.arange(T)[None]
  return jnp.asarray((pos >= cuts[:, :1]).astype(np.int32)
                     + (pos >= cuts[:, 1:]).astype(np.int32) * 5)


# -------------------------------------------------------------- correctness ---

CASES = {
    # name: (B, T, H, Hr, D, options)
    "odd_T": (2, 37, 2, 2, 16, {}),
    "gqa2_T100": (1, 100, 4, 2, 32, {}),
    "gqa1_noncausal": (2, 48, 4, 1, 64, {"causal": False}),
    "padding_mask_D80": (3, 37, 2, 2, 80, {"mask": True}),
    "segments_and_mask": (2, 100, 2, 1, 32, {"mask": True, "segments": True}),
    "noncausal_segments": (1, 64, 2, 2, 16, {"causal": False, "segments": True,
                                             "scale": 0.3}),
}


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(rng, impl, case):
  B, T, H, Hr, D, opts = CASES[case]
  sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D)
  kw = case_kwargs(rng, B, T, opts)
  kl, (d_sl, d_sr) = kl_and_grads(impl, sl, sr, tl, tr, w, **kw)
  ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w, **kw)
  assert kl.shape == (B, H, T)
  assert_matches_reference(kl, (d_sl, d_sr), ref, (r_sl, r_sr), kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_self_relation_sums_both_gradients(rng, impl):
  B, T, H, D = 1, 130, 2, 64
  x, _, t, _, w = make_inputs(rng, B, T, H, H, D)
  def loss(s):
    kl = self_relation_kl(s, t, **_kw(impl))
    return jnp.sum(w * kl), kl
  (_, kl), d_x = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  ref, (r_l, r_r) = reference64(x, x, t, t, w)
  assert rel_err(kl, ref) <= 1e-5
  assert rel_err(d_x, r_l + r_r) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(rng, impl):
  B, T, H, Hr, D = 1, 100, 4, 2, 64
  sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D, dtype=jnp.bfloat16)
  kl, (d_sl, d_sr) = kl_and_grads(impl, sl, sr, tl, tr, w)
  ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w)
  assert d_sl.dtype == jnp.bfloat16 and d_sr.dtype == jnp.bfloat16
  assert rel_err(kl, ref) <= 1e-2
  assert rel_err(d_sl, r_sl) <= 1e-2
  assert rel_err(d_sr, r_sr) <= 1e-2


def test_jit_and_vmap(rng):
  """vmap over an outer axis (e.g. layers), the whole loss and gradient jitted."""
  L, B, T, H, D = 2, 1, 40, 2, 16
  sl, sr, tl, tr, w = make_inputs(rng, L * B, T, H, H, D)
  split = lambda x: x.reshape((L, B) + x.shape[1:])
  sl, sr, tl, tr, w = map(split, (sl, sr, tl, tr, w))

  @jax.jit
  def loss_and_grad(sl, sr):
    def loss(sl, sr):
      kl = jax.vmap(lambda a, b, c, d: relation_kl(a, b, c, d, **_kw("pallas_gpu")))(
          sl, sr, tl, tr)
      return jnp.sum(w * kl), kl
    return jax.value_and_grad(loss, (0, 1), has_aux=True)(sl, sr)

  (_, kl), (d_sl, d_sr) = loss_and_grad(sl, sr)
  for l in range(L):
    ref, (r_sl, r_sr) = reference64(sl[l], sr[l], tl[l], tr[l], w[l])
    assert rel_err(kl[l], ref) <= 1e-5
    assert rel_err(d_sl[l], r_sl) <= 1e-4
    assert rel_err(d_sr[l], r_sr) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_do_not_overflow(rng, impl):
  # scale * |x|^2 ~ 1e4: exp would overflow without the running max.
  B, T, H, D = 1, 48, 2, 64
  sl, sr, tl, tr, w = make_inputs(rng, B, T, H, H, D, std=35.0)
  kl, (d_sl, d_sr) = kl_and_grads(impl, sl, sr, tl, tr, w)
  ref, (r_sl, r_sr) = reference64(sl, sr, tl, tr, w)
  assert np.abs(np.asarray(ref)).max() > 1e3
  # f32 logits of size 1e4 carry ~1e-3 absolute rounding, which p = exp(u - lse)
  # turns into ~1e-3 relative error of the probabilities: the gradients are as
  # good as f32 logits allow, not 1e-4.
  assert rel_err(kl, ref) <= 1e-4
  assert rel_err(d_sl, r_sl) <= 3e-3
  assert rel_err(d_sr, r_sr) <= 3e-3


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_teacher_gets_no_gradient(rng, impl):
  sl, sr, tl, tr, _ = make_inputs(rng, 1, 20, 2, 2, 16)
  kw = _kw(impl) if impl != "reference" else {"impl": impl}
  d_tl, d_tr = jax.jit(jax.grad(lambda c, d: relation_kl(sl, sr, c, d, **kw).sum(),
                               (0, 1)))(tl, tr)
  assert not np.any(np.asarray(d_tl)) and not np.any(np.asarray(d_tr))


def test_reference_impl_and_export(rng):
  B, T, H, Hr, D = 2, 30, 4, 2, 16
  sl, sr, tl, tr, w = make_inputs(rng, B, T, H, Hr, D)
  mask = jnp.asarray(np.arange(T)[None] < np.array([[30], [11]]))
  ref, (r_sl, _) = reference64(sl, sr, tl, tr, w, mask=mask)
  out = jax.jit(pallas_kernels.relation_kl_reference)(sl, sr, tl, tr, mask=mask)
  assert rel_err(out, ref) <= 1e-5
  loss = lambda a: jnp.sum(w * relation_kl(a, sr, tl, tr, mask=mask, impl="reference"))
  d_sl = jax.jit(jax.grad(loss))(sl)
  assert rel_err(d_sl, r_sl) <= 1e-4


def test_auto_is_xla_on_cpu(rng, monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU dispatch")
  from pallas_kernels import gpu
  monkeypatch.setattr(gpu, "forward", lambda *a, **k: pytest.fail("used pallas"))
  sl, sr, tl, tr, w = make_inputs(rng, 1, 20, 2, 2, 16)
  ref, _ = reference64(sl, sr, tl, tr, w)
  assert rel_err(relation_kl(sl, sr, tl, tr), ref) <= 1e-5


# --------------------------------------------------------------- validation ---

def _bad_calls():
  f32 = lambda *s: jnp.ones(s, jnp.float32)
  x, r = f32(2, 8, 4, 16), f32(2, 8, 2, 16)
  ok = dict(s_left=x, s_right=r, t_left=x, t_right=r)
  return [
      ("s_left", dict(ok, s_left=f32(8, 4, 16))),
      ("s_right", dict(ok, s_right=f32(2, 8, 3, 16))),            # 4 % 3 != 0
      ("s_right", dict(ok, s_right=f32(2, 9, 2, 16))),            # T mismatch
      ("t_left", dict(ok, t_left=f32(2, 9, 4, 16))),              # teacher T
      ("t_right", dict(ok, t_right=r.astype(jnp.bfloat16))),      # teacher dtype
      ("t_left", dict(ok, t_left=f32(2, 8, 4, 32))),              # teacher D
      ("s_left", dict(ok, s_left=x.astype(jnp.int32))),           # dtype
      ("mask", dict(ok, mask=jnp.ones((2, 7), bool))),
      ("mask", dict(ok, mask=jnp.ones((2, 8), jnp.int32))),
      ("segment_ids", dict(ok, segment_ids=jnp.ones((2, 8), jnp.float32))),
      ("segment_ids", dict(ok, segment_ids=jnp.ones((8,), jnp.int32))),
      ("impl", dict(ok, impl="cuda")),
      ("scale", dict(ok, scale=-1.0)),
  ]


@pytest.mark.parametrize("arg,call", _bad_calls(),
                         ids=[f"{a}{i}" for i, (a, _) in enumerate(_bad_calls())])
def test_bad_input_raises_before_tracing(arg, call, monkeypatch):
  from pallas_kernels import gpu, xla
  for mod in (gpu, xla):
    for fn in ("forward", "backward"):
      monkeypatch.setattr(mod, fn, lambda *a, **k: pytest.fail("kernel traced"))
  kw = dict(call)
  args = [kw.pop(k) for k in ("s_left", "s_right", "t_left", "t_right")]
  kw.setdefault("impl", "pallas_gpu")
  with pytest.raises(ValueError, match=arg):
    relation_kl(*args, interpret=True, **kw)
