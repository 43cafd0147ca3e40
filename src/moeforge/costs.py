"""What a config costs, computed analytically (no weights are allocated): parameters, training FLOPs per
token and KV-cache bytes per token. Backs `moeforge info` and lets one plan V3-sized runs on a laptop.

The counts mirror `moeforge.model` exactly (tests compare them with a built model), so they change
together: no biases, every RMSNorm has a weight, the router has a weight [E, D] and a bias *buffer*.
"""

from __future__ import annotations

from .config import ModelConfig


def _block(c: ModelConfig, moe: bool) -> dict[str, int]:
    """Parameters of one transformer block (MLA + dense MLP or MoE), split by kind."""
    D, H = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q, q_norm = D * H * c.qk_head_dim, 0
    else:
        q, q_norm = D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim, c.q_lora_rank
    attention = (q + D * (c.kv_lora_rank + c.qk_rope_head_dim)  # kv_a_proj_with_mqa
                 + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
                 + H * c.v_head_dim * D)  # o_proj
    out = dict(attention=attention, norms=q_norm + c.kv_lora_rank + 2 * D,
               dense_mlp=0, router=0, routed_experts=0, shared_experts=0)
    if moe:
        E, F = c.n_routed_experts, c.moe_intermediate_size
        out.update(router=E * D, routed_experts=E * 3 * D * F, shared_experts=3 * D * F * c.n_shared_experts)
    else:
        out["dense_mlp"] = 3 * D * c.intermediate_size
    return out


def _active_fraction(c: ModelConfig) -> float:
    return c.num_experts_per_tok / c.n_routed_experts if c.n_routed_experts else 0.0


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of the main model and of the MTP modules, by kind.

    `total` is the main model (embedding and lm_head included, MTP excluded), as papers report it.
    `activated` is what one token touches: total minus the unselected routed experts (x (1 - K/E)) and
    minus the input embedding table, of which a token reads one row (a tied table counts, as the head).
    That is the convention behind the published figures (V3 37B, V2 21B, V2-Lite 2.4B; keeping the
    table would give V2-Lite 2.66B); `activated_with_embedding` keeps it.
    `mtp` counts only the MTP modules' own weights (enorm, hnorm, eh_proj, block, norm): they share the
    main embedding and head. The released V3 checkpoint stores copies of both in its MTP layer, which is
    why its "14B MTP" figure equals `mtp_checkpoint` = mtp + embedding (~11.6B + ~1.85B).
    """
    c, D, V = config, config.hidden_size, config.vocab_size
    keys = ("attention", "norms", "dense_mlp", "router", "routed_experts", "shared_experts")
    counts = dict.fromkeys(keys, 0)
    for i in range(c.num_hidden_layers):
        for k, v in _block(c, moe=i >= c.first_k_dense_replace).items():
            counts[k] += v
    counts["norms"] += D  # final norm
    counts["embedding"] = V * D * (1 if c.tie_word_embeddings else 2)
    total = sum(counts.values())
    inactive = counts["routed_experts"] * (1 - _active_fraction(c))
    lookup = 0 if c.tie_word_embeddings else V * D

    # An MTP block has layer id >= num_hidden_layers >= first_k_dense_replace, so it is always MoE.
    mtp_block = _block(c, moe=True)
    mtp_one = 2 * D * D + 3 * D + sum(mtp_block.values())  # eh_proj, enorm/hnorm/norm, block
    n_mtp = c.num_nextn_predict_layers
    mtp_inactive = mtp_block["routed_experts"] * (1 - _active_fraction(c))
    return dict(counts, total=total, activated=round(total - inactive - lookup),
                activated_with_embedding=round(total - inactive), mtp=n_mtp * mtp_one,
                mtp_activated=round(n_mtp * (mtp_one - mtp_inactive)),
                mtp_checkpoint=n_mtp * (mtp_one + 2 * V * D))


def training_flops_per_token(config: ModelConfig, seq_len: int, include_mtp: bool = False) -> float:
    """Forward + backward FLOPs per trained token (backward = 2x forward, so 3x forward).

    Convention (as in "Insights into DeepSeek-V3", ISCA 2025, Table): 2 FLOPs per multiply-add for every
    matmul weight a token touches -- attention projections, dense MLP, router, shared and its K routed
    experts, and lm_head (= `activated` less the elementwise norm weights; the embedding is a gather) -- plus
    causal attention: QK^T and AV cost 2*H*(qk_head_dim + v_head_dim) per attended position per layer,
    over seq_len/2 positions on average. Softmax, activations and the MTP modules are left out unless
    `include_mtp` (each depth then adds eh_proj, one MoE block with its attention, and lm_head again).
    This gives ~250 GFLOPs for V3 and ~155 for V2 at seq_len 4096, the paper's figures.
    """
    c, D, V = config, config.hidden_size, config.vocab_size
    p = parameter_counts(c)
    frac = _active_fraction(c)
    matmul = p["activated"] - p["norms"]  # includes lm_head; the embedding lookup is free
    attn_per_layer = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (seq_len / 2)
    forward = 2 * matmul + c.num_hidden_layers * attn_per_layer
    if include_mtp and c.num_nextn_predict_layers:
        b = _block(c, moe=True)
        mtp = 2 * D * D + b["attention"] + b["router"] + b["shared_experts"] + b["routed_experts"] * frac + V * D
        forward += c.num_nextn_predict_layers * (2 * mtp + attn_per_layer)
    return 3.0 * forward


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """MLA caches only the latent c_kv and the shared RoPE key: (kv_lora_rank + rope dim) per layer."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype_bytes


