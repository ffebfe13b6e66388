"""Rotary position embeddings (RoPE) with every scaling type Hugging Face transformers supports for Llama.

RoPE rotates each pair of channels (i, i + D/2) of q and k by the angle ``position * inv_freq[i]``, with
``inv_freq[i] = theta ** (-2i / D)`` (Su et al., "RoFormer", 2021). The scaling types change ``inv_freq`` (and
sometimes multiply cos/sin by an "attention scaling") so that a model can run past its pre-training length:

* ``default``  -- plain RoPE.
* ``linear``   -- position interpolation: every frequency divided by ``factor`` (Chen et al., 2023, "Extending
  Context Window ... via Positional Interpolation").
* ``dynamic``  -- dynamic NTK: theta is enlarged as a function of the current sequence length, only once it runs past
  ``max_position_embeddings`` (reddit /u/bloc97, /u/emozilla; transformers' ``_compute_dynamic_ntk_parameters``).
* ``yarn``     -- NTK-by-parts: high-frequency channels are kept, low-frequency channels are interpolated by
  ``factor``, with a linear ramp between, and cos/sin are multiplied by ``0.1 ln(factor) + 1`` (Peng et al., 2023,
  "YaRN", sec. 3.2-3.4).
* ``longrope`` -- per-channel rescale factors, one list for short and one for long sequences (Ding et al., 2024,
  "LongRoPE"; Phi-3), plus attention scaling ``sqrt(1 + ln(factor) / ln(original_max))``.
* ``llama3``   -- Llama 3.1's wavelength-banded interpolation: long wavelengths divided by ``factor``, short ones kept,
  a smooth blend between (Meta's reference ``apply_scaling``).

Frequencies are computed once on the host in float64 numpy (they depend only on the config and, for ``dynamic`` and
``longrope``, on the static sequence length) and cast to float32; the per-token cos/sin and the rotation are JAX.
The numerical contract is transformers' ``ROPE_INIT_FUNCTIONS`` and ``LlamaRotaryEmbedding`` (transformers 5); the
two float32 index grids transformers starts from (the exponents 2i/D and YaRN's ramp) are rebuilt in float32 because
their rounding is amplified downstream -- everything else is float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROPE_TYPES",
    "RopeConfigError",
    "normalize_rope_scaling",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "describe_rope",
    "rope_scaling_from_hf_config",
]

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


class RopeConfigError(ValueError):
    """A rope-scaling dict that transformers would reject or that we cannot reproduce exactly."""


# Per type: fields that must be present, and fields that may be present. Mirrors transformers'
# `RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters`, except that `original_max_position_embeddings` is
# optional here: transformers' `standardize_rope_params` fills it from `max_position_embeddings` before validating,
# and we do the same fallback in `rope_frequencies` (which knows that value).
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
_OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "yarn": (
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "longrope": ("original_max_position_embeddings", "factor", "attention_factor"),
    "llama3": ("original_max_position_embeddings",),
}
_FLOAT_FIELDS = frozenset(
    {
        "factor",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "low_freq_factor",
        "high_freq_factor",
    }
)
_FACTOR_AT_LEAST_ONE = frozenset({"linear", "dynamic", "yarn", "llama3"})


# ----------------------------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `factor: true` is a config typo, not a number.
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _as_float(rope_type: str, key: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise RopeConfigError(f"rope_type '{rope_type}': field '{key}' must be a finite number, got {value!r}")
    return float(value)


def _as_positive_int(what: str, value: Any) -> int:
    # JSON sometimes carries 8192.0; accept integral floats, reject 8192.5.
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) != int(value) or int(value) < 1:
        raise RopeConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _as_factor_list(rope_type: str, key: str, value: Any) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) == 0:
        raise RopeConfigError(
            f"rope_type '{rope_type}': field '{key}' must be a non-empty list of numbers, got {value!r}"
        )
    out = [_as_float(rope_type, key, v) for v in value]
    if min(out) <= 0:
        raise RopeConfigError(f"rope_type '{rope_type}': every entry of '{key}' must be > 0")
    return out


def _resolve_rope_type(rope_scaling: Mapping[str, Any]) -> str:
    rope_type = rope_scaling.get("rope_type")
    legacy = rope_scaling.get("type")
    if rope_type is not None and legacy is not None and rope_type != legacy:
        # transformers silently prefers 'rope_type'; two different answers is almost surely a config bug.
        raise RopeConfigError(f"rope scaling has both rope_type={rope_type!r} and legacy type={legacy!r}")
    # Absent type means plain RoPE, as in transformers' `standardize_rope_params`.
    rope_type = rope_type if rope_type is not None else (legacy if legacy is not None else "default")
    if rope_type not in ROPE_TYPES:
        raise RopeConfigError(f"unknown rope type {rope_type!r}; known types: {', '.join(ROPE_TYPES)}")
    return rope_type


def _check_values(rope_type: str, out: dict[str, Any]) -> None:
    factor = out.get("factor")
    if factor is not None:
        if factor <= 0:
            raise RopeConfigError(f"rope_type '{rope_type}': factor must be > 0, got {factor}")
        if rope_type in _FACTOR_AT_LEAST_ONE and factor < 1.0:
            raise RopeConfigError(f"rope_type '{rope_type}': factor must be >= 1, got {factor}")
    if out.get("attention_factor") is not None and out["attention_factor"] <= 0:
        raise RopeConfigError(f"rope_type '{rope_type}': attention_factor must be > 0, got {out['attention_factor']}")
    if rope_type == "llama3":
        low, high = out["low_freq_factor"], out["high_freq_factor"]
        if low <= 0 or high <= low:
            # The llama3 blend divides by (high - low) and by low; see `_llama3_inv_freq`.
            raise RopeConfigError(
                f"rope_type 'llama3': need 0 < low_freq_factor < high_freq_factor, got low={low}, high={high}"
            )
    if rope_type == "yarn":
        # Same `or` defaults as transformers (so a 0 also means "use the default").
        beta_fast, beta_slow = out.get("beta_fast") or 32.0, out.get("beta_slow") or 1.0
        if beta_fast < beta_slow:
            raise RopeConfigError(f"rope_type 'yarn': beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow})")


def normalize_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Validate a rope-scaling dict in transformers' format and return a new, canonical plain dict.

    Accepts 'rope_type' or the legacy 'type' key; the result has 'rope_type' only. Numeric fields become float
    (``original_max_position_embeddings`` int, ``short_factor``/``long_factor`` lists of float, ``truncate`` bool).
    ``None``, ``{}``, a dict holding only ``rope_theta`` and rope_type 'default' all mean plain RoPE and return None.
    'rope_theta' is ignored (transformers 5 keeps it inside rope_parameters; pass it to `rope_frequencies`).
    Optional fields set to None are dropped, i.e. mean "use the default", as transformers' ``dict.get`` reads them.
    Raises RopeConfigError for an unknown type, a missing required field, an unexpected field (a typo such as
    'orignal_max_position_embeddings' would otherwise silently fall back to the default) or a bad value.
    """
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, Mapping):
        raise RopeConfigError(f"rope scaling must be a dict or None, got {type(rope_scaling).__name__}")
    rope_type = _resolve_rope_type(rope_scaling)

    required = _REQUIRED_FIELDS[rope_type]
    allowed = set(required) | set(_OPTIONAL_FIELDS[rope_type])
    out: dict[str, Any] = {"rope_type": rope_type}
    for key, value in rope_scaling.items():
        if key in ("rope_type", "type", "rope_theta"):
            continue
        if key == "partial_rotary_factor":
            # Llama rotates the whole head; transformers' Llama default path ignores this key, the scaled paths
            # would not. Only the no-op value is accepted so that both agree.
            if value is not None and _as_float(rope_type, key, value) != 1.0:
                raise RopeConfigError(f"partial_rotary_factor={value} is not supported (Llama rotates the full head)")
            continue
        if key not in allowed:
            raise RopeConfigError(
                f"rope_type '{rope_type}': unexpected field {key!r}; allowed: {sorted(allowed) or 'none'}"
            )
        if value is None:
            if key in required:
                continue  # reported as missing below
            if key == "truncate":
                # transformers reads `rope_parameters.get("truncate", True)`: explicit None is falsy = no truncation.
                out[key] = False
            continue
        if key in _FLOAT_FIELDS:
            out[key] = _as_float(rope_type, key, value)
        elif key == "original_max_position_embeddings":
            out[key] = _as_positive_int(f"rope_type '{rope_type}': field '{key}'", value)
        elif key in ("short_factor", "long_factor"):
            out[key] = _as_factor_list(rope_type, key, value)
        elif key == "truncate":
            if not isinstance(value, (bool, np.bool_)):
                raise RopeConfigError(f"rope_type 'yarn': field 'truncate' must be a bool, got {value!r}")
            out[key] = bool(value)

    missing = [key for key in required if key not in out]
    if missing:
        raise RopeConfigError(f"rope_type '{rope_type}' is missing required field(s): {', '.join(missing)}")
    _check_values(rope_type, out)
    return None if rope_type == "default" else out


