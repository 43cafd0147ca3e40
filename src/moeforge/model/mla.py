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
from .rope import rope_halves

ATTN_IMPLS = ("sdpa", "eager")
# The norms of the query and KV latents use a fixed eps, not config.rms_norm_eps: DeepSeek's reference
# (inference/model.py: RMSNorm(q_lora_rank), RMSNorm(kv_lora_rank)) and transformers' DeepseekV2/V3
# attention both leave them at the default 1e-6, whatever rms_norm_eps the config sets.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    """`attn_impl` picks the attention core (set from outside, e.g. by `moeforge.hardware`, never by the
    device here):
      sdpa   F.scaled_dot_product_attention with v zero-padded to the qk head dim (fused kernels want equal
             dims); fp32 scores and softmax inside the kernel;
      eager  baddbmm -> softmax -> bmm on [B*H, T, T]: scores in the compute dtype (bf16 under autocast,
             as in HF's eager attention), softmax accumulated in fp32. Faster on CPUs whose fused kernel
             does not use bf16 matmuls; memory grows with T^2.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, H = config.hidden_size, config.num_attention_heads
        self.n_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale()
        self.attn_impl = "sdpa"
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * config.v_head_dim, D, bias=False)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> per-head keys-and-values [B, T, H*(N+V)] from the normed latent, shared rope key [B, T, R]."""
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_b_proj(self.kv_a_layernorm(kv_latent)), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        H, N, R, V = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        interleave = self.config.rope_interleave

        # Heads are moved ahead of time as strided views; each cat below writes [B, H, T, N+R] in one pass.
        q = self.project_q(x).view(B, T, H, N + R).transpose(1, 2)  # [B, H, T, N+R] (view)
        q_nope, q_rope = q.split([N, R], dim=-1)

        kv, k_rope = self.project_kv(x)
        kv = kv.view(B, T, H, N + V).transpose(1, 2)
        k_nope, v = kv.split([N, V], dim=-1)

        q = torch.cat((q_nope, *rope_halves(q_rope, cos, sin, interleave, seq_dim=2)), dim=-1)  # [B, H, T, N+R]
        k_rope = rope_halves(k_rope.view(B, 1, T, R), cos, sin, interleave, seq_dim=2)  # one key for all heads
        k = torch.cat((k_nope, *(r.expand(B, H, T, R // 2) for r in k_rope)), dim=-1)
        out = self.attention_core(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * V))

    def attention_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal softmax(q k^T) v: q, k [B, H, T, N+R], v [B, H, T, V] -> [B, H, T, V]. A method of its own
        (like `project_q`, `project_kv`) so it can be wrapped from outside, e.g. by activation checkpointing."""
        if self.attn_impl == "eager":
            return self._eager(q, k, v)
        if self.attn_impl == "sdpa":
            # SDPA's fused kernels want equal qk and v head dims; zero-padding v and slicing the output is
            # exact and faster than the math fallback (cpu-performance-notes.md).
            V, pad = v.shape[-1], q.shape[-1] - v.shape[-1]
            if pad > 0:
                v = F.pad(v, (0, pad))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            return out[..., :V] if pad > 0 else out
        raise ValueError(f"unknown attention impl {self.attn_impl!r}; choose from {ATTN_IMPLS}")

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention with batched matmuls: q, k [B, H, T, N+R], v [B, H, T, V] -> [B, H, T, V]."""
        B, H, T, _ = q.shape
        # Under autocast baddbmm runs in the autocast dtype; build the mask there to skip a cast.
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        mask = torch.full((T, T), float("-inf"), dtype=dtype, device=q.device).triu_(1)
        scores = torch.baddbmm(mask.expand(B * H, T, T), q.reshape(B * H, T, -1),
                               k.reshape(B * H, T, -1).transpose(1, 2), alpha=self.softmax_scale)
        probs = scores.softmax(dim=-1)  # fp32 accumulation inside the kernel, stored in the scores' dtype
        return torch.bmm(probs, v.reshape(B * H, T, -1)).view(B, H, T, -1)
