import pytest
import torch

from moeforge import Transformer
from moeforge.config import ModelConfig, preset
from moeforge.costs import (describe, format_info, gqa_kv_cache_bytes_per_token, kv_cache_bytes_per_token,
                            parameter_counts, training_flops_per_token)

# DeepSeek-V2 (236B), from its Hugging Face config: not a preset, only a check on the FLOP convention.
V2 = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
          num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, n_routed_experts=160,
          n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3, q_lora_rank=1536, kv_lora_rank=512,
          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, scoring_func="softmax", norm_topk_prob=False,
          routed_scaling_factor=16.0, max_position_embeddings=163840)


def v2() -> ModelConfig:
    return ModelConfig(**V2).validate()


def count(model, prefix=None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if prefix is None or n.startswith(prefix))


def test_counts_match_a_real_model():
    cfg = preset("debug")
    model = Transformer(cfg)
    p = parameter_counts(cfg)
    assert p["total"] + p["mtp"] == count(model)
    assert p["mtp"] == count(model, "mtp.")
    assert p["routed_experts"] == sum(e.numel() for n, e in model.named_parameters()
                                      if n.startswith("layers.") and ".experts." in n)
    parts = ("embedding", "attention", "norms", "dense_mlp", "router", "routed_experts", "shared_experts")
    assert sum(p[k] for k in parts) == p["total"]


@pytest.mark.parametrize("change", [{}, dict(q_lora_rank=None, n_shared_experts=0), dict(tie_word_embeddings=True),
                                    dict(first_k_dense_replace=0, num_nextn_predict_layers=2)])
def test_counts_match_a_meta_model(change):
    cfg = ModelConfig(**{**preset("tiny").to_dict(), **change}).validate()
    with torch.device("meta"):
        model = Transformer(cfg)
    p = parameter_counts(cfg)
    assert p["total"] + p["mtp"] == count(model)  # named_parameters counts a tied weight once
    assert p["mtp"] == count(model, "mtp.")


def test_deepseek_v3_published_sizes():
    p = parameter_counts(preset("v3"))
    assert p["total"] == pytest.approx(671e9, rel=0.01)
    assert p["activated"] == pytest.approx(37e9, rel=0.03)
    # The paper's 14B MTP and the 685B checkpoint include the MTP layer's copies of embedding and head.
    assert p["mtp_checkpoint"] == p["mtp"] + p["embedding"]
    assert p["mtp_checkpoint"] == pytest.approx(14e9, rel=0.05)
    assert p["total"] + p["mtp_checkpoint"] == pytest.approx(685e9, rel=0.01)


def test_deepseek_v2_published_sizes():
    lite = parameter_counts(preset("v2-lite"))
    assert lite["total"] == pytest.approx(15.7e9, rel=0.05)
    assert lite["activated"] == pytest.approx(2.4e9, rel=0.05)
    assert lite["mtp"] == 0
    big = parameter_counts(v2())
    assert big["total"] == pytest.approx(236e9, rel=0.01)
    assert big["activated"] == pytest.approx(21e9, rel=0.03)


def test_training_flops_match_insights_paper():
    """"Insights into DeepSeek-V3" (ISCA 2025): 250 and 155 GFLOPs per token at sequence length 4096."""
    assert training_flops_per_token(preset("v3"), 4096) == pytest.approx(250e9, rel=0.03)
    assert training_flops_per_token(v2(), 4096) == pytest.approx(155e9, rel=0.03)


def test_flops_grow_with_context_and_mtp():
    cfg = preset("v3")
    base = training_flops_per_token(cfg, 4096)
    attention = 3 * cfg.num_hidden_layers * 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2048
    assert training_flops_per_token(cfg, 8192) - base == pytest.approx(attention)
    assert training_flops_per_token(cfg, 4096, include_mtp=True) > base
    assert training_flops_per_token(preset("v2-lite"), 4096, include_mtp=True) == training_flops_per_token(
        preset("v2-lite"), 4096)


def test_kv_cache_sizes():
    assert kv_cache_bytes_per_token(preset("v3")) == 70_272
    assert kv_cache_bytes_per_token(preset("v3"), dtype_bytes=1) == 35_136
    assert gqa_kv_cache_bytes_per_token(80, 8, 128) == 327_680  # Qwen-2.5 72B
    assert gqa_kv_cache_bytes_per_token(126, 8, 128) == 516_096  # LLaMA-3.1 405B


@pytest.mark.parametrize("name", ["debug", "tiny", "v2-lite", "v3"])
def test_describe_and_format_info(name):
    cfg = preset(name)
    d = describe(cfg)
    assert d["params"] == parameter_counts(cfg)
    assert d["kv_cache_bytes_per_token_bf16"] == kv_cache_bytes_per_token(cfg)
    text = format_info(cfg, title=name)
    lines = text.splitlines()
    assert lines[0] == name
    assert all(line[len("parameters") + 2] != " " for line in lines[1:])  # values start in one column
    for word in ("total", "activated", "GFLOPs/token", "KB/token", "layers", "experts", "groups"):
        assert word in text


def test_format_info_for_v3_reads_right():
    text = format_info(preset("v3"))
    assert "671.0B total" in text and "36.6B activated" in text
    assert "250.4 GFLOPs/token at seq_len 4096" in text
    assert "70.272 KB/token" in text
    assert "256 routed, 8 per token, 1 shared" in text
    assert "8, top 4" in text
