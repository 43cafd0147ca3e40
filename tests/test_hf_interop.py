"""Checkpoints the outside world writes and reads: folders written by transformers' own DeepseekV3 and
DeepseekV2 models (the independent reference), DeepSeek's released layout (MTP layer, FP8 blocks), exports
that transformers reads back, tensor-for-tensor round trips, and corrupt checkpoints."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import moeforge
from moeforge.errors import CheckpointError
from moeforge.hf import dequantize_fp8_block

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
             first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=256, initializer_range=0.1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}
IDS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))

# transformers' defaults are kept where not overridden: V3 num_nextn_predict_layers=1 (never built or saved),
# routed_scaling_factor 2.5, n_group 8 (so set here), norm_topk_prob True.
V3_CASES = {
    # Only the eps differs from the defaults the older tests used: q_a/kv_a_layernorm keep eps 1e-6.
    "eps-1e-3-only": dict(rms_norm_eps=1e-3, q_lora_rank=16, n_group=1, topk_group=1, num_nextn_predict_layers=0),
    "odd-eps-1e-3-q-lora-groups": dict(rms_norm_eps=1e-3, q_lora_rank=16, n_group=4, topk_group=2),
    "eps-1e-5-yarn-two-dense": dict(rms_norm_eps=1e-5, q_lora_rank=32, n_group=2, topk_group=1,
                                    first_k_dense_replace=2, rope_parameters=YARN),
    "no-q-lora-all-moe-halves": dict(n_group=1, topk_group=1, first_k_dense_replace=0, rope_interleave=False,
                                     norm_topk_prob=False, n_shared_experts=2),
}
V2_CASES = {
    "greedy-groups-ignored": dict(topk_method="greedy", n_group=4, topk_group=1, routed_scaling_factor=2.0,
                                  rms_norm_eps=1e-5, q_lora_rank=16, n_shared_experts=0),
    "group-limited-yarn": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                               rope_parameters=YARN, first_k_dense_replace=2),
}


def hf_v3(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # non-zero routing biases so that selection and gate weights differ
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def hf_v2(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**{**SMALL, **overrides})).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def tensors_of(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a, b, allow_extra=()):
    assert sorted(set(a) - set(allow_extra)) == sorted(set(b) - set(allow_extra))
    for k in a:
        if k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", V3_CASES)
def test_v3_folder_from_transformers_matches_its_logits_and_round_trips(case, tmp_path, caplog):
    hf = hf_v3(**V3_CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    declared = json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"]
    with caplog.at_level(logging.WARNING, logger="moeforge.hf"):
        ours = moeforge.from_pretrained(tmp_path / "hf")
    assert ("without the MTP module" in caplog.text) == (declared > 0) and len(ours.mtp) == 0
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-4, rtol=0)

    ours.save_pretrained(tmp_path / "out")
    assert_same_tensors(tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "out"))
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(back), logits(hf), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", V2_CASES)
def test_v2_folder_from_transformers_matches_its_logits_and_round_trips(case, tmp_path):
    hf = hf_v2(**V2_CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = moeforge.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-4, rtol=0)

    ours.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deepseek_v2"
    assert_same_tensors(tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "out"))
    back = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(back), logits(hf), atol=1e-4, rtol=0)


def test_sharded_bf16_folder_loads_in_bf16_and_fp32_and_round_trips(tmp_path):
    hf_v3(q_lora_rank=16, n_group=2, topk_group=1).save_pretrained(tmp_path / "fp32")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    files = tensors_of(tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    assert files["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # transformers keeps routing fp32

    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(moeforge.from_pretrained(tmp_path / "hf")), logits(ref), atol=1e-4, rtol=0)

    ours = moeforge.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    dtypes = {n: t.dtype for n, t in ours.state_dict().items()}
    assert dtypes["layers.1.mlp.gate.weight"] == dtypes["layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["layers.1.mlp.experts.gate_up_proj"] == dtypes["embed_tokens.weight"] == torch.bfloat16
    ours.save_pretrained(tmp_path / "out", max_shard_bytes=40_000)
    assert_same_tensors(files, tensors_of(tmp_path / "out"))


def add_mtp_layer(folder, config_overrides):
    """DeepSeek's released layout: a transformers model with one layer more, whose last layer becomes the MTP
    layer (its block), plus enorm/hnorm/eh_proj/shared_head and the copies of the embedding and head."""
    cfg = json.loads((folder / "config.json").read_text())
    L = cfg["num_hidden_layers"] - 1
    tensors = tensors_of(folder)
    g = torch.Generator().manual_seed(3)
    D = cfg["hidden_size"]
    tensors.update({f"model.layers.{L}.enorm.weight": 1 + 0.1 * torch.randn(D, generator=g),
                    f"model.layers.{L}.hnorm.weight": 1 + 0.1 * torch.randn(D, generator=g),
                    f"model.layers.{L}.eh_proj.weight": 0.1 * torch.randn(D, 2 * D, generator=g),
                    f"model.layers.{L}.shared_head.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
                    f"model.layers.{L}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                    f"model.layers.{L}.shared_head.head.weight": tensors["lm_head.weight"].clone()})
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_hidden_layers=L, num_nextn_predict_layers=1, **config_overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    return tensors, L


def test_released_layout_with_mtp_loads_round_trips_and_partial_mtp_is_an_error(tmp_path):
    overrides = dict(n_group=2, topk_group=1, rms_norm_eps=1e-5)
    hf_v3(**{**overrides, "num_hidden_layers": 4}).save_pretrained(tmp_path / "hf")
    tensors, L = add_mtp_layer(tmp_path / "hf", {})
    main = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()  # ignores the MTP layer

    ours = moeforge.from_pretrained(tmp_path / "hf")
    assert len(ours.mtp) == 1
    torch.testing.assert_close(logits(ours), logits(main), atol=1e-4, rtol=0)
    assert torch.equal(ours.mtp[0].eh_proj.weight, tensors[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(ours.mtp[0].block.mlp.experts.down_proj[5], tensors[f"model.layers.{L}.mlp.experts.5.down_proj.weight"])
    with torch.no_grad():
        assert torch.isfinite(ours(IDS, labels=IDS).mtp_loss)
    ours.save_pretrained(tmp_path / "out")
    assert_same_tensors(tensors, tensors_of(tmp_path / "out"))

    del tensors[f"model.layers.{L}.eh_proj.weight"], tensors[f"model.layers.{L}.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"incomplete MTP.*layers\.{L}\.(eh_proj|mlp\.experts\.2\.up_proj)"):
        moeforge.from_pretrained(tmp_path / "hf")


def test_tied_embeddings_with_mtp_export_to_transformers_and_back(tmp_path):
    config = moeforge.preset("debug")
    config.tie_word_embeddings, config.n_group, config.topk_group = True, 1, 1
    model = moeforge.Transformer(config.validate()).eval()
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    model.save_pretrained(tmp_path)  # was KeyError: 'lm_head.weight'

    saved = tensors_of(tmp_path)
    L = config.num_hidden_layers
    assert "lm_head.weight" not in saved and f"model.layers.{L}.shared_head.head.weight" in saved
    assert torch.equal(saved["model.layers.1.mlp.gate.e_score_correction_bias"],
                       model.layers[1].mlp.gate.e_score_correction_bias)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-4, rtol=0)

    again = moeforge.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.embed_tokens.weight
    with torch.no_grad():
        a, b = model(ids, labels=ids), again(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)
    torch.testing.assert_close(b.mtp_loss, a.mtp_loss, atol=0, rtol=0)


def reference_block_dequant(w, scale, block=128):
    """A straightforward per-block loop: block (i, j) of the fp32 weight is the FP8 block times its scale."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = w[rows, cols].to(torch.float32) * scale[i, j].item()
    return out