# ----------------------------------------------------------------------------------------------------------------
# Inverse frequencies (host, float64)
# ----------------------------------------------------------------------------------------------------------------


def _exponents(dim: int) -> np.ndarray:
    """2i / dim for i < dim/2: the RoPE exponent of each channel pair (RoFormer eq. 15).

    The division is done in float32 on purpose: transformers builds this grid as float32 (`arange(...).float() / dim`),
    and for head dims that are not powers of two (e.g. 96) the rounded exponent, amplified by ln(theta) ~ 10-15 in
    theta ** x, moves inv_freq by ~1e-6 relative. Using the same grid keeps us at the ~1e-7 level everywhere; all
    later arithmetic is float64.
    """
    return (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / theta ** _exponents(dim)


def _original_max(params: Mapping[str, Any], max_position_embeddings: int) -> int:
    # transformers' `standardize_rope_params` does `setdefault("original_max_position_embeddings",
    # max_position_embeddings)` for llama3/yarn/longrope. (A top-level config attribute of that name takes
    # precedence over the dict there; `rope_scaling_from_hf_config` folds it into the dict.)
    return params.get("original_max_position_embeddings", max_position_embeddings)


def _linear(params, *, dim, theta, max_pos, seq_len):
    # Position interpolation: angle = (pos / factor) * inv_freq == pos * (inv_freq / factor).
    return _default_inv_freq(theta, dim) / params["factor"], 1.0


def _dynamic(params, *, dim, theta, max_pos, seq_len):
    if dim <= 2:
        raise RopeConfigError("rope_type 'dynamic' needs head_dim > 2 (its theta exponent is dim / (dim - 2))")
    factor = params["factor"]
    # transformers uses the *config's* max_position_embeddings here (not original_max_position_embeddings), and
    # never shrinks theta below the base: for seq_len <= max_position_embeddings this is plain RoPE.
    length = max_pos if seq_len is None else max(seq_len, max_pos)
    # NTK-aware theta: theta' = theta * (factor * L / L_max - (factor - 1)) ** (dim / (dim - 2)).
    theta = theta * (factor * length / max_pos - (factor - 1.0)) ** (dim / (dim - 2))
    return _default_inv_freq(theta, dim), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN eq. (attention temperature): sqrt(1/t) = 0.1 ln(s) + 1; DeepSeek-V2 generalises the 0.1 to 0.1 * mscale.
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, original_max: int) -> float:
    # YaRN eq. 17 inverted: the (fractional) channel index whose wavelength makes `num_rotations` full turns over
    # the original context, d = dim * ln(L / (2 pi r)) / (2 ln theta).
    return dim * math.log(original_max / (num_rotations * 2.0 * math.pi)) / (2.0 * math.log(theta))


