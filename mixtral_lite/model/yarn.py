"""YaRN rotary scaling (Peng et al. 2023), as transformers computes it for DeepSeek-V2/V3.

Low frequencies (long wavelengths) are interpolated by ``factor``, high ones kept, with a linear
ramp between the two correction dimensions; cos and sin are multiplied by an attention factor,
and DeepSeek's attention multiplies its softmax scale by ``mscale(factor, mscale_all_dim)^2``.
"""

from __future__ import annotations

import math

import torch

from ..config import MixtralConfig, RopeScaling


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _factor(config: MixtralConfig, rope: RopeScaling) -> float:
    if rope.factor is not None:
        return rope.factor
    return config.max_position_embeddings / rope.original_max_position_embeddings


def yarn_frequencies(config: MixtralConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [hd / 2] float32, the factor cos and sin are multiplied by)."""
    rope = config.rope_scaling
    assert rope is not None
    dim, base = config.head_dim, config.rope_theta
    factor = _factor(config, rope)
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _mscale(factor, rope.mscale) / _mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    cpu = torch.device("cpu")  # explicit: models are built under a meta default device
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=cpu) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=cpu) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    inv = interpolation * (1 - keep) + extrapolation * keep
    return inv.to(device or cpu), float(attention_factor)


def softmax_scale(config: MixtralConfig, qk_head_dim: int) -> float:
    """DeepSeek's attention scale: 1 / sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim**-0.5
    rope = config.rope_scaling
    if rope is not None and rope.mscale_all_dim:
        m = _mscale(_factor(config, rope), rope.mscale_all_dim)
        scale = scale * m * m
    return scale


__all__ = ["softmax_scale", "yarn_frequencies"]
