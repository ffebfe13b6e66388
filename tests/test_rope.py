"""lard_jax.rope against transformers' own RoPE (ROPE_INIT_FUNCTIONS, LlamaRotaryEmbedding, apply_rotary_pos_emb).

Tolerances. inv_freq / attention scaling: 1e-6 relative (we compute in float64, transformers in float32, so entries
differ by a few float32 ulps). The one exception is llama3's blend band, where transformers' float32 result is
ill-conditioned; see `_llama3_rtol`. cos/sin: 1e-5 absolute for positions below T_LONG (< 48); a relative difference
e in inv_freq moves the float32 angle pos * inv_freq by pos * inv_freq * e, so at long positions the error is bounded
by a few ulps of the angle instead (test_cos_sin_long_positions_within_float32_angle_resolution).
"""

import copy
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from lard_jax.rope import (  # noqa: E402
    ROPE_TYPES,
    RopeConfigError,
    apply_rope,
    describe_rope,
    normalize_rope_scaling,
    rope_cos_sin,
    rope_frequencies,
    rope_scaling_from_hf_config,
)

# Fixed sequence lengths keep JAX's per-shape compilation cache warm across cases; the thresholds they are compared
# against (max_position_embeddings / original_max_position_embeddings) are drawn in between.
T_SHORT, T_LONG = 16, 45
LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    # Random configs trip transformers' advisory warnings (e.g. yarn factor != max/original); keep the log readable.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


# ------------------------------------------------------------------------------------------------ reference helpers


def _hf_config(rope_scaling, *, head_dim, rope_theta, max_position_embeddings, **extra):
    params = copy.deepcopy(rope_scaling) if rope_scaling else {"rope_type": "default"}
    params["rope_theta"] = rope_theta
    return LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=16,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=params,
        **extra,
    )


def _hf_init(cfg, seq_len):
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS; Llama's own static method
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, device=None, seq_len=seq_len)
    return inv_freq.numpy(), float(scaling)


def _hf_cos_sin(cfg, positions: np.ndarray):
    module = LlamaRotaryEmbedding(cfg)  # fresh: dynamic/longrope state starts from the config
    cos, sin = module(torch.ones(1, dtype=torch.float32), torch.from_numpy(positions))
    return cos.numpy(), sin.numpy()