def _yarn(params, *, dim, theta, max_pos, seq_len):
    factor = params["factor"]
    original_max = _original_max(params, max_pos)

    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        # transformers tests truthiness: a zero mscale / mscale_all_dim falls back to the plain YaRN formula.
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    beta_fast = params.get("beta_fast") or 32.0  # alpha/beta of YaRN sec. 3.2; paper defaults
    beta_slow = params.get("beta_slow") or 1.0
    low = _yarn_correction_dim(beta_fast, dim, theta, original_max)
    high = _yarn_correction_dim(beta_slow, dim, theta, original_max)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    # gamma(r) of YaRN eq. 18: 0 for fast channels (index < low: extrapolate), 1 for slow ones (interpolate).
    # Like `_exponents`, the ramp is built in float32 as transformers builds it: it enters the blend through
    # 1 - ramp, whose float32 rounding otherwise shows up as ~1e-6 relative differences when factor is large.
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0.0, 1.0)
    extrapolation = (np.float32(1.0) - ramp).astype(np.float64)
    inv_freq = _default_inv_freq(theta, dim)
    inv_freq = (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention


def _longrope(params, *, dim, theta, max_pos, seq_len):
    original_max = _original_max(params, max_pos)
    # Phi-3 style configs omit `factor` and imply it as max_position_embeddings / original_max_position_embeddings.
    factor = params.get("factor", max_pos / original_max)

    attention = params.get("attention_factor")
    if attention is None:
        if factor <= 1.0:
            attention = 1.0
        elif original_max <= 1:
            raise RopeConfigError("rope_type 'longrope': original_max_position_embeddings must be > 1")
        else:
            # LongRoPE / Phi-3: sqrt(1 + ln(s) / ln(L_original)).
            attention = math.sqrt(1.0 + math.log(factor) / math.log(original_max))

    # transformers' `longrope_frequency_update`: long factors once the sequence is longer than the original
    # pre-training length, short factors otherwise (and when the length is unknown, as at module init).
    use_long = seq_len is not None and seq_len > original_max
    key = "long_factor" if use_long else "short_factor"
    for name in ("short_factor", "long_factor"):
        if len(params[name]) != dim // 2:
            raise RopeConfigError(
                f"rope_type 'longrope': {name} has {len(params[name])} entries, expected head_dim // 2 = {dim // 2}"
            )
    ext = np.asarray(params[key], dtype=np.float64)
    return 1.0 / (ext * theta ** _exponents(dim)), attention


def _llama3(params, *, dim, theta, max_pos, seq_len):
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    original_max = _original_max(params, max_pos)
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor

    inv_freq = _default_inv_freq(theta, dim)
    wavelen = 2.0 * math.pi / inv_freq
    # Short wavelengths (< high_freq_wavelen) are kept, long ones (> low_freq_wavelen) divided by factor, and the
    # band between blends the two linearly in original_max / wavelen (Llama 3.1 reference `apply_scaling`).
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, out), 1.0


