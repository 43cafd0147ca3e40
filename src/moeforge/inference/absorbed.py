"""Incremental decoding of a trained `Transformer` with the latent KV cache, outside the model code.

The functions here read the model's own modules (embedding, norms, MLA projections, MoE / MLP, lm_head,
rotary table) and replace only the attention core, which now reads the cache:

  absorbed  DeepSeek-V3's decode path: W_UK (the key half of kv_b_proj) is folded into the query,
            q_lat = q_nope W_UK [H, C], so scores are q_lat . c_kv + q_rope . k_rope against the cached latent
            itself, and the output o_lat = sum_s p_s c_s [H, C] goes through W_UV (the value half) once.
            Keys and values are never materialised: per token and head the work is O(C) instead of
            re-expanding S cached latents to H x (N + V).
  naive     expand every cached latent with kv_b_proj at every step, then ordinary attention: the
            reference the absorbed path must match, and the cost it avoids.
  auto      whichever needs fewer multiply-adds for this call (`absorbed_is_cheaper`): absorbed for decode
            steps and short chunks, naive for long prefills (DeepSeek-V3's inference code does the same).

Shapes: B batch, T new tokens, S cached slots, H heads, N nope dim, R rope dim, V value dim, C kv_lora_rank,
D hidden.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from ..model.mla import MLA
from ..model.transformer import Block, MTPModule
from .kv_cache import LatentKVCache

ATTENTION_MODES = ("auto", "absorbed", "naive")


def absorbed_is_cheaper(attn: MLA, T: int) -> bool:
    """Per head and cached slot, absorbed attention costs T x (2C + R) multiply-adds (scores against the
    latent, then the latent-weighted sum); naive costs C x (N + V) to expand the slot once plus
    T x (N + R + V). The absorption matmuls themselves are O(T), not O(S), and are left out."""
    C, N, R, V = attn.kv_lora_rank, attn.nope_dim, attn.rope_dim, attn.v_dim
    return T * (2 * C + R) < C * (N + V) + T * (N + R + V)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on the last dim of x with cos/sin broadcastable to [..., R/2]; same pairing and output layout
    as `moeforge.model.rope.rope_halves`, but positions may differ per row (left padding)."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def cached_attention(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                     start: int, bias: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """MLA over x [B, T, D] whose tokens go into cache slots start..start+T-1 of `kv` [B, capacity, C+R]
    (one layer of a LatentKVCache); `bias` [B, T, S] is the additive mask. Returns [B, T, D]."""
    B, T, _ = x.shape
    H, N, R, V, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    interleave = attn.config.rope_interleave
    q = attn.project_q(x).view(B, T, H, N + R)
    q_nope, q_rope = q.split([N, R], dim=-1)
    q_rope = rotate(q_rope, cos[:, :, None], sin[:, :, None], interleave)  # [B, T, H, R]
    latent, k_rope = attn.kv_a_proj_with_mqa(x).split([C, R], dim=-1)
    # The cache holds what every later step needs: the normalised latent and the rotated shared key.
    kv[:, start:start + T, :C] = attn.kv_a_layernorm(latent)
    kv[:, start:start + T, C:] = rotate(k_rope, cos, sin, interleave)
    S = start + T
    cached = kv[:, :S]  # [B, S, C+R]
    w_kv = attn.kv_b_proj.weight.view(H, N + V, C)
    if mode == "auto":
        mode = "absorbed" if absorbed_is_cheaper(attn, T) else "naive"
    if mode == "absorbed":
        w_uk, w_uv = w_kv[:, :N], w_kv[:, N:]  # [H, N, C], [H, V, C]
        q_lat = torch.einsum("bthn,hnc->bhtc", q_nope, w_uk.to(q_nope.dtype))
        query = torch.cat((q_lat, q_rope.transpose(1, 2).to(q_lat.dtype)), dim=-1).reshape(B, H * T, C + R)
        scores = torch.bmm(query, cached.transpose(1, 2).to(query.dtype)).view(B, H, T, S)
        probs = (scores.float() * attn.softmax_scale + bias[:, None]).softmax(dim=-1)
        o_lat = torch.bmm(probs.view(B, H * T, S).to(cached.dtype), cached[..., :C]).view(B, H, T, C)
        out = torch.einsum("bhtc,hvc->bthv", o_lat, w_uv.to(o_lat.dtype))
    elif mode == "naive":
        k_nope, v = attn.kv_b_proj(cached[..., :C]).view(B, S, H, N + V).split([N, V], dim=-1)
        k = torch.cat((k_nope, cached[:, :, None, C:].expand(B, S, H, R).to(k_nope.dtype)), dim=-1)
        query = torch.cat((q_nope, q_rope.to(q_nope.dtype)), dim=-1)
        scores = torch.einsum("bthd,bshd->bhts", query, k)
        probs = (scores.float() * attn.softmax_scale + bias[:, None]).softmax(dim=-1)
        out = torch.einsum("bhts,bshv->bthv", probs.to(v.dtype), v)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; choose from {ATTENTION_MODES}")
    return attn.o_proj(out.reshape(B, T, H * V))


def block_step(block: Block, h: torch.Tensor, cos, sin, kv, start, bias, mode) -> torch.Tensor:
    """One decoder block (the model's own norms and MLP / MoE) with cached attention."""
    h = h + cached_attention(block.self_attn, block.input_layernorm(h), cos, sin, kv, start, bias, mode)
    return h + block.mlp(block.post_attention_layernorm(h))


def _rope_and_mask(model: Transformer, cache: LatentKVCache, mask: torch.Tensor):
    T = mask.shape[1]
    start, positions = cache.reserve(T, mask)
    if int(cache.positions.max()) > model.config.max_position_embeddings:
        raise ValueError(f"position {int(cache.positions.max())} exceeds max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    cos, sin = model.rotary(positions.flatten())
    B = mask.shape[0]
    cos, sin = cos.view(B, T, -1), sin.view(B, T, -1)
    return start, cos, sin, cache.attention_bias(start, T, torch.float32)


def forward_cached(model: Transformer, ids: torch.Tensor, cache: LatentKVCache, mask: torch.Tensor | None = None,
                   mode: str = "auto", embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ids [B, T] (prefill: the prompts, left-padded with mask [B, T] False on padding; decode: T=1
    or a few speculative tokens) through the main model, appending to `cache`. `embeds` [B, T, D], when
    given, are the input vectors instead of the ids' embeddings (media written over placeholders).
    Returns (logits [B, T, vocab], last hidden state before the final norm [B, T, D], for MTP)."""
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    start, cos, sin, bias = _rope_and_mask(model, cache, mask)
    h = model.embed_tokens(ids) if embeds is None else embeds
    for i, layer in enumerate(model.layers):
        h = block_step(layer, h, cos, sin, cache.kv[i], start, bias, mode)
    return model.lm_head(model.norm(h)), h


def prefill(model: Transformer, ids: torch.Tensor, cache: LatentKVCache, mask: torch.Tensor | None = None,
            mode: str = "auto", chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_cached` over the prompt in chunks of `chunk` tokens, so that attention scores take
    [B, H, chunk, S] memory rather than [B, H, T, T] (a long prompt would otherwise need T^2 x heads).
    Returns the last position's logits [B, 1, vocab] and all hidden states [B, T, D]."""
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    hidden, logits = [], None
    for i in range(0, ids.shape[1], chunk):
        logits, h = forward_cached(model, ids[:, i:i + chunk], cache, mask[:, i:i + chunk], mode)
        hidden.append(h)
    return logits[:, -1:], torch.cat(hidden, dim=1)


def forward_mtp(model: Transformer, module: MTPModule, h: torch.Tensor, next_ids: torch.Tensor,
                cache: LatentKVCache, mask: torch.Tensor | None = None, mode: str = "auto"):
    """One MTP depth over main-model hidden states h [B, T, D] (positions i) and the tokens at i+1
    (next_ids [B, T]), with its own one-layer cache. Returns (logits for the tokens at i+2, hidden)."""
    if mask is None:
        mask = torch.ones_like(next_ids, dtype=torch.bool)
    start, cos, sin, bias = _rope_and_mask(model, cache, mask)
    x = module.eh_proj(torch.cat((module.enorm(model.embed_tokens(next_ids)), module.hnorm(h)), dim=-1))
    x = block_step(module.block, x, cos, sin, cache.kv[0], start, bias, mode)
    return model.lm_head(module.norm(x)), x