def gqa_kv_cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """For comparison with dense GQA models: a K and a V vector per KV head per layer."""
    return 2 * kv_heads * head_dim * layers * dtype_bytes


def human_count(n: float) -> str:
    """671.0B, 2.4B, 350.2M, 12.3K: parameter counts at a glance."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def describe(config: ModelConfig, seq_len: int = 4096) -> dict:
    """Everything `format_info` shows, as numbers plus human-readable strings (for JSON output)."""
    p = parameter_counts(config)
    flops = training_flops_per_token(config, seq_len)
    kv = kv_cache_bytes_per_token(config)
    return dict(
        params=p, seq_len=seq_len, training_flops_per_token=flops, kv_cache_bytes_per_token_bf16=kv,
        layers=config.num_hidden_layers, dense_layers=min(config.first_k_dense_replace, config.num_hidden_layers),
        moe_layers=config.num_moe_layers, mtp_depth=config.num_nextn_predict_layers,
        experts=dict(routed=config.n_routed_experts, per_token=config.num_experts_per_tok,
                     shared=config.n_shared_experts, groups=config.n_group, topk_group=config.topk_group),
        human=dict(total=human_count(p["total"]), activated=human_count(p["activated"]),
                   mtp=human_count(p["mtp"]), gflops_per_token=f"{flops / 1e9:.4g}",
                   kv_cache_kb_per_token=f"{kv / 1000:.3f}"),
    )


def format_info(config: ModelConfig, seq_len: int = 4096, title: str | None = None) -> str:
    """A short aligned summary for `moeforge info`."""
    d, c = describe(config, seq_len), config
    h, p = d["human"], d["params"]
    pct = 100 * p["activated"] / p["total"]
    groups = f"{c.n_group}, top {c.topk_group} per token" if c.n_group > 1 else "none"
    rows = [
        ("parameters", f"{h['total']} total, {h['activated']} activated per token ({pct:.1f}%)"),
        ("MTP", f"{h['mtp']} in {c.num_nextn_predict_layers} module(s) (embedding/head shared)"
         if c.num_nextn_predict_layers else "none"),
        ("training", f"{h['gflops_per_token']} GFLOPs/token at seq_len {seq_len} (fwd+bwd, no MTP)"),
        ("KV cache", f"{h['kv_cache_kb_per_token']} KB/token at bf16 (MLA latent {c.kv_lora_rank} + rope "
                     f"{c.qk_rope_head_dim} per layer)"),
        ("layers", f"{c.num_hidden_layers} ({d['dense_layers']} dense + {d['moe_layers']} MoE), "
                   f"hidden {c.hidden_size}, {c.num_attention_heads} heads, vocab {c.vocab_size}"),
        ("experts", f"{c.n_routed_experts} routed, {c.num_experts_per_tok} per token, "
                    f"{c.n_shared_experts} shared, width {c.moe_intermediate_size}"),
        ("groups", groups),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)
