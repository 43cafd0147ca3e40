"""The FP8 GEMM kernels (precision/gemm.py) against the emulation they replace: Fprop, Dgrad and Wgrad of
plain linears and ragged expert groups through row-wise scaled `torch._scaled_mm` over 128-wide K
slices (runs on this CPU); the native blockwise `scaled_mm` call's layouts against torch's own checks;
the probe's choice; a short training run on both paths."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeforge import hardware
from moeforge.config import resolve_run_config
from moeforge.model.moe import GroupedExperts
from moeforge.precision import Fp8GroupedExperts, Fp8Linear, Fp8Spec
from moeforge.precision.gemm import (BLOCKWISE, EMULATED, ROWWISE, _cublas_blockwise, check_backend, fp8_mm,
                                     fp8_wgrad)
from moeforge.precision.quant import BLOCK, E4M3, E5M2, TENSOR, TILE, quantize, quantize_row_tiles
from moeforge.train import Trainer

from conftest import SMALL_CORPUS


def close(got, ref, rtol=2e-5):
    """Equal up to fp32 summation order: elementwise, relative to the largest entry."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


class ScaledMmCalls:
    """Records the contraction length of every torch._scaled_mm call."""

    def __init__(self, monkeypatch):
        self.ks = []
        real = torch._scaled_mm

        def spy(a, b, **kw):
            self.ks.append(a.shape[1])
            return real(a, b, **kw)

        monkeypatch.setattr(torch, "_scaled_mm", spy)


def linear_grads(backend, M, K, N, granularity="blockwise", fmt_bwd=E4M3):
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False)
    fp8 = Fp8Linear.from_linear(lin, Fp8Spec(granularity, E4M3, fmt_bwd, backend=backend))
    x = torch.randn(M, K, requires_grad=True)
    y = fp8(x)
    y.backward(torch.randn(M, N))
    return y.detach(), x.grad, lin.weight.grad


@pytest.mark.parametrize("M,K,N", [(70, 200, 150), (256, 256, 384), (1, 128, 64), (130, 72, 129)])
def test_rowwise_linear_fprop_dgrad_wgrad_match_the_emulation(M, K, N, monkeypatch):
    ref = linear_grads(EMULATED, M, K, N)
    calls = ScaledMmCalls(monkeypatch)
    got = linear_grads(ROWWISE, M, K, N)
    for g, r in zip(got, ref):  # y, dx, dW
        close(g, r)
    # FP32 promotion every 128 elements: no scaled GEMM contracts over more than 128 (Fprop: K,
    # Dgrad: N, Wgrad: the tokens), and together they cover all three contractions exactly.
    assert calls.ks and max(calls.ks) <= 128
    assert sum(calls.ks) == K + N + M


def test_rowwise_linear_tensorwise_and_e5m2_gradients_match_the_emulation():
    for kw in dict(granularity="tensorwise"), dict(fmt_bwd=E5M2):
        for g, r in zip(linear_grads(ROWWISE, 96, 200, 64, **kw), linear_grads(EMULATED, 96, 200, 64, **kw)):
            close(g, r)


def experts_grads(backend, counts, D=200, F_=96):
    torch.manual_seed(0)
    base = GroupedExperts(len(counts), D, F_, impl="loop")
    nn.init.normal_(base.gate_up_proj, std=0.1)
    nn.init.normal_(base.down_proj, std=0.1)
    experts = Fp8GroupedExperts.from_experts(base, Fp8Spec(backend=backend))
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    y = experts(x, counts)
    y.square().sum().backward()
    return y.detach(), x.grad, base.gate_up_proj.grad, base.down_proj.grad