_INV_FREQ_FNS = {
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
}


def rope_frequencies(
    rope_scaling: dict | None,
    *,
    head_dim: int,
    rope_theta: float,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling) for a Llama config, as transformers computes them.

    `seq_len` (static) is the length of the sequence being processed -- for position ids that do not start at 0, pass
    max(position) + 1, which is what transformers measures. It matters only for 'dynamic' (theta grows once
    seq_len > max_position_embeddings) and 'longrope' (long factors once seq_len > original_max_position_embeddings).
    ``original_max_position_embeddings`` comes from the rope dict, else defaults to `max_position_embeddings`.
    """
    params = normalize_rope_scaling(rope_scaling)
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
        raise RopeConfigError(f"head_dim must be a positive even integer, got {head_dim!r}")
    if not _is_number(rope_theta) or not float(rope_theta) > 1.0 or not math.isfinite(float(rope_theta)):
        raise RopeConfigError(f"rope_theta must be a finite number > 1, got {rope_theta!r}")
    max_pos = _as_positive_int("max_position_embeddings", max_position_embeddings)
    if seq_len is not None:
        seq_len = _as_positive_int("seq_len", seq_len)

    dim, theta = int(head_dim), float(rope_theta)
    if params is None:
        inv_freq, attention = _default_inv_freq(theta, dim), 1.0
    else:
        fn = _INV_FREQ_FNS[params["rope_type"]]
        inv_freq, attention = fn(params, dim=dim, theta=theta, max_pos=max_pos, seq_len=seq_len)
    return inv_freq.astype(np.float32), float(attention)


def describe_rope(rope_scaling: dict | None) -> str:
    """One-line summary for logs, e.g. 'linear x8.0' or 'llama3 x8.0 (low 1.0, high 4.0, orig 8192)'."""
    params = normalize_rope_scaling(rope_scaling)
    if params is None:
        return "default"
    rope_type = params["rope_type"]
    head = f"{rope_type} x{params['factor']}" if "factor" in params else rope_type
    extras = []
    if rope_type == "llama3":
        extras += [f"low {params['low_freq_factor']}", f"high {params['high_freq_factor']}"]
    if rope_type == "longrope":
        extras.append(f"{len(params['short_factor'])} short/long factors")
    if "original_max_position_embeddings" in params:
        extras.append(f"orig {params['original_max_position_embeddings']}")
    for key in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        if key in params:
            extras.append(f"{key} {params[key]:g}")
    if params.get("truncate") is False:
        extras.append("no truncate")
    return head + (f" ({', '.join(extras)})" if extras else "")


def rope_scaling_from_hf_config(config: Any) -> dict | None:
    """Normalized rope scaling of a transformers config (object or config.json dict), with its precedence.

    Reads `rope_parameters` (transformers 5) or the legacy `rope_scaling`. For llama3/yarn/longrope a top-level
    `original_max_position_embeddings` attribute *overrides* the value inside the rope dict: transformers'
    `standardize_rope_params`, re-run by every ROPE_INIT_FUNCTIONS call, assigns it unconditionally (the Phi-3 case).
    """

    def get(name: str) -> Any:
        return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)

    rope = get("rope_parameters") or get("rope_scaling")
    params = normalize_rope_scaling(dict(rope) if rope else None)
    top_level_original_max = get("original_max_position_embeddings")
    if params is not None and params["rope_type"] in ("llama3", "yarn", "longrope") and top_level_original_max:
        params = normalize_rope_scaling({**params, "original_max_position_embeddings": top_level_original_max})
    return params


# ----------------------------------------------------------------------------------------------------------------
# Device side (JAX)
# ----------------------------------------------------------------------------------------------------------------


def rope_cos_sin(positions: jax.Array, inv_freq, attention_scaling: float) -> tuple[jax.Array, jax.Array]:
    """positions int [B, T] -> (cos, sin) float32 [B, T, head_dim], times attention_scaling.

    Layout is transformers': emb = cat(freqs, freqs), so channel j and j + D/2 share an angle (rotate_half pairing).
    Angles are pos * inv_freq in float32, exactly as LlamaRotaryEmbedding.forward computes them.
    """
    positions = jnp.asarray(positions)
    if positions.ndim != 2:
        raise ValueError(f"positions must be [B, T], got shape {positions.shape}")
    inv_freq = jnp.asarray(inv_freq, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos = jnp.concatenate([cos, cos], axis=-1) * jnp.float32(attention_scaling)
    sin = jnp.concatenate([sin, sin], axis=-1) * jnp.float32(attention_scaling)
    return cos, sin


def _rotate_half(x: jax.Array) -> jax.Array:
    # transformers' rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last axis.
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (shared by all heads); returns x.dtype, math in float32.

    Same result as transformers' apply_rotary_pos_emb, whose q/k are [B, H, T, D] (unsqueeze_dim=1) while ours are
    [B, T, H, D], so cos/sin get their head axis at position 2.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {x.shape}")
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1] or x.shape[-1] % 2:
        raise ValueError(f"cos/sin {cos.shape}/{sin.shape} do not match x {x.shape} (last axis, even)")
    xf = x.astype(jnp.float32)
    cos = cos.astype(jnp.float32)[..., None, :]
    sin = sin.astype(jnp.float32)[..., None, :]
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