def _llama3_rtol(case) -> np.ndarray:
    """Per-channel relative tolerance for llama3 inv_freq against transformers' float32 computation.

    In the band between the two wavelengths, out = inv * g(s) with g(s) = 1/factor + s (1 - 1/factor) and
    s = (original_max / wavelen - low) / (high - low). Near the low-frequency edge (s -> 0) with a large factor,
    kappa = |d log(out) / d log(wavelen)| = 1 + (1 - 1/factor) (original_max / wavelen) / ((high - low) g) reaches
    ~40, so transformers' own 1-2 ulp float32 wavelength error becomes ~5e-6 in its result. Allow 2 ulps (2.4e-7)
    times kappa there; 1e-6 everywhere else. (Llama 3.1's own values have kappa < 4.)
    """
    rope = case["rope"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original_max = rope["original_max_position_embeddings"]
    exps = np.arange(0, case["head_dim"], 2) / case["head_dim"]
    wavelen = 2 * np.pi * case["theta"] ** exps
    s = (original_max / wavelen - low) / (high - low)
    g = 1 / factor + s * (1 - 1 / factor)
    kappa = 1 + (1 - 1 / factor) * (original_max / wavelen) / ((high - low) * g)
    in_band = (wavelen >= original_max / high) & (wavelen <= original_max / low)
    return np.where(in_band, np.maximum(1e-6, 2.4e-7 * kappa), 1e-6)


def _ours(case, seq_len):
    return rope_frequencies(
        case["rope"],
        head_dim=case["head_dim"],
        rope_theta=case["theta"],
        max_position_embeddings=case["max_pos"],
        seq_len=seq_len,
    )


def _cfg(case):
    return _hf_config(
        case["rope"], head_dim=case["head_dim"], rope_theta=case["theta"], max_position_embeddings=case["max_pos"]
    )


# ------------------------------------------------------------------------------------------------ random cases


def _random_case(rope_type, rng, variant, *, small=False):
    """One random config of `rope_type`. `variant` (an int) cycles through optional-field combinations.

    small=True puts the length threshold (max_position_embeddings for 'dynamic', original_max_position_embeddings for
    the others) strictly between T_SHORT and T_LONG, so cos/sin can be compared on both sides of it.
    """
    head_dim = int(rng.choice([64, 128])) if variant < 2 else int(rng.choice([32, 64, 96, 128]))
    theta = float(rng.choice([10_000.0, 500_000.0, rng.uniform(1_000.0, 1_000_000.0)]))
    if small:
        threshold = int(rng.integers(T_SHORT + 1, T_LONG))
        scaled_by_original = rope_type in ("yarn", "longrope", "llama3")
        max_pos = int(rng.integers(threshold, 4 * threshold)) if scaled_by_original else threshold
    else:
        threshold = int(rng.integers(256, 8192))
        max_pos = int(threshold * rng.uniform(1.0, 16.0))
    rope = {"rope_type": rope_type}
    if rope_type in ("linear", "dynamic", "yarn", "llama3"):
        rope["factor"] = float(rng.uniform(1.0, 32.0))
    if rope_type == "yarn":
        if variant % 5 != 4 or small:  # variant 4: let original_max fall back to max_position_embeddings
            rope["original_max_position_embeddings"] = threshold
        if variant % 5 == 1:
            rope["mscale"], rope["mscale_all_dim"] = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0))
        elif variant % 5 == 2:
            rope["attention_factor"] = float(rng.uniform(0.5, 2.0))
        elif variant % 5 == 3:
            rope["truncate"] = False
            rope["beta_fast"], rope["beta_slow"] = float(rng.uniform(8.0, 64.0)), float(rng.uniform(0.5, 4.0))
    elif rope_type == "longrope":
        rope["original_max_position_embeddings"] = threshold
        rope["short_factor"] = rng.uniform(1.0, 3.0, head_dim // 2).tolist()
        rope["long_factor"] = rng.uniform(1.0, 64.0, head_dim // 2).tolist()
        if variant % 3 == 1:
            rope["factor"] = float(rng.uniform(1.0, 32.0))
        elif variant % 3 == 2:
            rope["attention_factor"] = float(rng.uniform(0.5, 2.0))
        # variant 0: factor implied as max_position_embeddings / original (Phi-3 style)
    elif rope_type == "llama3":
        rope["original_max_position_embeddings"] = threshold
        rope["low_freq_factor"] = float(rng.uniform(0.5, 2.0))
        rope["high_freq_factor"] = rope["low_freq_factor"] + float(rng.uniform(0.5, 6.0))
    return {
        "rope": None if rope_type == "default" else rope,
        "head_dim": head_dim,
        "theta": theta,
        "max_pos": max_pos,
        "threshold": threshold,
    }


# ------------------------------------------------------------------------------------------------ frequencies


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_inv_freq_and_scaling_match_transformers(rope_type):
    rng = _rng("inv_freq/" + rope_type)
    for variant in range(10):
        case = _random_case(rope_type, rng, variant)
        cfg = _cfg(case)
        lengths = (None, case["threshold"] // 2, case["threshold"], case["threshold"] + 1, 3 * case["max_pos"])
        for seq_len in lengths:
            ref_inv, ref_scaling = _hf_init(cfg, seq_len)
            inv, scaling = _ours(case, seq_len)
            assert inv.dtype == np.float32 and inv.shape == (case["head_dim"] // 2,)
            assert isinstance(scaling, float)
            rtol = _llama3_rtol(case) if rope_type == "llama3" else 1e-6
            ok = np.abs(inv.astype(np.float64) - ref_inv) <= rtol * np.abs(ref_inv)
            assert ok.all(), f"{case} seq_len={seq_len}: {inv[~ok]} vs {ref_inv[~ok]} (rtol {rtol})"
            np.testing.assert_allclose(scaling, ref_scaling, rtol=1e-6, err_msg=f"{case}")


def test_llama31_values():
    case = {"rope": LLAMA31, "head_dim": 128, "theta": 500_000.0, "max_pos": 131_072, "threshold": 8192}
    ref_inv, ref_scaling = _hf_init(_cfg(case), None)
    inv, scaling = _ours(case, None)
    np.testing.assert_allclose(inv, ref_inv, rtol=1e-6, atol=0)
    assert scaling == ref_scaling == 1.0
    plain, _ = rope_frequencies(None, head_dim=128, rope_theta=500_000.0, max_position_embeddings=131_072)
    assert inv[0] == plain[0] and np.isclose(inv[-1], plain[-1] / 8.0, rtol=1e-6)  # kept high / divided low freqs


def test_dynamic_and_longrope_switch_at_threshold():
    rng = _rng("switch")
    for rope_type in ("dynamic", "longrope"):
        case = _random_case(rope_type, rng, 0, small=True)
        at, _ = _ours(case, case["threshold"])
        past, _ = _ours(case, case["threshold"] + 1)
        unknown, _ = _ours(case, None)
        np.testing.assert_array_equal(at, unknown)  # up to the threshold: same as at init
        assert not np.allclose(past, at)


# ------------------------------------------------------------------------------------------------ cos / sin


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_cos_sin_match_llama_rotary_embedding(rope_type):
    rng = _rng("cos_sin/" + rope_type)
    for variant in range(4):
        case = _random_case(rope_type, rng, variant, small=True)
        cfg = _cfg(case)
        assert T_SHORT < case["threshold"] < T_LONG
        for seq_len in (T_SHORT, T_LONG):
            positions = np.broadcast_to(np.arange(seq_len), (2, seq_len)).copy()
            ref_cos, ref_sin = _hf_cos_sin(cfg, positions)
            inv, scaling = _ours(case, seq_len)
            cos, sin = rope_cos_sin(jnp.asarray(positions), inv, scaling)
            assert cos.dtype == sin.dtype == jnp.float32 and cos.shape == (2, seq_len, case["head_dim"])
            np.testing.assert_allclose(np.asarray(cos), ref_cos, rtol=0, atol=1e-5, err_msg=f"{case} T={seq_len}")
            np.testing.assert_allclose(np.asarray(sin), ref_sin, rtol=0, atol=1e-5, err_msg=f"{case} T={seq_len}")


def test_cos_sin_long_positions_within_float32_angle_resolution():
    rng = _rng("long")
    dynamic = {"rope_type": "dynamic", "factor": float(rng.uniform(2.0, 8.0))}
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "mscale": 0.7,
        "mscale_all_dim": 0.3,
    }
    length = 2048
    for rope, max_pos in ((dynamic, 512), (yarn, 2048), (LLAMA31, 131_072)):
        case = {"rope": rope, "head_dim": 128, "theta": float(rng.uniform(1e4, 1e6)), "max_pos": max_pos}
        # Offset rows, as with left padding: transformers measures max(position) + 1, which is what we pass.
        positions = np.stack([np.arange(length), np.arange(length) + 7])
        ref_cos, ref_sin = _hf_cos_sin(_cfg(case), positions)
        inv, scaling = _ours(case, int(positions.max()) + 1)
        cos, sin = rope_cos_sin(jnp.asarray(positions), inv, scaling)
        tol = 3 * float(np.spacing(np.float32(positions.max()))) * scaling + 1e-6
        assert np.abs(np.asarray(cos) - ref_cos).max() <= tol
        assert np.abs(np.asarray(sin) - ref_sin).max() <= tol


# ------------------------------------------------------------------------------------------------ apply_rope


@pytest.mark.parametrize("head_dim", [64, 128])
def test_apply_rope_matches_apply_rotary_pos_emb(head_dim):
    rng = _rng(f"apply/{head_dim}")
    batch, length, heads = 2, 19, 3
    rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}
    cfg = _hf_config(rope, head_dim=head_dim, rope_theta=10_000.0, max_position_embeddings=128)
    positions = rng.integers(0, T_LONG, size=(batch, length))
    cos_t, sin_t = _hf_cos_sin(cfg, positions)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)

    # transformers' q/k are [B, H, T, D].
    ref_q, ref_k = apply_rotary_pos_emb(
        torch.from_numpy(q).transpose(1, 2),
        torch.from_numpy(k).transpose(1, 2),
        torch.from_numpy(cos_t),
        torch.from_numpy(sin_t),
    )
    ref_q, ref_k = ref_q.transpose(1, 2).numpy(), ref_k.transpose(1, 2).numpy()

    # Same cos/sin fed to both isolates the rotation...
    np.testing.assert_allclose(
        np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(cos_t), jnp.asarray(sin_t))), ref_q, rtol=0, atol=1e-5
    )
    # ...and the full path from the config (cos/sin differ by up to 1e-5 here, times |k| of a few).
    inv, scaling = rope_frequencies(rope, head_dim=head_dim, rope_theta=10_000.0, max_position_embeddings=128)
    cos, sin = rope_cos_sin(jnp.asarray(positions), inv, scaling)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(k), cos, sin)), ref_k, rtol=0, atol=3e-5)