def quantize_blocks(w, block=128):
    """Per-block E4M3 quantisation the way DeepSeek's FP8 release stores it (weight, weight_scale_inv)."""
    rb, cb = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.empty(rb, cb)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_dequantisation_matches_a_per_block_loop_with_partial_edge_blocks():
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(5))  # 3 x 3 blocks, partial edges
    q, scale = quantize_blocks(w)
    torch.testing.assert_close(dequantize_fp8_block(q, scale), reference_block_dequant(q, scale), atol=0, rtol=0)


def test_fp8_folder_loads_as_transformers_on_the_dequantised_weights(tmp_path):
    hf = hf_v3(n_group=2, topk_group=1, intermediate_size=300, vocab_size=200, q_lora_rank=16)
    hf.save_pretrained(tmp_path / "hf")
    tensors = tensors_of(tmp_path / "hf")
    dequantised = dict(tensors)
    for name, w in list(tensors.items()):  # as in DeepSeek's release: linear weights, not norms/embedding/head/router
        if w.ndim == 2 and "norm" not in name and "embed" not in name and "lm_head" not in name and ".gate." not in name:
            q, scale = quantize_blocks(w)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            dequantised[name] = reference_block_dequant(q, scale)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn  # [64, 300]: 1 x 3 blocks
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(tmp_path / "hf", tmp_path / "deq")
    (tmp_path / "deq" / "model.safetensors").unlink()
    del cfg["quantization_config"]
    (tmp_path / "deq" / "config.json").write_text(json.dumps(cfg))
    save_file(dequantised, str(tmp_path / "deq" / "model.safetensors"))
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq").eval()

    ours = moeforge.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.layers[0].mlp.down_proj.weight, dequantised["model.layers.0.mlp.down_proj.weight"],
                               atol=0, rtol=0)


