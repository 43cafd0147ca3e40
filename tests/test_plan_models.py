"""Model shapes for the planner, checked against published figures ("Insights into DeepSeek-V3", ISCA
2025, arXiv 2505.09343, Tables 1-2; model cards for parameter counts)."""

import json

import pytest

from moeforge.config import preset
from moeforge.costs import training_flops_per_token
from moeforge.errors import ConfigError
from moeforge.hf import config_to_hf
from moeforge.plan.models import PLAN_MODELS, load_model


def test_kv_cache_matches_insights_table_1():
    assert load_model("deepseek-v3").kv_cache_bytes_per_token == 70_272
    assert load_model("qwen2.5-72b").kv_cache_bytes_per_token == 327_680
    assert load_model("llama3.1-405b").kv_cache_bytes_per_token == 516_096


@pytest.mark.parametrize("name, gflops", [("deepseek-v3", 250), ("deepseek-v2", 155), ("llama3.1-405b", 2448)])
def test_training_flops_match_insights_table_2(name, gflops):
    assert load_model(name).train_flops_per_token(4096) == pytest.approx(gflops * 1e9, rel=0.03)


@pytest.mark.parametrize("name, total, active", [
    ("deepseek-v3", 671e9, 37e9), ("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9),
    ("llama3.1-405b", 405e9, None), ("qwen2.5-72b", 72.7e9, None)])
def test_parameter_counts_match_model_cards(name, total, active):
    m = load_model(name)
    assert m.total_params == pytest.approx(total, rel=0.02)
    if active:
        assert m.active_params == pytest.approx(active, rel=0.05)
    else:  # dense: everything but the embedding lookup is touched
        assert m.active_params == m.total_params - m.embedding_params


def test_moe_shape_agrees_with_costs_module():
    m = load_model("deepseek-v3")
    assert m.train_flops_per_token(8192) == training_flops_per_token(preset("v3"), 8192)
    assert m.kind == "moe" and m.moe_layers == 58 and m.dense_layers == 3
    # per-layer pieces add up to the total
    parts = (m.num_layers * m.attention_params + m.dense_layers * m.dense_mlp_params
             + m.moe_layers * (m.shared_expert_params + m.routed_expert_params)
             + m.embedding_params + m.head_params + m.norm_params)
    assert parts == m.total_params


def test_dense_flops_closed_form():
    m = load_model("llama3.1-405b")
    attn = 126 * 2 * 128 * 256 * 2048  # QK^T and AV over seq/2 positions, per token, forward
    assert m.train_flops_per_token(4096) == pytest.approx(3 * (2 * m.matmul_params_per_token + attn))


def test_hf_configs_load(tmp_path):
    llama = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2}
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(llama))
    m = load_model(str(tmp_path / "llama"))
    assert m.kind == "dense" and m.head_dim == 32 and m.kv_cache_bytes_per_token == 2 * 2 * 32 * 2 * 2
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config_to_hf(preset("tiny"))))
    assert load_model(str(ds)).total_params == load_model("tiny").total_params


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="choose one of: deepseek-v3"):
        load_model("gpt-5")
    assert "llama3.1-405b" in PLAN_MODELS
