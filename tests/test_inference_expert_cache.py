"""The expert cache gives the resident model's outputs while holding only `budget` experts."""

import copy

import pytest
import torch

from moeforge.errors import ConfigError
from moeforge.inference import LatentKVCache, forward_cached, generate
from moeforge.inference.expert_cache import ExpertCache, MemoryExpertStore, apply_expert_cache, moe_modules
from test_inference_decode import debug_model, one_thread  # noqa: F401 (autouse fixture)


def decode_logits(model, ids):
    """Prefill 5 tokens, then decode the rest one by one: many small routing decisions."""
    with torch.no_grad():
        cache = LatentKVCache.for_model(model.config, ids.shape[0], ids.shape[1])
        out = [forward_cached(model, ids[:, :5], cache)[0]]
        out += [forward_cached(model, ids[:, t:t + 1], cache)[0] for t in range(5, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cached_model_equals_resident_model(tmp_path, store, policy):
    model = debug_model()
    for moe in moe_modules(model).values():
        moe.experts.impl = "loop"  # the same per-expert matmuls as the cache computes
    ids = torch.randint(0, 256, (2, 12))
    reference = decode_logits(model, ids)
    cached = copy.deepcopy(model)
    if store == "disk":
        model.save_pretrained(tmp_path / "ckpt")
    n_experts = sum(m.gate.n_experts for m in moe_modules(model).values())  # 3 MoE layers x 8 (incl. MTP)
    cache = apply_expert_cache(cached, budget=4, policy=policy,  # per MoE layer
                               checkpoint=tmp_path / "ckpt" if store == "disk" else None)
    assert not any("gate_up_proj" in name for name, _ in cached.named_parameters())  # released
    assert torch.equal(decode_logits(cached, ids), reference)
    s = cache.stats
    assert len(cache.resident) == 2 * 4 < n_experts  # the 2 main MoE layers (decoding never runs MTP)
    assert all(sum(k[0] == layer for k in cache.resident) == 4 for layer in (1, 2))
    assert s.misses > 12 and s.hits > 0 and s.tokens == 2 * 12
    per_expert = 3 * 32 * 64 * 4  # gate + up + down, F=32, D=64, fp32
    assert s.bytes_moved == s.misses * per_expert


def test_big_enough_budget_loads_each_expert_once():
    model = debug_model()
    ids = torch.randint(0, 256, (1, 10))
    reference = decode_logits(model, ids)  # default kernel (not loop): equal up to rounding
    cache = apply_expert_cache(model, budget=10_000)
    torch.testing.assert_close(decode_logits(model, ids), reference, rtol=0, atol=1e-5)
    assert cache.stats.misses == len(cache.resident)


def test_lfu_keeps_the_hot_expert_and_lru_does_not():
    weights = {0: type("E", (), {"gate_up_proj": torch.zeros(4, 2, 1), "down_proj": torch.zeros(4, 1, 1)})()}
    store = MemoryExpertStore(weights)
    seq = [0, 0, 0, 1, 2, 0, 3, 1, 0, 2, 3, 0]  # expert 0 is hot
    results = {}
    for policy in ("lru", "lfu"):
        cache = ExpertCache(store, budget=2, policy=policy)
        for e in seq:
            counts = [0] * 4
            counts[e] = 1
            cache.observe(0, counts, 1)
            cache.get(0, e)
        results[policy] = cache.stats.hits
    assert results["lfu"] > results["lru"]


def test_warm_start_and_bad_budget():
    model = debug_model()
    loads = {1: [0, 50, 0, 0, 0, 0, 0, 0], 2: [9, 0, 0, 0, 0, 0, 0, 40]}
    per_expert = 3 * 32 * 64 * 4
    cache = apply_expert_cache(copy.deepcopy(model), memory_bytes=3.5 * per_expert, policy="lfu")  # 3 in all
    cache.warm(loads)
    assert set(cache.resident) == {(1, 1), (2, 7), (2, 0)} and cache.stats.misses == 0
    assert cache.resident_bytes() == 3 * per_expert
    cache = apply_expert_cache(copy.deepcopy(model), budget=1, policy="lfu")  # 1 per layer
    cache.warm(loads)
    assert set(cache.resident) == {(1, 1), (2, 7)}
    with pytest.raises(ConfigError, match="budget"):
        apply_expert_cache(copy.deepcopy(model), budget=0)
    with pytest.raises(ConfigError, match="holds no expert"):
        apply_expert_cache(copy.deepcopy(model), memory_bytes=1000)


def test_generation_with_expert_cache_is_unchanged():
    model = debug_model()
    expected = generate(model, [[1, 2, 3], [9]], 6)
    apply_expert_cache(model, budget=4, policy="lfu")
    assert generate(model, [[1, 2, 3], [9]], 6) == expected
