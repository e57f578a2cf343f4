"""Rotary position embeddings: the frequencies each checkpoint's rope_scaling gives
(default, linear, llama3, YaRN, LongRoPE, llama.cpp's per-pair factors), the attention
factor YaRN and LongRoPE scale cos and sin by, and the rotation itself, of all of each
head or its first dimensions (partial rotary). Mirrors HF `modeling_rope_utils.py`; the
config is any of the architectures' (it reads rotary_dim, rope_theta, rope_scaling,
max_position_embeddings and, for Gemma 3's local layers, local_rope_theta).
"""

import math
from typing import Any

import torch

from pocketlm.errors import PocketLMError

# The rope_scaling types rope_inv_freq computes. "freq_factors" is not an HF type: it is
# what a GGUF carries instead of llama3's numbers (the `rope_freqs.weight` tensor that
# llama.cpp's converter writes for Llama 3.1+), one divisor per rotated pair.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "freq_factors")


def rope_inv_freq(config: Any, *, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (R/2,) with the checkpoint's rope_scaling applied (HF
    `modeling_rope_utils`: default, linear, llama3, yarn, longrope -- its short factors,
    or with `long` its long ones; llama.cpp's `freq_factors`).
    `local`: those of the sliding-window layers (Gemma 3: their own base, never scaled)."""
    d = config.rotary_dim
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = {} if local else config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, config).float()
    if kind in ("freq_factors", "longrope"):
        # llama.cpp's ggml_rope_ext: theta_i = position * base^(-2i/D) / freq_factors[i];
        # LongRoPE (HF `_compute_longrope_parameters`) divides by its short or long factors.
        key = "factors" if kind == "freq_factors" else "long_factor" if long else "short_factor"
        factors = torch.tensor(scaling[key], dtype=torch.float64)
        if factors.shape != inv_freq.shape:
            raise PocketLMError(
                f"rope_scaling has {factors.numel()} {key} for {d} rotated dimensions "
                f"(expected {d // 2}, one per rotated pair)"
            )
        return (inv_freq / factors).float()
    raise PocketLMError(
        f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})"
    )


def rope_attention_factor(config: Any) -> float:
    """What YaRN and LongRoPE multiply cos and sin by (so every attention logit by its
    square), as HF `_compute_yarn_parameters` / `_compute_longrope_parameters` set it; 1.0
    for the other types."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, old_ctx = _scaling_factor(config), scaling["original_max_position_embeddings"]
    if kind == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:  # DeepSeek's form
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _scaling_factor(config: Any) -> float:
    """rope_scaling's factor, or (where a config leaves it out, as Phi-3's do) the ratio
    of the context to the pretraining one."""
    scaling = config.rope_scaling or {}
    factor = scaling.get("factor")
    if factor is None:
        return config.max_position_embeddings / scaling["original_max_position_embeddings"]
    return factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(inv_freq: torch.Tensor, config: Any) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the
    pretraining context are divided by `factor` (interpolated), those that turn more than
    beta_fast times are kept (extrapolated), a linear ramp between -- exactly as HF
    `_compute_yarn_parameters`, whose correction range is in dimension units but whose
    ramp runs over pair indices (llama.cpp's rope_yarn_ramp does the same)."""
    scaling, d, base = config.rope_scaling or {}, config.rotary_dim, config.rope_theta
    factor, old_ctx = _scaling_factor(config), scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension turning this many times
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # the share of each pair's frequency kept as it is
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, the band
    between blended (HF `_compute_llama3_parameters`)."""
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, *, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin (B, T, 1, R) of every position's rotary angles, R the
    rotated dimensions of a head (D, or fewer with partial rotary), for `rotate`; `scale`
    multiplies both (YaRN's and LongRoPE's attention factor)."""
    angles = positions[..., None].float() * inv_freq  # (B, T, R/2)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (B, T, R)
    return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)  # (B, T, 1, R)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotary embedding of the first `dims` of each head of x (..., D); the rest pass as
    they are (partial rotary: Phi-4-mini, StableLM, GPT-NeoX). cos, sin: (..., dims)."""
    # HF's x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): `sin` carries
    # the minus sign on its first half (see `Llama.rope`), so a roll does the rest.
    if dims == x.shape[-1]:
        return x * cos + x.roll(dims // 2, dims=-1) * sin
    rot, rest = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + rot.roll(dims // 2, dims=-1) * sin, rest), dim=-1)
