"""Logits parity with the independent reference: transformers.DeepseekV3ForCausalLM."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeforge
from moeforge.hf import config_from_hf

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
            n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=1.0,
            max_position_embeddings=256, num_nextn_predict_layers=0, initializer_range=0.1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

CASES = {
    "plain-q": {},
    "q-lora-group-routing": dict(q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "all-moe-no-norm-yarn": dict(first_k_dense_replace=0, norm_topk_prob=False, rope_parameters=YARN,
                                 n_shared_experts=2),
    "halves-rope-two-dense": dict(rope_interleave=False, first_k_dense_replace=2, q_lora_rank=16),
}


def make_hf_model(overrides, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero routing biases so that selection and weights differ
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_and_roundtrip(case, tmp_path):
    hf_model = make_hf_model(CASES[case])
    hf_model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits

    ours = moeforge.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = ours(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    ours.save_pretrained(tmp_path / "export")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = back(ids).logits
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl,attn", [("grouped_mm", "eager"), ("bmm", "sdpa"), ("loop", "eager")])
def test_expert_and_attention_kernels_agree_with_transformers(impl, attn, tmp_path):
    hf_model = make_hf_model(CASES["q-lora-group-routing"])
    hf_model.save_pretrained(tmp_path)
    ours = moeforge.from_pretrained(tmp_path)
    for _, moe in ours.moe_layers():
        moe.experts.impl = impl
    for layer in ours.layers:
        layer.self_attn.attn_impl = attn
    ids = torch.randint(0, BASE["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, atol=1e-4, rtol=0)


def test_config_json_roundtrip(tmp_path):
    make_hf_model(CASES["all-moe-no-norm-yarn"]).save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.first_k_dense_replace == 0 and cfg.norm_topk_prob is False and cfg.n_shared_experts == 2
