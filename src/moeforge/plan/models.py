"""Model shapes for planning: DeepSeek MoE configs and dense GQA models (Llama, Qwen) in one flat record.

The planner never builds a model; it needs counts (parameters by where they live when sharded), FLOPs
per token, KV-cache bytes per token and activation bytes. `ModelShape` carries exactly that, so MoE and
dense models can be compared with the same code. MoE numbers come from `moeforge.costs` (tested against
a built model); dense GQA numbers are computed here with the same conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..config import PRESETS as MODEL_PRESETS
from ..config import ModelConfig, preset
from ..costs import _block, gqa_kv_cache_bytes_per_token, kv_cache_bytes_per_token, parameter_counts
from ..costs import training_flops_per_token as moe_training_flops
from ..errors import ConfigError


@dataclass(frozen=True)
class DenseGQA:
    """A dense decoder with grouped-query attention and a SwiGLU MLP (Llama, Qwen). HF field names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases (tiny; counted for completeness)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from any model. Parameter counts are of the main model (no MTP).

    Per-layer figures are averages for the kind of layer; `moe_layers` layers carry experts, the other
    `dense_layers` a dense MLP. Shapes legend: D hidden, H heads, E routed experts, K experts per token.
    """

    name: str
    kind: str  # "moe" or "dense"
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    dense_layers: int
    moe_layers: int
    num_heads: int  # H; TP must divide it
    num_kv_heads: int  # GQA KV heads (MLA: = H); TP must divide it too
    attention_params: int  # per layer (projections), any layer
    dense_mlp_params: int  # per dense layer
    shared_expert_params: int  # per MoE layer (shared experts + router)
    routed_expert_params: int  # per MoE layer, all E experts
    n_routed_experts: int  # E (1 for dense models)
    experts_per_token: int  # K (routed; 0 for dense)
    n_shared_experts: int
    expert_intermediate: int  # F
    dense_intermediate: int
    embedding_params: int  # input table
    head_params: int  # output head (0 if tied)
    norm_params: int  # all RMSNorm weights
    total_params: int
    active_params: int  # what a token touches, embedding lookup excluded (costs.parameter_counts convention)
    attn_core_flops_coeff: float  # forward attention-core FLOPs per token per attended position, all layers
    kv_cache_bytes_per_token: int  # BF16
    head_dim: int = 0  # GQA head dimension (MLA: see moe_config)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    moe_config: ModelConfig | None = field(default=None, compare=False)  # MoE: the full config (for costs.py)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward (3x forward), 2 FLOPs per MAC, causal attention over seq_len/2 positions on
        average, embedding lookup excluded, lm_head included (the "Insights into DeepSeek-V3" convention)."""
        return _train_flops(self, seq_len)

    def _train_flops_uncached(self, seq_len: int) -> float:
        if self.moe_config is not None:
            return moe_training_flops(self.moe_config, seq_len)
        return 3.0 * (2 * self.matmul_params_per_token + self.attn_core_flops_coeff * seq_len / 2)

    def attention_core_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs of QK^T and AV alone (run in BF16 even in FP8 training)."""
        return 3.0 * self.attn_core_flops_coeff * seq_len / 2

    @property
    def matmul_params_per_token(self) -> int:
        return self.active_params - self.norm_params

    def kv_cache_bytes(self, dtype_bytes: int = 2) -> int:
        return self.kv_cache_bytes_per_token * dtype_bytes // 2


@lru_cache(maxsize=256)
def _train_flops(shape: ModelShape, seq_len: int) -> float:  # the planner asks thousands of times
    return shape._train_flops_uncached(seq_len)


# --- builders ----------------------------------------------------------------------------------------
def from_moe(config: ModelConfig, name: str) -> ModelShape:
    """A DeepSeek-style MoE/MLA config (moeforge.config.ModelConfig)."""
    c = config
    p = parameter_counts(c)
    moe = _block(c, moe=True)
    dense = _block(c, moe=False)
    return ModelShape(
        name=name, kind="moe", vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        dense_layers=c.num_hidden_layers - c.num_moe_layers, moe_layers=c.num_moe_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
        attention_params=moe["attention"], dense_mlp_params=dense["dense_mlp"],
        shared_expert_params=moe["shared_experts"] + moe["router"], routed_expert_params=moe["routed_experts"],
        n_routed_experts=c.n_routed_experts, experts_per_token=c.num_experts_per_tok,
        n_shared_experts=c.n_shared_experts, expert_intermediate=c.moe_intermediate_size,
        dense_intermediate=c.intermediate_size, embedding_params=c.vocab_size * c.hidden_size,
        head_params=0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size, norm_params=p["norms"],
        total_params=p["total"], active_params=p["activated"],
        attn_core_flops_coeff=c.num_hidden_layers * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(c), q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, moe_config=c)


def from_dense(m: DenseGQA, name: str) -> ModelShape:
    """A dense GQA model: q, k, v, o projections and a SwiGLU MLP per layer, two norms per layer."""
    D, H, KV, hd, L = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.num_hidden_layers
    if H % KV:
        raise ConfigError(f"{name}: num_key_value_heads={KV} must divide num_attention_heads={H}")
    attention = D * H * hd + 2 * D * KV * hd + H * hd * D + (H * hd + 2 * KV * hd if m.attention_bias else 0)
    mlp = 3 * D * m.intermediate_size
    norms = 2 * D * L + D
    table = m.vocab_size * D
    head = 0 if m.tie_word_embeddings else table
    total = L * (attention + mlp) + norms + table + head
    return ModelShape(
        name=name, kind="dense", vocab_size=m.vocab_size, hidden_size=D, num_layers=L, dense_layers=L, moe_layers=0,
        num_heads=H, num_kv_heads=KV, attention_params=attention, dense_mlp_params=mlp, shared_expert_params=0,
        routed_expert_params=0, n_routed_experts=1, experts_per_token=0, n_shared_experts=0, expert_intermediate=0,
        dense_intermediate=m.intermediate_size, embedding_params=table, head_params=head, norm_params=norms,
        total_params=total, active_params=total - (0 if m.tie_word_embeddings else table),
        attn_core_flops_coeff=L * 2 * H * (2 * hd),
        kv_cache_bytes_per_token=gqa_kv_cache_bytes_per_token(L, KV, hd), head_dim=hd)


# --- presets -----------------------------------------------------------------------------------------
# DeepSeek-V2 (236B), HF deepseek-ai/DeepSeek-V2 config.json (same numbers as the facts file table).
V2 = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
          num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, n_routed_experts=160,
          n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3, q_lora_rank=1536, kv_lora_rank=512,
          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, scoring_func="softmax", norm_topk_prob=False,
          routed_scaling_factor=16.0, max_position_embeddings=163840)

DENSE_PRESETS: dict[str, DenseGQA] = {
    # meta-llama/Llama-3.1-405B config.json (The Llama 3 Herd of Models, arXiv 2407.21783, Table 3).
    "llama3.1-405b": DenseGQA(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                              num_attention_heads=128, num_key_value_heads=8, head_dim=128),
    # Qwen/Qwen2.5-72B config.json (Qwen2.5 Technical Report, arXiv 2412.15115, Table 1).
    "qwen2.5-72b": DenseGQA(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, head_dim=128, attention_bias=True),
}

# Planner names -> moeforge presets / V2; moeforge's own preset names work too.
MOE_PRESETS = {"deepseek-v3": "v3", "deepseek-v2-lite": "v2-lite", "deepseek-v2": None}
PLAN_MODELS = ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "llama3.1-405b", "qwen2.5-72b",
               *MODEL_PRESETS)


def load_model(name_or_path: str) -> ModelShape:
    """A preset name (see PLAN_MODELS) or a Hugging Face config.json (file or folder holding one)."""
    if name_or_path in DENSE_PRESETS:
        return from_dense(DENSE_PRESETS[name_or_path], name_or_path)
    if name_or_path == "deepseek-v2":
        return from_moe(ModelConfig(**V2).validate(), name_or_path)
    if name_or_path in MOE_PRESETS:
        return from_moe(preset(MOE_PRESETS[name_or_path]), name_or_path)
    if name_or_path in MODEL_PRESETS:
        return from_moe(preset(name_or_path), name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"unknown model {name_or_path!r}; choose one of: {', '.join(PLAN_MODELS)}, "
                          "or a Hugging Face config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_dict(d, name=str(path))


def from_hf_dict(d: dict, name: str = "config.json") -> ModelShape:
    """DeepSeek V2/V3 configs go through moeforge.hf.config_from_hf; Llama/Qwen/Mistral-style dense ones
    map onto DenseGQA."""
    model_type = str(d.get("model_type", ""))
    if model_type.startswith("deepseek") or "kv_lora_rank" in d:
        from ..hf import config_from_hf

        return from_moe(config_from_hf(d), name)
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in needed if k not in d]
    if missing:
        raise ConfigError(f"{name}: model_type {model_type!r} lacks {', '.join(missing)} (dense GQA fields)")
    if d.get("num_local_experts") or d.get("num_experts"):
        raise ConfigError(f"{name}: only DeepSeek MoE and dense GQA configs are supported, not {model_type!r}")
    heads = int(d["num_attention_heads"])
    return from_dense(DenseGQA(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2"))), name)
