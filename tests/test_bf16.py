"""Pure bf16 weights (no autocast) end to end, against transformers' DeepseekV3ForCausalLM loaded in bf16.

A tiny random model is chaotic (one token that flips an expert moves its logits a lot), so the bf16 model
is compared with transformers' bf16 model, not with fp32: on the same weights both must make the same
routing decisions and give the same logits up to bf16 rounding.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeforge  # noqa: E402
from moeforge.config import preset  # noqa: E402
from moeforge.data import ByteTokenizer  # noqa: E402
from moeforge.generate import generate as full_forward_generate  # noqa: E402
from moeforge.inference import LatentKVCache, SamplingParams, forward_cached, generate  # noqa: E402
from moeforge.inference.speculative import MTPSpeculativeDecoder  # noqa: E402
from moeforge.model import Router  # noqa: E402
from moeforge import Transformer  # noqa: E402  (the model with Hugging Face I/O)

BF16 = torch.bfloat16
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, n_group=1,
             topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=1.0, max_position_embeddings=256,
             num_nextn_predict_layers=0, initializer_range=0.1)
CASES = {
    "plain-q": {},
    "q-lora-groups-scaled": dict(q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=2.5),
}


@pytest.fixture(autouse=True)
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def hf_checkpoint(overrides, path, seed=0):
    """A random transformers model (non-zero routing biases) saved in fp32 to `path`."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def record_routing(model, hf: bool):
    """Forward hooks appending each router's expert ids [N, K] (sorted per token) to a list."""
    seen = []
    if hf:
        routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        pick = 2  # (router_logits, topk_weights, topk_indices)
    else:
        routers = [m for m in model.modules() if isinstance(m, Router)]
        pick = 1  # (weights, indices, scores)
    for r in routers:
        r.register_forward_hook(lambda m, args, out: seen.append(out[pick].sort(dim=-1).values))
    return seen


@pytest.mark.parametrize("case", CASES)
def test_bf16_model_matches_transformers_bf16(case, tmp_path):
    path = hf_checkpoint(CASES[case], tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=BF16).eval()
    ours = moeforge.from_pretrained(path, dtype=BF16)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    their_routes, our_routes = record_routing(theirs, hf=True), record_routing(ours, hf=False)
    with torch.no_grad():
        ref, got = theirs(ids).logits, ours(ids).logits
    assert got.dtype == BF16
    assert len(our_routes) == len(their_routes) > 0
    for a, b in zip(our_routes, their_routes):
        assert torch.equal(a, b)  # the same experts for every token in every layer
    # bf16 rounding of different (equally valid) op orders: a few units in the last place of the largest logit.
    torch.testing.assert_close(got.float(), ref.float(), atol=8 * 2**-8 * float(ref.abs().max()), rtol=0)


def test_bf16_gradients_and_adamw_step_match_transformers(tmp_path):
    path = hf_checkpoint(CASES["plain-q"], tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=BF16).train()
    ours = moeforge.from_pretrained(path, dtype=BF16).train()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    their_loss = theirs(input_ids=ids, labels=ids, use_cache=False).loss
    our_loss = ours(ids, labels=ids).loss
    their_loss.backward()
    our_loss.backward()
    torch.testing.assert_close(our_loss.float(), their_loss.float(), atol=1e-2, rtol=0)
    theirs_by_name = {k.removeprefix("model."): p for k, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name
        ref = theirs_by_name[name].grad.float()
        cos = torch.nn.functional.cosine_similarity(p.grad.float().flatten(), ref.flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))
    before = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    torch.optim.AdamW(ours.parameters(), lr=1e-2).step()
    for name, p in ours.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name
    assert ours.layers[1].mlp.gate.weight.dtype == torch.float32


def test_routing_does_not_depend_on_the_weights_dtype():
    config = preset("debug")
    config.n_group, config.topk_group = 4, 2
    fp32 = Transformer(config.validate())
    with torch.no_grad():
        for _, moe in fp32.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    casts = {"to": copy.deepcopy(fp32).to(BF16), "bfloat16": copy.deepcopy(fp32).bfloat16(),
             "half": copy.deepcopy(fp32).half()}
    x = torch.randn(4096, config.hidden_size).to(BF16)  # one router input, exactly representable in bf16
    for how, model in casts.items():
        for (_, moe32), (_, moe) in zip(fp32.moe_layers(), model.moe_layers()):
            assert moe.gate.weight.dtype == moe.gate.e_score_correction_bias.dtype == torch.float32, how
            w32, i32, _ = moe32.gate(x)
            w, i, _ = moe.gate(x)
            assert torch.equal(i, i32) and torch.equal(w, w32), how
        assert model.rotary.inv_freq.dtype == torch.float32
        assert model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype != torch.float32