def test_rowwise_grouped_experts_with_ragged_groups_match_the_emulation():
    # a group longer than two 128-token tiles, an empty one, one of a single token; K = 200 (ragged slice)
    counts = torch.tensor([300, 0, 70, 1, 129])
    ref = experts_grads(EMULATED, counts)
    got = experts_grads(ROWWISE, counts)
    close(got[0], ref[0])  # y: both GEMMs, the SwiGLU between them
    # The backward pass quantises dy of the second GEMM's output and dh after the SwiGLU: an fp32
    # rounding difference upstream moves a few values across an FP8 rounding boundary (a 1/16 step),
    # so compare by norm there (the per-GEMM comparison is exact: test_gemm_functions_per_group...).
    for g, r in zip(got[1:], ref[1:]):  # dx, d gate_up, d down
        assert float((g - r).norm() / r.norm()) < 1e-3
    assert got[2][1].abs().sum() == 0  # the empty expert gets no gradient


def test_gemm_functions_per_group_match_the_emulation_directly():
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([5, 200, 0, 131])
    M, K, N = int(counts.sum()), 320, 136
    x, dy, w = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g), torch.randn(4, N, K, generator=g)
    xq, dyq, wq = quantize(x, TILE), quantize(dy, TILE), quantize(w, BLOCK)
    close(fp8_mm(xq, wq, counts, True, ROWWISE), fp8_mm(xq, wq, counts, True, EMULATED))
    close(fp8_mm(dyq, wq, counts, False, ROWWISE), fp8_mm(dyq, wq, counts, False, EMULATED))
    dyt, xt = quantize_row_tiles(dy, counts), quantize_row_tiles(x, counts)
    close(fp8_wgrad(dyt, xt, counts, 4, ROWWISE), fp8_wgrad(dyt, xt, counts, 4, EMULATED))
    dyT, xT = quantize(dy, TENSOR), quantize(x, TENSOR)
    close(fp8_wgrad(dyT, xT, counts, 4, ROWWISE), fp8_wgrad(dyT, xT, counts, 4, EMULATED))


