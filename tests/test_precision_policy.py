"""Dynamic FP8/BF16 policy (switches on forced gradient underflow, with hysteresis) and AdamW with
BF16 moments (against torch.optim.AdamW)."""

import pytest
import torch
from torch import nn

from moeforge.precision import (AdamWBF16Moments, DynamicPrecisionPolicy, Fp8Linear, Fp8Spec, PolicyThresholds,
                                apply_fp8, optimizer_state_bytes)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(128, 128, bias=False)
        self.b = nn.Linear(128, 128, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def crush_gradient(grad):
    """Keep one large value per 128-wide tile and make the rest 1e-7 of it: below E4M3's range once the
    tile is scaled to its amax (2^-9 / 448 ~ 4e-6), so they flush to zero."""
    small = grad * 1e-7
    small[:, 0] = 1.0
    return small


def step(model, policy, n, crush):
    switches = []
    for i in range(n):
        x = torch.randn(64, 128)
        y = model(x)
        if crush:
            y.register_hook(crush_gradient)
        y.square().mean().backward()
        switches += policy.step(i)
        model.zero_grad()
    return switches


def test_policy_switches_a_layer_whose_gradients_underflow_and_back_with_hysteresis():
    torch.manual_seed(0)
    model = TwoLayers()
    apply_fp8(model, "fp8")
    policy = DynamicPrecisionPolicy(model, PolicyThresholds(patience=2))
    assert step(model, policy, 3, crush=False) == []  # healthy: stays FP8
    switches = step(model, policy, 3, crush=True)
    # The crushed gradient reaches layer b's Dgrad/Wgrad as dy; layer a sees relu'd b-Dgrad output.
    assert [s["layer"] for s in switches if s["to"] == "bf16"][:1] == ["b"]
    first = next(s for s in switches if s["layer"] == "b")
    assert first["reason"].startswith("underflow") and first["step"] == 1  # after `patience` bad steps
    assert model.b.fp8 is False
    back = step(model, policy, 3, crush=False)
    assert any(s["layer"] == "b" and s["to"] == "fp8" for s in back) and model.b.fp8 is True


def test_policy_in_between_thresholds_does_not_flap():
    torch.manual_seed(0)
    model = TwoLayers()
    apply_fp8(model, "fp8")
    # Bad above 50 % underflow, good only at 0 %: a crushed step is neither, so nothing ever switches.
    policy = DynamicPrecisionPolicy(model, PolicyThresholds(underflow_high=1.0, underflow_low=0.0, patience=1,
                                                            error_high=10, error_low=10))
    assert step(model, policy, 2, crush=True) == []


def test_layer_in_bf16_mode_computes_unquantised():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    fp8 = Fp8Linear.from_linear(lin, Fp8Spec())
    x = torch.randn(8, 128)
    fp8.fp8 = False
    assert torch.allclose(fp8(x), lin(x), rtol=1e-6, atol=1e-6)


def test_adamw_bf16_moments_matches_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(32)]

    def run(make, steps=30):
        ps = [nn.Parameter(p.clone()) for p in params]
        opt = make(ps)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
            opt.step()
        return [p.detach() for p in ps], opt

    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref, ref_opt = run(lambda ps: torch.optim.AdamW(ps, **kw))
    same, _ = run(lambda ps: AdamWBF16Moments(ps, state_dtype=torch.float32, **kw))
    half, half_opt = run(lambda ps: AdamWBF16Moments(ps, **kw))
    for r, s, h in zip(ref, same, half):
        assert torch.allclose(s, r, rtol=1e-5, atol=1e-6)  # the update rule is AdamW's
        assert float((h - r).norm() / (r - params[0 if r.dim() == 2 else 1]).norm()) < 0.05  # bf16 moments
    assert next(iter(half_opt.state.values()))["exp_avg_sq"].dtype == torch.bfloat16
    assert optimizer_state_bytes(half_opt) * 2 == optimizer_state_bytes(ref_opt)
    resumed = AdamWBF16Moments([nn.Parameter(p.clone()) for p in half], **kw)
    resumed.load_state_dict(half_opt.state_dict())  # torch would cast the moments to fp32
    assert next(iter(resumed.state.values()))["exp_avg"].dtype == torch.bfloat16


def test_policy_needs_fp8_modules():
    with pytest.raises(ValueError, match="no FP8 modules"):
        DynamicPrecisionPolicy(TwoLayers())


def test_policy_state_round_trips_and_a_discarded_step_changes_nothing():
    torch.manual_seed(0)
    model = TwoLayers()
    apply_fp8(model, "fp8")
    policy = DynamicPrecisionPolicy(model, PolicyThresholds(patience=2))
    step(model, policy, 3, crush=True)  # layer b goes to BF16, histories filled
    saved = policy.state_dict()
    assert saved["b"]["fp8"] is False and len(saved["a"]["act"]) == 3
    model(torch.randn(64, 128)).square().mean().backward()
    policy.discard()  # e.g. a skipped step
    assert policy.state_dict() == saved and model.a.stats.act is None
    fresh_model = TwoLayers()
    apply_fp8(fresh_model, "fp8")
    fresh = DynamicPrecisionPolicy(fresh_model, PolicyThresholds(patience=2))
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved and fresh_model.b.fp8 is False
    assert fresh_model.a.stats.ref_amax["act"] == max(saved["a"]["act"])
    with pytest.raises(ValueError, match="not this model's"):
        fresh.load_state_dict({"a": saved["a"]})
