"""torchtitan's DeepSeek-V3 model as a benchmark peer: built from a moeforge `ModelConfig`, weights copied
from a moeforge `Transformer`.

Install: `pip install moeforge[bench]` (torchtitan with `--no-deps` semantics is not possible through an
extra, so the `bench` extra lists torchtitan and the pure-python packages its model files import; triton,
torchao and the GPU kernels are not needed). Two things keep it CPU-only and honest:

* **The triton import.** `torchtitan.models.common.moe` imports the token dispatchers, which import
  `torchtitan.distributed.minimal_async_ep`, whose kernels `import triton` at import time (a GPU-only
  expert-parallel all-to-all). `import_torchtitan` registers a stand-in for that one package, whose
  functions raise if called; nothing on a single-process run calls them (the local dispatcher is used).
  Everything else is torchtitan's own code, unmodified.
* **Attention.** torchtitan's language models accept `flex` or `varlen` attention only; flex runs through
  `torch.compile(flex_attention, max_autotune=True)` and varlen needs CUDA flash attention. The peer uses
  torchtitan's own `ScaledDotProductAttention` inner module (causal, no masks), the one its Flux model
  builds, so that the column times the eager model. (On CPU, SDPA takes its math path when the qk and v
  head dims differ, as they do in MLA.)

torchtitan's routed experts always compute in bf16 (`GroupedExperts.forward` casts x and the weights with
`.bfloat16()`), whatever the model's dtype: its fp32 row runs bf16 expert GEMMs (emulated, hence slow, on a
CPU without bf16 instructions), as torchtitan does.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

STUB = "torchtitan.distributed.minimal_async_ep"


def import_torchtitan():
    """-> the `torchtitan.models.deepseek_v3` package, or raise ImportError with the reason."""
    if STUB not in sys.modules:
        stub = types.ModuleType(STUB)
        stub.__doc__ = "stand-in (benchmarks/torchtitan_peer.py): the real module imports triton (GPU only)"

        def gpu_only(*args, **kwargs):
            raise RuntimeError(f"{STUB} needs triton and a GPU; not available in this CPU benchmark")

        for name in ("combine_op", "dispatch_op", "init_buffer", "maybe_update_minimal_async_ep_config",
                     "MinimalAsyncEPDispatchMetadata"):
            setattr(stub, name, gpu_only)
        sys.modules[STUB] = stub
    import torchtitan  # noqa: F401  (ImportError: not installed)
    from torchtitan.models import deepseek_v3

    return deepseek_v3


def version() -> str:
    from importlib.metadata import version as v

    return v("torchtitan")


def build(config, float8: bool = False) -> nn.Module:
    """A torchtitan `DeepSeekV3Model` with the shapes, routing and norms of moeforge `config` (fp32).
    `float8`: its linears swapped for torchao's Float8Linear by torchtitan's own `Float8LinearConverter`
    (see `float8_converter`) before the model is built, as a torchtitan FP8 run does."""
    dsv3 = import_torchtitan()
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.rope import ComplexRoPE

    c = config
    if c.rope_scaling is not None or not c.rope_interleave:
        raise ValueError("torchtitan peer: only plain interleaved RoPE is mapped (no YaRN)")
    rope = ComplexRoPE.Config(dim=c.qk_rope_head_dim, max_seq_len=c.max_position_embeddings, theta=c.rope_theta)
    layers = dsv3._build_dsv3_layers(
        n_layers=c.num_hidden_layers, n_dense_layers=c.first_k_dense_replace, dim=c.hidden_size,
        n_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        mscale=1.0, dense_hidden_dim=c.intermediate_size, moe_hidden_dim=c.moe_intermediate_size,
        num_experts=c.n_routed_experts, num_shared_experts=c.n_shared_experts, router_top_k=c.num_experts_per_tok,
        router_score_func=c.scoring_func, router_num_expert_groups=c.n_group if c.n_group > 1 else None,
        router_num_limited_groups=c.topk_group if c.n_group > 1 else None,
        router_route_scale=c.routed_scaling_factor, router_route_norm=c.norm_topk_prob,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None, rope=rope)
    for layer in layers:  # see the module docstring: eager SDPA rather than compiled flex attention
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    D, V = c.hidden_size, c.vocab_size
    model_cfg = dsv3.DeepSeekV3Model.Config(
        vocab_size=V, dim=D, tok_embeddings=dsv3.Embedding.Config(num_embeddings=V, embedding_dim=D),
        norm=dsv3.RMSNorm.Config(normalized_shape=D), layers=layers,
        lm_head=dsv3.Linear.Config(in_features=D, out_features=V), mtp_layers=[])
    if float8:
        model_cfg = float8_converter().convert(model_cfg)
    model = model_cfg.build()
    model.init_states(buffer_device=torch.device("cpu"))
    # torchtitan's RMSNorm eps defaults to 1e-5; the config's rms_norm_eps, and 1e-6 for MLA's latent norms
    # (as DeepSeek's reference, transformers and moeforge.model.mla do).
    for name, m in model.named_modules():
        if isinstance(m, nn.RMSNorm):
            m.eps = 1e-6 if name.endswith(("q_norm", "kv_norm")) else c.rms_norm_eps
    return model


def float8_status() -> str:
    """'' if torchtitan's FP8 training can run here; else why not."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"torchao not importable ({e}); pip install --no-deps torchao"
    return ""