# --- corrupt checkpoints -----------------------------------------------------------------------------
def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tmp_path_factory):
    from conftest import small_run
    from moeforge.train import Trainer

    tmp = tmp_path_factory.mktemp("run")
    Trainer(small_run(tmp, steps=4, save_every=2, eval_every=0)).fit()
    return tmp / "run"


@pytest.fixture
def corrupt_run(run_with_two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_with_two_checkpoints, run)
    newest = run / "checkpoints" / "step-000004"
    truncate(newest / "model.safetensors")
    return run, newest


def test_truncated_safetensors_names_the_file(corrupt_run):
    _, newest = corrupt_run
    with pytest.raises(CheckpointError) as e:
        moeforge.from_pretrained(newest)
    assert str(newest / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_run_folder_falls_back_to_the_newest_intact_checkpoint(corrupt_run, caplog):
    run, newest = corrupt_run
    intact = moeforge.from_pretrained(run / "checkpoints" / "step-000002")
    with caplog.at_level(logging.WARNING, logger="moeforge.checkpoint"):
        model = moeforge.from_pretrained(run)
    assert "step-000004" in caplog.text and "using step-000002" in caplog.text
    assert torch.equal(logits(model, IDS % 256), logits(intact, IDS % 256))


def test_generate_and_serve_fall_back_too(corrupt_run, caplog):
    from moeforge.cli import main
    from moeforge.inference.cli import load_for_inference

    run, _ = corrupt_run
    assert main(["generate", "--checkpoint", str(run), "--prompt", "ab", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert "using step-000002" in caplog.text
    _, _, _, folder = load_for_inference(str(run), None, "cpu")
    assert folder.name == "step-000002"


def test_resume_falls_back_and_all_corrupt_is_one_clear_error(corrupt_run):
    from conftest import small_run
    from moeforge.train import Trainer

    run, _ = corrupt_run
    zipped = run / "checkpoints" / "step-000002" / "trainer_state.pt"
    trainer = Trainer(small_run(run.parent, steps=6, save_every=2, eval_every=0), resume=True)
    assert trainer.step == 2
    truncate(zipped)
    with pytest.raises(CheckpointError, match=r"all 2 checkpoint\(s\) are corrupt"):
        Trainer(small_run(run.parent, steps=6, eval_every=0), resume=True)


# --- one direction of dependency ---------------------------------------------------------------------
SRC_ROOT = Path(moeforge.__file__).parent.parent


def imported_modules(path):
    """Every module a file imports, function-local imports included, as absolute `moeforge.` names."""
    import ast

    package = ".".join(path.relative_to(SRC_ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_hf_layer_depends_on_the_model_never_the_reverse(tmp_path):
    for path in (SRC_ROOT / "moeforge" / "model").glob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith(("moeforge.hf", "moeforge.checkpoint"))}
        assert not bad, f"{path.name} imports {bad}"
    assert not {m for m in imported_modules(SRC_ROOT / "moeforge" / "hf.py") if m.startswith("moeforge.checkpoint")}
    assert not hasattr(moeforge.model.Transformer, "save_pretrained")
    model = moeforge.Transformer(moeforge.preset("debug"))  # the public class keeps save/from_pretrained
    model.save_pretrained(tmp_path)
    assert isinstance(moeforge.Transformer.from_pretrained(tmp_path), moeforge.model.Transformer)
