"""Model semantics beyond logits parity: routing rules, MTP, expert counts, the HF file layout."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moeforge
from moeforge.config import ModelConfig, PRESETS, preset
from moeforge.errors import CheckpointError
from moeforge.hf import dequantize_fp8_block, save_pretrained
from moeforge import Transformer  # the model with save_pretrained
from moeforge.model import Router


def router(**overrides):
    cfg = ModelConfig(**{**PRESETS["debug"], **overrides})
    r = Router(cfg)
    torch.nn.init.normal_(r.weight)
    return r


def test_bias_changes_selection_but_not_gate_weights():
    r = router(n_group=1, topk_group=1)
    x = torch.randn(64, r.weight.shape[1])
    w0, idx0, scores = r(x)
    target = 5
    r.e_score_correction_bias[target] = 10.0  # force expert 5 into every token's top-k
    w1, idx1, _ = r(x)
    assert (idx1 == target).any(dim=1).all()
    # Gate weights are the unbiased scores of the chosen experts, normalised.
    chosen = scores.gather(1, idx1)
    torch.testing.assert_close(w1, chosen / chosen.sum(1, keepdim=True))


def test_group_limited_routing_keeps_topk_groups():
    r = router(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    _, idx, _ = r(torch.randn(200, r.weight.shape[1]))
    groups_used = (idx // 2).sort(dim=1).values
    n_distinct = (groups_used[:, 1:] != groups_used[:, :-1]).sum(1) + 1
    assert (n_distinct <= 2).all()


def test_softmax_scoring_and_scaling():
    r = router(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=2.0, n_group=1, topk_group=1)
    x = torch.randn(10, r.weight.shape[1])
    w, idx, scores = r(x)
    torch.testing.assert_close(scores.sum(1), torch.ones(10))
    torch.testing.assert_close(w, 2.0 * scores.gather(1, idx))


def test_tokens_per_expert_counts_every_assignment():
    model = Transformer(preset("debug"))
    model(torch.randint(0, 256, (3, 20)))
    for _, moe in model.moe_layers():
        assert moe.tokens_per_expert.sum().item() == 3 * 20 * model.config.num_experts_per_tok


def test_mtp_loss_is_weighted_into_the_total():
    model = Transformer(preset("debug"))
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids[:, :-1], shift_labels=ids[:, 1:])
    assert out.mtp_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.mtp_loss_weight * out.mtp_loss)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_save_layout_mtp_keys_and_roundtrip(tmp_path):
    model = Transformer(preset("debug")).eval()
    with torch.no_grad():
        model.layers[1].mlp.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    L = model.config.num_hidden_layers
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"model.layers.{L}.eh_proj.weight" in keys and f"model.layers.{L}.shared_head.norm.weight" in keys
    assert f"model.layers.{L}.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    again = moeforge.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(ids, labels=ids), again(ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.mtp_loss, b.mtp_loss, atol=0, rtol=0)


def test_sharded_save_loads(tmp_path):
    model = Transformer(preset("debug")).eval()
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(moeforge.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_fp8_block_checkpoints_are_dequantised(tmp_path):
    model = Transformer(preset("debug")).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.0.mlp.gate_proj.weight"  # [128, 64]: not a whole number of 128-blocks on one side
    w = tensors[name]
    scale = torch.tensor([[w.abs().max() / 448.0]])
    tensors[name] = (w / scale).to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(path))
    loaded = moeforge.from_pretrained(tmp_path)
    expected = dequantize_fp8_block(tensors[name], scale)
    torch.testing.assert_close(loaded.layers[0].mlp.gate_proj.weight, expected)
    assert (expected - w).abs().max() <= w.abs().max() * 0.07  # E4M3 keeps ~3 mantissa bits


def test_dequantize_checks_block_shape():
    with pytest.raises(CheckpointError, match="does not match weight"):
        dequantize_fp8_block(torch.zeros(256, 130), torch.ones(2, 1))


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    Transformer(preset("debug")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        moeforge.from_pretrained(tmp_path)
    cfg["num_hidden_layers"] = 2
    cfg["num_nextn_predict_layers"] = 0
    cfg["moe_intermediate_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected"):
        moeforge.from_pretrained(tmp_path)


def test_big_presets_build_on_meta_device():
    with torch.device("meta"):
        model = Transformer(preset("v3"))
    assert 680e9 < model.num_parameters() < 690e9  # 671B main + ~14B MTP (embedding/head shared here)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_gradients_match_autograd_of_the_composite(dtype):
    """The hand-written SwiGLU backward (fused silu_backward) against autograd through silu(gate) * up,
    computed in fp32 as the kernel does."""
    from moeforge.model.norm import silu_mul

    torch.manual_seed(0)
    gate, up, g = (torch.randn(64, 48) * 3 for _ in range(3))
    a, b = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
    silu_mul(a, b).backward(g.to(dtype))
    ra, rb = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    (torch.nn.functional.silu(ra) * rb).backward(g.to(dtype).float())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(a.grad.float(), ra.grad.to(dtype).float(), **tol)
    torch.testing.assert_close(b.grad.float(), rb.grad.to(dtype).float(), **tol)
