"""Rotary position embedding with YaRN context extension, as in DeepSeek-V3 and Hugging Face.

Only the qk_rope_head_dim slice of each head is rotated (MLA's decoupled RoPE).
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_mscale
from .fp32 import KeepsFP32


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin multiplier ("attention factor").

    With YaRN, low frequencies (long wavelengths) are interpolated by `factor`, high ones kept, and a
    linear ramp between `beta_fast` and `beta_slow` rotations blends the two (YaRN paper, eq. 23).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return inv_freq, 1.0

    factor = float(rs["factor"])
    original = float(rs.get("original_max_position_embeddings", config.max_position_embeddings))
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep original frequency), 0 = interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(KeepsFP32):
    """Produces (cos, sin) tables [T, R/2] in fp32 for given positions; `inv_freq` stays fp32 under bf16
    casts of the model (a bf16 frequency is up to 0.4% off: radians off by position 1000)."""

    fp32_tensors = ("inv_freq",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the frequency table, e.g. after the model was built on the meta device."""
        inv_freq, self.attention_factor = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
               seq_dim: int | None = None) -> torch.Tensor:
    """Rotate x [..., T, H, R] by position (or positions on `seq_dim`, e.g. [B, H, T, R] with seq_dim=2).
    Pairs are (2i, 2i+1) when interleaved, else (i, i+R/2).

    Either way the output is laid out as halves [rotated firsts | rotated seconds], like Hugging Face;
    queries and keys are permuted alike, so their dot products are unchanged.
    """
    return torch.cat(rope_halves(x, cos, sin, interleave, seq_dim), dim=-1)


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
                seq_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves `apply_rope` concatenates, for callers that concatenate them with more (one copy)."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    if seq_dim is None:  # positions on dim -3: [..., T, H, R]
        cos, sin = cos[:, None, :], sin[:, None, :]
    else:
        shape = [1] * x.dim()
        shape[seq_dim], shape[-1] = cos.shape[0], cos.shape[-1]
        cos, sin = cos.reshape(shape), sin.reshape(shape)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin
