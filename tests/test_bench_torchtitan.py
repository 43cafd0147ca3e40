"""benchmarks/torchtitan_peer.py maps every moeforge weight onto torchtitan's DeepSeek-V3 model: with
torchtitan's experts kept in fp32 the two models' logits agree (skipped where torchtitan is absent)."""

import sys
from pathlib import Path

import pytest
import torch

from moeforge.config import ModelConfig
from moeforge.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
torchtitan_peer = pytest.importorskip("torchtitan_peer")
try:
    torchtitan_peer.import_torchtitan()
except ImportError as e:
    pytest.skip(f"torchtitan not installed ({e})", allow_module_level=True)


def small_config(head_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                       q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=head_dim, qk_nope_head_dim=head_dim,
                       v_head_dim=head_dim, max_position_embeddings=64)


def test_torchtitan_logits_match_moeforge_with_the_same_weights(monkeypatch):
    config = small_config(8)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    with torch.no_grad():  # a non-zero routing bias, so that a dropped bias would show
        for _, moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    theirs = torchtitan_peer.build(config)
    torchtitan_peer.copy_weights(theirs, ours)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    # torchtitan's GroupedExperts casts to bf16 whatever the model dtype; keep fp32 for an exact comparison.
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids), ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_torchtitan_float8_converts_its_linears_and_keeps_the_weights():
    """The fp8 row's torchtitan model: torchtitan's own Float8LinearConverter (torchao, emulated here) swaps the
    attention, dense and shared-expert linears (not the head, the router or the routed experts) and the copied
    weights give logits close to the unconverted model's."""
    pytest.importorskip("torchao.float8", reason="torchao not installed (the fp8 row's torchtitan column)")
    config = small_config(16)  # torchao's filter converts only linears whose dims are multiples of 16
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    plain, fp8 = torchtitan_peer.build(config), torchtitan_peer.build(config, float8=True)
    for m in (plain, fp8):
        torchtitan_peer.copy_weights(m, ours)
    converted = {n for n, m in fp8.named_modules() if type(m).__name__ == "Float8Linear"}
    assert "layers.0.attention.wq_a" in converted and "layers.1.moe.shared_experts.w1" in converted
    assert not any(n.startswith("lm_head") or "router" in n or "moe.experts" in n for n in converted)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain.eval()(ids), fp8.eval()(ids)
    assert not torch.equal(a, b)  # FP8 rounding happened
    assert float((a - b).norm() / a.norm()) < 0.1
