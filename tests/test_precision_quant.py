"""FP8 quantisation primitives against a block-by-block reference and the formats' error bounds."""

import pytest
import torch

from moeforge.precision.quant import (BLOCK, E4M3, E5M2, TENSOR, TILE, NonFiniteTensorError, quantize,
                                      quantize_row_tiles)


def reference_fake_quant(x, br, bc, fmt, pow2=False):
    """Block by block in Python: scale = amax / max (power of two rounded up), cast, multiply back."""
    out = torch.empty_like(x)
    R, C = x.shape
    br, bc = br or R, bc or C
    for i in range(0, R, br):
        for j in range(0, C, bc):
            blk = x[i:i + br, j:j + bc]
            amax = float(blk.abs().max())
            s = amax / fmt.max if amax > 0 else 1.0
            if pow2 and amax > 0:
                s = 2.0 ** torch.ceil(torch.log2(torch.tensor(s))).item()
            out[i:i + br, j:j + bc] = (blk / s).clamp(-fmt.max, fmt.max).to(fmt.dtype).float() * s
    return out


@pytest.mark.parametrize("block", [TILE, BLOCK, TENSOR, (128, 1)])
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("pow2", [False, True])
def test_matches_blockwise_reference_on_shapes_not_divisible_by_128(block, fmt, pow2):
    x = torch.randn(150, 200) * torch.logspace(-3, 3, 150)[:, None]  # rows of very different magnitude
    got = quantize(x, block, fmt, pow2).dequantize()
    assert torch.allclose(got, reference_fake_quant(x, *block, fmt, pow2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_round_trip_error_within_half_an_ulp_of_the_format(fmt):
    """Per element: |deq - x| <= 2^-(mantissa+1) |x| for normal FP8 values, plus half the smallest
    subnormal (times the block's scale) where the scaled value falls below the normal range."""
    x = torch.randn(256, 384) * torch.exp(torch.randn(256, 1))
    q = quantize(x, TILE, fmt)
    err = (q.dequantize() - x).abs()
    scale = q.scale.repeat_interleave(128, dim=1)
    bound = 2.0 ** -(fmt.mantissa_bits + 1) * x.abs() + 0.5 * fmt.min_subnormal * scale
    assert bool((err <= bound * (1 + 1e-6)).all())
    rel_rms = float((q.dequantize() - x).norm() / x.norm())
    assert rel_rms < 2.0 ** -(fmt.mantissa_bits + 1)  # RMS is well inside the worst case


def test_fine_grained_scales_survive_outliers_that_ruin_per_tensor_scaling():
    x = torch.randn(128, 512)
    x[0, 0] = 1e5  # one outlier
    err = {name: float((quantize(x, b).dequantize() - x)[1:].norm() / x[1:].norm())
           for name, b in (("tile", TILE), ("tensor", TENSOR))}
    assert err["tile"] < 0.05 < err["tensor"]


def test_zeros_and_tiny_values_get_safe_scales():
    x = torch.zeros(3, 130)
    q = quantize(x, TILE)
    assert torch.equal(q.dequantize(), x) and bool((q.scale > 0).all())
    tiny = torch.full((2, 128), 1e-42)  # amax / 448 is below the smallest normal fp32
    assert bool(torch.isfinite(quantize(tiny, TILE).dequantize()).all())


def test_power_of_two_scales_are_exponents_only():
    q = quantize(torch.randn(64, 256) * 3.7, TILE, pow2=True)
    mant, _ = torch.frexp(q.scale)
    assert bool((mant == 0.5).all())


def test_non_finite_input_raises_or_propagates_as_nan():
    x = torch.randn(2, 256)
    x[0, 3] = float("inf")
    with pytest.raises(NonFiniteTensorError, match="inf or NaN"):
        quantize(x, TILE)
    out = quantize(x, TILE, check_finite=False).dequantize()
    assert bool(out[0, :128].isnan().all()) and bool(torch.isfinite(out[0, 128:]).all())
    assert bool(torch.isfinite(out[1]).all())


def test_row_tiles_restart_at_each_group():
    """Weight-gradient operands: 128-row tiles per column that never mix two experts' tokens."""
    counts = torch.tensor([130, 0, 70, 5])
    x = torch.randn(int(counts.sum()), 64) * torch.logspace(-2, 2, int(counts.sum()))[:, None]
    got = quantize_row_tiles(x, counts).dequantize()
    parts = [reference_fake_quant(xe, 128, 1, E4M3) for xe in x.split(counts.tolist()) if len(xe)]
    assert torch.allclose(got, torch.cat(parts), rtol=1e-6, atol=0)