def test_fp32_tensors_follow_device_moves_and_widening_casts():
    model = Transformer(preset("debug"))
    weight = model.layers[1].mlp.gate.weight
    model.to(BF16)
    assert model.layers[1].mlp.gate.weight is weight and weight.dtype == torch.float32  # optimizers keep it
    moved = model.to("meta", BF16).layers[1].mlp.gate
    assert moved.weight.device.type == moved.e_score_correction_bias.device.type == "meta"
    assert moved.weight.dtype == torch.float32
    assert Transformer(preset("debug")).double().layers[1].mlp.gate.weight.dtype == torch.float64


def test_balancing_counts_stay_exact_in_bf16():
    model = Transformer(preset("debug")).to(BF16)
    model(torch.randint(0, 256, (4, 100)))  # 400 tokens x K: far beyond bf16's exact integers (256)
    for _, moe in model.moe_layers():
        assert moe.tokens_per_expert.sum().item() == 400 * model.config.num_experts_per_tok


@pytest.fixture
def one_thread():
    """Decoding runs many tiny ops: one thread is much faster on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bf16_debug_model():
    torch.manual_seed(0)
    model = Transformer(preset("debug")).eval()
    with torch.no_grad():  # attention far from uniform, as in test_inference_decode
        for layer in model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(10)
            layer.self_attn.q_b_proj.weight.mul_(10)
    return model.to(BF16)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_bf16_cached_decode_matches_full_forward(mode, one_thread):
    model = _bf16_debug_model()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = LatentKVCache.for_model(model.config, 2, 12, dtype=BF16)
        steps = [forward_cached(model, ids[:, :8], cache, mode=mode)[0]]
        steps += [forward_cached(model, ids[:, t:t + 1], cache, mode=mode)[0] for t in range(8, 12)]
    got = torch.cat(steps, dim=1)
    assert got.dtype == BF16
    torch.testing.assert_close(got.float(), full, atol=8 * 2**-8 * float(full.abs().max()), rtol=0)


def test_bf16_generate_paths_run(one_thread):
    model = _bf16_debug_model()
    prompt = list(b"def f(x):")
    plain = full_forward_generate(model, prompt, 6, temperature=0)
    cached = generate(model, [prompt, prompt[:4]], 6)
    spec = MTPSpeculativeDecoder(model, SamplingParams(temperature=0.0))
    drafted = spec.generate(prompt, 6)
    for tokens in (plain, *cached, drafted):
        assert len(tokens) == 6 and all(0 <= t < model.config.vocab_size for t in tokens)
    assert spec.stats.drafted > 0
    sampled = generate(model, [prompt], 6, SamplingParams(temperature=0.8, top_p=0.9), seed=5)
    assert sampled == generate(model, [prompt], 6, SamplingParams(temperature=0.8, top_p=0.9), seed=5)


def test_bf16_model_serves_openai_completions(one_thread):
    openai = pytest.importorskip("openai")
    testclient = pytest.importorskip("fastapi.testclient")
    from moeforge.inference.engine import Engine
    from moeforge.inference.server import create_app

    model = _bf16_debug_model()
    engine = Engine(model, ByteTokenizer(), max_queue=4, max_batch=2)
    with testclient.TestClient(create_app(engine, "bf16")) as http:  # runs the app's lifespan (engine worker)
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        reply = client.completions.create(model="bf16", prompt="def f(x):", max_tokens=6, temperature=0)
    expected = generate(model, [list(b"def f(x):")], 6, stop_ids=(0,))[0]
    assert reply.choices[0].text == ByteTokenizer().decode(expected)


def test_generate_and_serve_load_bf16_weights_with_dtype_flag(tmp_path, capsys, one_thread):
    from moeforge import hardware
    from moeforge.cli import main
    from moeforge.inference.cli import load_for_inference

    _bf16_debug_model().float().save_pretrained(tmp_path)
    model, _, autocast, _ = load_for_inference(str(tmp_path), None, "cpu", dtype="bf16")  # what `serve --dtype bf16` runs
    assert model.embed_tokens.weight.dtype == BF16 and autocast is None
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu", "--dtype", "bf16"]) == 0
    expected = generate(hardware.configure(moeforge.from_pretrained(tmp_path, dtype=BF16), hardware.probe("cpu")),
                        [list(b"def ")], 6)[0]
    assert capsys.readouterr().out == "def " + ByteTokenizer().decode(expected) + "\n"