@pytest.mark.parametrize("m,k,n", [(70, 200, 150), (1, 128, 128), (300, 2048, 576)])
def test_blockwise_call_layouts_pass_torchs_own_scaled_mm_checks(m, k, n):
    """The CUDA path cannot run here; its padded operands and scale layouts go through torch's meta
    checks for BlockWise1x128 x BlockWise128x128 (Fprop, Dgrad) and 1x128 x 1x128 (Wgrad)."""
    meta = dict(device="meta")
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn, **meta)
    bt = torch.empty(n, k, dtype=torch.float8_e4m3fn, **meta)
    kb, nb = -(-k // 128), -(-n // 128)
    sa = torch.empty(m, kb, **meta)
    for sb, recipe in ((torch.empty(nb, kb, **meta), F.ScalingType.BlockWise128x128),
                       (torch.empty(n, kb, **meta), F.ScalingType.BlockWise1x128)):
        assert _cublas_blockwise(a, sa, bt, sb, recipe).shape == (m, n)
    # The checks do bite: row-major activation scales on aligned operands are refused.
    a2, b2 = torch.empty(128, 256, dtype=torch.float8_e4m3fn, **meta), torch.empty(128, 256, dtype=torch.float8_e4m3fn, **meta)
    with pytest.raises(RuntimeError):
        F.scaled_mm(a2, b2.t(), torch.empty(128, 2, **meta), F.ScalingType.BlockWise1x128,
                    torch.empty(4, 1, **meta).t().contiguous().t(), F.ScalingType.BlockWise128x128,
                    output_dtype=torch.float32)


def test_rowwise_pads_ragged_slices_for_cublas_off_cpu():
    """Off the CPU, a slice with K or N not a multiple of 16 (or an unaligned start, as at a group
    boundary in Wgrad) is zero-padded for cuBLASLt; on meta tensors torch's own checks see the call."""
    from moeforge.precision.gemm import _scaled

    meta = dict(device="meta")
    a = torch.empty(70, 300, dtype=torch.float8_e4m3fn, **meta)[:, 128:200]  # K 72, unaligned view
    bt = torch.empty(150, 300, dtype=torch.float8_e4m3fn, **meta)[:, 128:200]
    assert _scaled(a, bt, torch.empty(70, **meta), torch.empty(150, **meta)).shape == (70, 150)
    assert _scaled(a, bt, torch.empty((), **meta), torch.empty((), **meta)).shape == (70, 150)


def test_probe_keeps_this_cpu_on_the_emulation_while_rowwise_runs_there():
    """torch 2.13 has no blockwise scaled GEMM on CPU, and its CPU _scaled_mm is a dequantise + fp32
    matmul (bitwise the emulation's single-slice product), so the probe keeps the emulation here."""
    with pytest.raises(Exception):
        check_backend(BLOCKWISE, "cpu")
    check_backend(ROWWISE, "cpu")  # runs and agrees
    g = torch.Generator().manual_seed(0)
    xq, wq = quantize(torch.randn(64, 128, generator=g)), quantize(torch.randn(1, 96, 128, generator=g), BLOCK)
    assert torch.equal(fp8_mm(xq, wq, None, True, ROWWISE), fp8_mm(xq, wq, None, True, EMULATED))
    assert hardware._fp8_gemm_path("cpu") == EMULATED


def fp8_run(tmp_path, name):
    return resolve_run_config({}, dict(
        preset="debug", data=str(SMALL_CORPUS), seq_len=32, batch_size=4, steps=4, warmup_steps=1,
        eval_every=0, eval_batches=1, sample_tokens=0, precision="fp8", device="cpu",
        run_dir=str(tmp_path / name)), dict(hidden_size=192, moe_intermediate_size=64))


def test_training_on_scaled_mm_tracks_the_emulation(tmp_path, monkeypatch):
    """--precision fp8 on the probed path (row-wise scaled GEMMs here) trains as the emulation does:
    per-step losses agree to fp32 summation-order noise (K = 192: a full and a ragged 128-slice)."""
    losses = {}
    caps = hardware.Capabilities(device="cpu", bf16=True, grouped_mm=True, fp8_matmul=True, fused_attention=True,
                                 dist_backend="gloo", expert_impl="grouped_mm", attn_impl="eager")
    for path in (ROWWISE, EMULATED):
        monkeypatch.setattr(hardware, "probe", lambda device, p=path: dataclasses.replace(caps, fp8_gemm=p))
        trainer = Trainer(fp8_run(tmp_path, path))
        assert trainer.model.layers[1].mlp.experts.spec.backend == path
        assert trainer.model.layers[0].self_attn.q_a_proj.spec.backend == path
        losses[path] = []
        for _ in range(4):
            losses[path].append(trainer.train_step()["loss"])
            trainer.step += 1
    assert losses[ROWWISE] == pytest.approx(losses[EMULATED], rel=1e-3)
    assert losses[ROWWISE][-1] < losses[ROWWISE][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_paths_on_cuda_match_the_emulation():
    """Run by benchmarks/gpu_check.sh: the probed path on the GPU, GEMM by GEMM and through Fp8Linear."""
    path = hardware.probe("cuda").fp8_gemm
    if path == EMULATED:
        pytest.skip("no FP8 scaled GEMM on this GPU")
    check_backend(path, "cuda")
    torch.manual_seed(0)
    lin = nn.Linear(256, 384, bias=False).cuda()
    x = torch.randn(512, 256, device="cuda")
    grads = {}
    for backend in (path, EMULATED):
        lin.weight.grad = None
        xi = x.clone().requires_grad_()
        y = Fp8Linear.from_linear(lin, Fp8Spec(backend=backend))(xi)
        y.square().sum().backward()
        grads[backend] = (y.detach(), xi.grad, lin.weight.grad.clone())
    for g, r in zip(grads[path], grads[EMULATED]):
        assert float((g - r).norm() / r.norm()) < 1e-3
