"""Latent-KV-cache decoding against the model's own full forward (the independent reference)."""

import pytest
import torch

from moeforge.config import preset
from moeforge.errors import ConfigError
from moeforge.generate import generate as naive_generate
from moeforge.inference import LatentKVCache, SamplingParams, forward_cached, generate
from moeforge.inference.sampling import distribution
from moeforge import Transformer  # the model with save_pretrained


@pytest.fixture(autouse=True)
def one_thread():
    """Decode runs many tiny ops: on a loaded 2-core machine a second thread made them 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def debug_model(**overrides) -> Transformer:
    config = preset("debug")
    for k, v in overrides.items():
        setattr(config, k, v)
    model = Transformer(config.validate()).eval()
    with torch.no_grad():  # larger weights than the init: attention patterns far from uniform
        for layer in model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(10)
            layer.self_attn.q_b_proj.weight.mul_(10)
    return model


@pytest.mark.parametrize("mode", ["absorbed", "naive", "auto"])
@pytest.mark.parametrize("interleave", [False, True])
def test_prefill_then_decode_matches_full_forward(mode, interleave):
    model = debug_model(rope_interleave=interleave)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = LatentKVCache.for_model(model.config, 2, 12)
        pre, _ = forward_cached(model, ids[:, :7], cache, mode=mode)
        steps = [pre] + [forward_cached(model, ids[:, t:t + 1], cache, mode=mode)[0] for t in range(7, 10)]
        steps.append(forward_cached(model, ids[:, 10:], cache, mode=mode)[0])  # two tokens at once
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 12 and cache.positions.tolist() == [12, 12]


def test_chunked_prefill_equals_one_pass():
    from moeforge.inference.absorbed import prefill

    model = debug_model()
    ids = torch.randint(0, 256, (2, 11))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        one = LatentKVCache.for_model(model.config, 2, 11)
        chunked = LatentKVCache.for_model(model.config, 2, 11)
        logits, h = forward_cached(model, ids, one, mask)
        last, h_chunked = prefill(model, ids, chunked, mask, chunk=4)
    torch.testing.assert_close(last, logits[:, -1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(h_chunked, h, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.kv, one.kv, rtol=0, atol=1e-6)
    assert chunked.positions.tolist() == [11, 7]


def test_auto_mode_absorbs_decode_steps_but_not_long_prefills():
    from moeforge.inference.absorbed import absorbed_is_cheaper
    from moeforge.model.mla import MLA

    with torch.device("meta"):
        attn = MLA(preset("v3"))  # C 512, N 128, R 64, V 128: break-even near T = 170
    assert absorbed_is_cheaper(attn, 1) and absorbed_is_cheaper(attn, 160)
    assert not absorbed_is_cheaper(attn, 180) and not absorbed_is_cheaper(attn, 4096)


def test_cache_bytes_per_token_is_latent_plus_rope_per_layer():
    config = preset("debug")
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = LatentKVCache.for_model(config, batch=3, capacity=20, dtype=dtype)
        expected = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * size
        assert cache.bytes_per_token() == expected
        assert cache.nbytes() == expected * 3 * 20  # nothing else is stored per token


def test_left_padded_batch_decodes_each_row_as_if_alone():
    model = debug_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [200, 100, 50, 25]]
    batched = generate(model, prompts, 6)
    for prompt, row in zip(prompts, batched):
        assert row == generate(model, [prompt], 6)[0]
        # and the same as the cache-free reference generator (full forward per token)
        assert row == naive_generate(model, prompt, 6, temperature=0)
    with torch.no_grad():  # logits of a padded row's prefill equal its own unpadded forward
        cache = LatentKVCache.for_model(model.config, 2, 8)
        ids = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
        mask = ids.new_ones(ids.shape, dtype=torch.bool)
        mask[0, :5] = False
        logits, _ = forward_cached(model, ids, cache, mask)
        torch.testing.assert_close(logits[0, 5:], model(ids[:1, 5:]).logits[0], rtol=0, atol=1e-5)
        assert cache.positions.tolist() == [3, 8]


def test_sampling_is_seeded_and_stops():
    model = debug_model()
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = generate(model, [[1, 2, 3], [4]], 8, params, seed=3)
    assert a == generate(model, [[1, 2, 3], [4]], 8, params, seed=3)
    assert a != generate(model, [[1, 2, 3], [4]], 8, params, seed=4)
    greedy = generate(model, [[1, 2, 3]], 8)[0]
    stop = greedy[3]
    stopped = generate(model, [[1, 2, 3]], 8, stop_ids=(stop,))[0]
    assert stopped == greedy[:greedy.index(stop) + 1]


def test_top_p_and_top_k_filter_the_distribution():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    p = distribution(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert p[0, 0] == 1 and p[0, 1:].sum() == 0
    p = distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[0, :2], torch.tensor([5.0, 4.0]).softmax(0))


def test_too_long_prompt_is_a_config_error():
    model = debug_model()
    with pytest.raises(ConfigError, match="context"):
        generate(model, [[1] * 500], 20)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
