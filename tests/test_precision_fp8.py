"""FP8 linear and grouped experts: all three GEMMs against an independent fake-quant reference and
against FP32 within the format's bound; recipes; the trainer's --precision fp8 path."""

import json

import pytest
import torch
from torch import nn

from conftest import small_run
from moeforge.config import TrainConfig, preset
from moeforge.errors import ConfigError
from moeforge.model import Transformer
from moeforge.model.moe import GroupedExperts, swiglu
from moeforge.precision import Fp8GroupedExperts, Fp8Linear, Fp8Spec, apply_fp8
from moeforge.precision.gemm import ROWWISE
from moeforge.precision.quant import E4M3, E5M2
from moeforge.train import Trainer
from test_precision_quant import reference_fake_quant as fq


def rel(a, b):
    return float((a - b).norm() / b.norm())


def linear_case(fmt_bwd=E4M3, granularity="blockwise", backend="emulated", M=70, K=200, N=150):
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False)
    fp8 = Fp8Linear.from_linear(lin, Fp8Spec(granularity, E4M3, fmt_bwd, backend=backend))
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    y = fp8(x)
    y.backward(dy)
    return lin.weight.detach(), x.detach(), dy, y.detach(), x.grad, lin.weight.grad


@pytest.mark.parametrize("fmt_bwd", [E4M3, E5M2])
def test_fp8_linear_fprop_dgrad_wgrad_use_the_deepseek_tiles(fmt_bwd):
    w, x, dy, y, dx, dw = linear_case(fmt_bwd)
    # Fprop: x in 1x128 tiles along K, W in 128x128 blocks.
    assert torch.allclose(y, fq(x, 1, 128, E4M3) @ fq(w, 128, 128, E4M3).T, rtol=1e-5, atol=1e-5)
    # Dgrad: dy in 1x128 tiles along N, the same W blocks.
    assert torch.allclose(dx, fq(dy, 1, 128, fmt_bwd) @ fq(w, 128, 128, E4M3), rtol=1e-5, atol=1e-5)
    # Wgrad: dy and x in 128x1 tiles along the tokens.
    assert torch.allclose(dw, fq(dy, 128, 1, fmt_bwd).T @ fq(x, 128, 1, E4M3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt_bwd", [E4M3, E5M2])
def test_fp8_linear_is_close_to_fp32_within_the_format_bound(fmt_bwd):
    """Each product of two quantised operands is off by at most ~2u (u = 2^-(mantissa+1))."""
    w, x, dy, y, dx, dw = linear_case(fmt_bwd)
    u_fwd, u_bwd = 2.0 ** -(E4M3.mantissa_bits + 1), 2.0 ** -(fmt_bwd.mantissa_bits + 1)
    assert rel(y, x @ w.T) < 2 * u_fwd
    assert rel(dx, dy @ w) < u_fwd + u_bwd
    assert rel(dw, dy.T @ x) < u_fwd + u_bwd
    assert rel(y, x @ w.T) > 1e-3  # it really quantised


def test_tensorwise_native_scaled_mm_matches_the_emulation():
    emulated = linear_case(granularity="tensorwise", M=64, K=128, N=96)
    native = linear_case(granularity="tensorwise", backend=ROWWISE, M=64, K=128, N=96)
    for a, b in zip(emulated[3:], native[3:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fp8_grouped_experts_match_a_per_expert_reference():
    torch.manual_seed(0)
    E, D, F = 4, 64, 48
    base = GroupedExperts(E, D, F, impl="loop")
    nn.init.normal_(base.gate_up_proj, std=0.1)
    nn.init.normal_(base.down_proj, std=0.1)
    counts = torch.tensor([130, 0, 70, 9])  # a group longer than one 128-token tile, an empty one
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    fp8 = Fp8GroupedExperts.from_experts(base, Fp8Spec())
    y = fp8(x, counts)
    y.square().sum().backward()
    dw_in, dw_out, dx = base.gate_up_proj.grad.clone(), base.down_proj.grad.clone(), x.grad.clone()

    # Reference, one expert at a time with the reference quantiser (autograd only for the SwiGLU).
    ys, dxs = [], []
    ref_dw_in, ref_dw_out = torch.zeros_like(dw_in), torch.zeros_like(dw_out)
    for e, xe in enumerate(x.detach().split(counts.tolist())):
        if not len(xe):
            continue
        wi, wo = base.gate_up_proj[e].detach(), base.down_proj[e].detach()
        h = (fq(xe, 1, 128, E4M3) @ fq(wi, 128, 128, E4M3).T).requires_grad_()
        a = swiglu(h)
        ye = fq(a.detach(), 1, 128, E4M3) @ fq(wo, 128, 128, E4M3).T
        ys.append(ye)
        g = 2 * ye
        ref_dw_out[e] = fq(g, 128, 1, E4M3).T @ fq(a.detach(), 128, 1, E4M3)
        da = fq(g, 1, 128, E4M3) @ fq(wo, 128, 128, E4M3)
        (dh,) = torch.autograd.grad(a, h, da)
        ref_dw_in[e] = fq(dh, 128, 1, E4M3).T @ fq(xe, 128, 1, E4M3)
        dxs.append(fq(dh, 1, 128, E4M3) @ fq(wi, 128, 128, E4M3))
    assert torch.allclose(y.detach(), torch.cat(ys), rtol=1e-4, atol=1e-5)
    assert torch.allclose(dx, torch.cat(dxs), rtol=1e-3, atol=1e-4)
    assert torch.allclose(dw_out, ref_dw_out, rtol=1e-3, atol=1e-4)
    assert torch.allclose(dw_in, ref_dw_in, rtol=1e-3, atol=1e-4)
    assert dw_in[1].abs().sum() == 0  # the empty expert gets no gradient


def test_recipe_swaps_linears_and_experts_but_keeps_head_router_norms_and_state_dict():
    torch.manual_seed(0)
    model = Transformer(preset("debug"))
    keys = set(model.state_dict())
    x = torch.randint(0, 256, (2, 32))
    ref = model(x, labels=x).loss
    swapped = apply_fp8(model, "fp8")
    assert set(model.state_dict()) == keys
    assert "lm_head" not in swapped and not any(n.endswith(".gate") for n in swapped)
    assert "layers.1.mlp.experts" in swapped and "layers.0.self_attn.q_a_proj" in swapped
    assert isinstance(model.layers[1].mlp.experts, Fp8GroupedExperts)
    assert type(model.lm_head) is nn.Linear
    loss = model(x, labels=x).loss
    assert 0 < abs(loss.item() - ref.item()) / ref.item() < 0.01


def test_precision_choices_are_validated():
    for bad in dict(precision="fp9"), dict(precision="bf16", fp8_policy=True), dict(optimizer_state_dtype="fp16"):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()


def test_train_with_fp8_policy_and_bf16_moments(tmp_path):
    run = small_run(tmp_path, precision="fp8", fp8_policy=True, optimizer_state_dtype="bf16", steps=2,
                    eval_every=0, eval_batches=1, batch_size=2)
    trainer = Trainer(run)
    summary = trainer.fit()
    assert isinstance(trainer.model.layers[1].mlp.experts, Fp8GroupedExperts)
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["fp8_layer_fraction"] <= 1 for r in rows) and len(rows) == 2
    assert summary["final_val_loss"] < summary["initial_val_loss"]


def test_promotion_every_128_shrinks_limited_accumulator_error():
    """The accumulation experiment's model: a 14-fraction-bit accumulator over K = 1024 positive
    products, with and without flushing into fp32 every 128 elements."""
    from moeforge.precision.gemm import limited_precision_dot

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 1024, generator=g), torch.rand(8, 1024, generator=g)
    exact = (a.double() * b.double()).sum(-1)
    err = lambda **kw: float(((limited_precision_dot(a, b, 14, truncate=True, **kw).double() - exact) / exact).abs().max())
    assert err(promote_every=128) < err() / 4
    assert torch.allclose(limited_precision_dot(a, b, 52).double(), exact, rtol=1e-6)
