"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are rebuilt from a small latent c_kv [T, kv_lora_rank] plus one RoPE key shared by all
heads; that latent is all a decoder has to cache. Module names follow the Hugging Face checkpoint.
Shapes: B batch, T tokens, H heads, R rope dim, N nope dim, V value dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, H = config.hidden_size, config.num_attention_heads
        self.n_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale()
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * config.v_head_dim, D, bias=False)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        H, N, R, V = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        interleave = self.config.rope_interleave

        q = self.project_q(x).view(B, T, H, N + R)
        q_nope, q_rope = q.split([N, R], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, interleave)

        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, R], dim=-1)
        k_rope = apply_rope(k_rope.view(B, T, 1, R), cos, sin, interleave)  # one rope key for all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).view(B, T, H, N + V)
        k_nope, v = kv.split([N, V], dim=-1)

        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [B, H, T, N+R]
        k = torch.cat((k_nope, k_rope.expand(B, T, H, R)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        # SDPA's fused kernels want equal qk and v head dims; zero-padding v and slicing the output is
        # exact and faster than the math fallback (cpu-performance-notes.md).
        pad = N + R - V
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        if pad > 0:
            out = out[..., :V]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * V))
