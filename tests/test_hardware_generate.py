import pytest
import torch

from moeforge import hardware
from moeforge.config import preset
from moeforge.errors import ConfigError
from moeforge.generate import generate, sample
from moeforge.model import Transformer


def test_probe_cpu_and_configure():
    caps = hardware.probe("cpu")
    assert caps.device == "cpu" and caps.dist_backend == "gloo" and caps.expert_impl in ("bmm", "grouped_mm")
    model = hardware.configure(Transformer(preset("debug")), caps)
    assert all(m.experts.impl == caps.expert_impl for _, m in model.moe_layers())
    assert all(layer.self_attn.attn_impl == caps.attn_impl for layer in model.layers)
    if caps.attn_impl == "eager":  # long sequences stay on SDPA: eager would hold T x T scores
        long = hardware.configure(Transformer(preset("debug")), caps, seq_len=hardware.EAGER_ATTENTION_MAX_SEQ + 1)
        assert all(layer.self_attn.attn_impl == "sdpa" for layer in long.layers)
    assert hardware.autocast_dtype("fp32", caps) is None
    assert hardware.autocast_dtype("bf16", caps) is torch.bfloat16


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        hardware.resolve_device("cuda")


def test_greedy_generation_is_deterministic_and_stops():
    model = Transformer(preset("debug"))
    a = generate(model, [1, 2, 3], 6, temperature=0)
    b = generate(model, [1, 2, 3], 6, temperature=0)
    assert a == b and len(a) == 6
    stop = a[2]
    assert generate(model, [1, 2, 3], 6, temperature=0, stop_ids=(stop,))[-1] == stop
    s1 = generate(model, [1, 2, 3], 6, temperature=1.0, seed=5)
    assert s1 == generate(model, [1, 2, 3], 6, temperature=1.0, seed=5)


def test_top_p_and_top_k_restrict_the_choice():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, None, 0.5, g) for _ in range(50)}
    assert picks == {0}
    picks = {sample(logits, 1.0, 2, None, g) for _ in range(200)}
    assert picks == {0, 1}