def test_apply_rope_dtype_jit_and_norm():
    rng = _rng("apply/dtype")
    positions = jnp.asarray(rng.integers(0, 4096, size=(2, 9)))
    inv, scaling = rope_frequencies(None, head_dim=64, rope_theta=10_000.0, max_position_embeddings=4096)
    x32 = jnp.asarray(rng.standard_normal((2, 9, 4, 64)), dtype=jnp.float32)
    x16 = x32.astype(jnp.bfloat16)

    cos, sin = rope_cos_sin(positions, inv, scaling)
    out16 = apply_rope(x16, cos, sin)
    assert out16.dtype == jnp.bfloat16
    # Math is float32 and cast once at the end (bf16 -> f32 is exact).
    np.testing.assert_array_equal(
        np.asarray(out16), np.asarray(apply_rope(x16.astype(jnp.float32), cos, sin).astype(jnp.bfloat16))
    )

    @jax.jit
    def rotate(pos, x):
        return apply_rope(x, *rope_cos_sin(pos, inv, scaling))

    out = rotate(positions, x32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(apply_rope(x32, cos, sin)), rtol=0, atol=1e-6)
    # attention_scaling 1 -> a pure rotation of each (j, j + D/2) pair.
    pair_norm = lambda v: np.hypot(np.asarray(v)[..., :32], np.asarray(v)[..., 32:])  # noqa: E731
    np.testing.assert_allclose(pair_norm(out), pair_norm(x32), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ config handling


def test_normalize_accepts_legacy_type_and_canonicalises():
    legacy = {"type": "linear", "factor": 8, "rope_theta": 500_000.0}
    out = normalize_rope_scaling(legacy)
    assert out == {"rope_type": "linear", "factor": 8.0} and isinstance(out["factor"], float)
    assert legacy == {"type": "linear", "factor": 8, "rope_theta": 500_000.0}  # input untouched
    assert normalize_rope_scaling(out) == out and normalize_rope_scaling(out) is not out
    llama3 = normalize_rope_scaling({**LLAMA31, "original_max_position_embeddings": 8192.0})
    assert llama3["original_max_position_embeddings"] == 8192 and isinstance(
        llama3["original_max_position_embeddings"], int
    )
    yarn = normalize_rope_scaling({"rope_type": "yarn", "factor": 4, "attention_factor": None, "truncate": False})
    assert yarn == {"rope_type": "yarn", "factor": 4.0, "truncate": False}
    lr = normalize_rope_scaling({"rope_type": "longrope", "short_factor": (1, 2), "long_factor": np.ones(2)})
    assert lr["short_factor"] == [1.0, 2.0] and lr["long_factor"] == [1.0, 1.0]


@pytest.mark.parametrize(
    "plain", [None, {}, {"rope_theta": 10_000.0}, {"rope_type": "default"}, {"type": "default", "rope_theta": 1e6}]
)
def test_normalize_default_is_none(plain):
    assert normalize_rope_scaling(plain) is None


def test_normalize_errors():
    with pytest.raises(RopeConfigError, match="unknown rope type 'ntk'.*default, linear, dynamic, yarn, longrope"):
        normalize_rope_scaling({"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(RopeConfigError, match="'linear'.*missing.*factor"):
        normalize_rope_scaling({"type": "linear"})
    with pytest.raises(RopeConfigError, match="'llama3'.*missing.*high_freq_factor"):
        normalize_rope_scaling({k: v for k, v in LLAMA31.items() if k != "high_freq_factor"})
    with pytest.raises(RopeConfigError, match="'longrope'.*missing.*long_factor"):
        normalize_rope_scaling({"rope_type": "longrope", "short_factor": [1.0]})
    for rope_type in ("linear", "dynamic", "yarn", "llama3"):
        bad = (
            {**LLAMA31, "rope_type": rope_type, "factor": 0.5}
            if rope_type == "llama3"
            else {"rope_type": rope_type, "factor": 0.5}
        )
        with pytest.raises(RopeConfigError, match="factor must be >= 1"):
            normalize_rope_scaling(bad)
    with pytest.raises(RopeConfigError, match="unexpected field 'orignal_max_position_embeddings'"):
        normalize_rope_scaling({"rope_type": "yarn", "factor": 2.0, "orignal_max_position_embeddings": 4096})
    with pytest.raises(RopeConfigError, match="unexpected field 'factor'"):  # factor without a type = default rope
        normalize_rope_scaling({"factor": 2.0})
    with pytest.raises(RopeConfigError, match="both"):
        normalize_rope_scaling({"rope_type": "linear", "type": "dynamic", "factor": 2.0})
    with pytest.raises(RopeConfigError, match="low_freq_factor < high_freq_factor"):
        normalize_rope_scaling({**LLAMA31, "high_freq_factor": 1.0})
    with pytest.raises(RopeConfigError, match="finite number"):
        normalize_rope_scaling({"rope_type": "linear", "factor": "8"})
    with pytest.raises(RopeConfigError, match="partial_rotary_factor"):
        normalize_rope_scaling({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})
    with pytest.raises(RopeConfigError, match="positive integer"):
        normalize_rope_scaling({**LLAMA31, "original_max_position_embeddings": 8192.5})


def test_rope_frequencies_errors():
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 31,
        "long_factor": [2.0] * 32,
        "original_max_position_embeddings": 4096,
    }
    with pytest.raises(RopeConfigError, match="short_factor has 31 entries, expected head_dim // 2 = 32"):
        rope_frequencies(longrope, head_dim=64, rope_theta=1e4, max_position_embeddings=8192)
    with pytest.raises(RopeConfigError, match="head_dim"):
        rope_frequencies(None, head_dim=63, rope_theta=1e4, max_position_embeddings=8192)
    with pytest.raises(RopeConfigError, match="rope_theta"):
        rope_frequencies(None, head_dim=64, rope_theta=0.0, max_position_embeddings=8192)
    with pytest.raises(RopeConfigError, match="seq_len"):
        rope_frequencies(None, head_dim=64, rope_theta=1e4, max_position_embeddings=8192, seq_len=0)


def test_describe_rope():
    assert describe_rope(None) == "default"
    assert describe_rope({"type": "linear", "factor": 8}) == "linear x8.0"
    assert describe_rope(LLAMA31) == "llama3 x8.0 (low 1.0, high 4.0, orig 8192)"
    text = describe_rope({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert text == "yarn x4.0 (orig 32768)" and "\n" not in text


def test_top_level_original_max_overrides_rope_dict_like_transformers():
    # transformers re-runs standardize_rope_params inside every init function, which *assigns* a top-level
    # original_max_position_embeddings over the one in the rope dict (Phi-3 convention).
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    cfg = _hf_config(
        rope, head_dim=64, rope_theta=10_000.0, max_position_embeddings=512, original_max_position_embeddings=64
    )
    ref_inv, ref_scaling = _hf_init(cfg, None)
    merged = rope_scaling_from_hf_config(cfg)
    assert merged["original_max_position_embeddings"] == 64
    inv, scaling = rope_frequencies(merged, head_dim=64, rope_theta=10_000.0, max_position_embeddings=512)
    np.testing.assert_allclose(inv, ref_inv, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(ref_scaling, rel=1e-6)
    naive, _ = rope_frequencies(rope, head_dim=64, rope_theta=10_000.0, max_position_embeddings=512)
    assert not np.allclose(naive, ref_inv)  # the rope dict alone would be wrong here
    # Same from a raw config.json dict, legacy key names included.
    as_json = {
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        "rope_theta": 10_000.0,
        "original_max_position_embeddings": 64,
    }
    assert rope_scaling_from_hf_config(as_json) == merged
    assert rope_scaling_from_hf_config({"rope_theta": 1e4}) is None