def float8_converter():
    """torchtitan's FP8 linear converter as it runs without an SM89+ GPU: `emulate=True` (torchao's
    tensor-wise scaled FP8 with the matmul emulated; torchtitan's documented path for older hardware,
    eager only) and `filter_fqns=["lm_head", "router.gate"]` (what torchtitan's `deepseek_v3_671b_float8`
    config sets: head and router stay high precision). Routed experts are not converted: torchtitan's Float8 MoE converter needs an SM89+ GPU,
    and its experts compute in bf16 anyway."""
    import_torchtitan()
    from torchtitan.components.quantization.float8 import Float8LinearConverter

    return Float8LinearConverter(Float8LinearConverter.Config(emulate=True, filter_fqns=["lm_head", "router.gate"]))


def copy_weights(theirs: nn.Module, ours: nn.Module) -> None:
    """Copy every parameter (and the routing bias) of moeforge `ours` into torchtitan `theirs`; raise if any
    of theirs is left unset or a shape differs."""
    src = dict(ours.state_dict())
    mapped: dict[str, torch.Tensor] = {"tok_embeddings.weight": src.pop("embed_tokens.weight"),
                                       "norm.weight": src.pop("norm.weight"), "lm_head.weight": src.pop("lm_head.weight")}
    attn = {"q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "q_proj": "wq",
            "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
    mlp = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for i in range(len(ours.layers)):
        p = f"layers.{i}."
        for a, b in attn.items():
            if p + f"self_attn.{a}.weight" in src:
                mapped[p + f"attention.{b}.weight"] = src.pop(p + f"self_attn.{a}.weight")
        mapped[p + "attention_norm.weight"] = src.pop(p + "input_layernorm.weight")
        mapped[p + "ffn_norm.weight"] = src.pop(p + "post_attention_layernorm.weight")
        if p + "mlp.gate.weight" in src:
            mapped[p + "moe.router.gate.weight"] = src.pop(p + "mlp.gate.weight")
            mapped[p + "moe.expert_bias_E"] = src.pop(p + "mlp.gate.e_score_correction_bias")
            gate_up = src.pop(p + "mlp.experts.gate_up_proj")  # [E, 2F, D], gate rows first
            F_ = gate_up.shape[1] // 2
            inner = p + "moe.routed_experts.inner_experts."
            mapped[inner + "w1_EFD"], mapped[inner + "w3_EFD"] = gate_up[:, :F_], gate_up[:, F_:]
            mapped[inner + "w2_EDF"] = src.pop(p + "mlp.experts.down_proj")
            for a, b in mlp.items():
                mapped[p + f"moe.shared_experts.{b}.weight"] = src.pop(p + f"mlp.shared_experts.{a}.weight")
        else:
            for a, b in mlp.items():
                mapped[p + f"feed_forward.{b}.weight"] = src.pop(p + f"mlp.{a}.weight")
    target = theirs.state_dict()
    missing = [k for k in target if k not in mapped and "tokens_per_expert" not in k and "rope" not in k]
    if missing:
        raise KeyError(f"torchtitan peer: no moeforge weight for {missing[:5]}")
    with torch.no_grad():
        for k, v in mapped.items():
            if target[k].shape != v.shape:
                raise ValueError(f"torchtitan peer: {k} is {tuple(target[k].shape)}, moeforge {tuple(v.shape)}")
            target[k].copy_(v)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: `model.to(torch.float32)` would also cast the complex RoPE table to real (dropping
    its imaginary part, which silently breaks the positions)."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' labels=input_ids convention: position i scored on ids[:, i+1], T-1 positions."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
