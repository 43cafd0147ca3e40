"""FP8 quantisation with fine-grained scales (DeepSeek-V3 sec. 3.3.1).

One scale per block of a 2-D tensor (or of each matrix in a stack [..., R, C]): `x ~= data * scale`,
scale = amax(block) / fmt.max, so the block's largest value lands on the format's largest finite value
and nothing saturates. Blocks used in training:
  TILE  (1, 128)    activations and output gradients, 128 elements along the GEMM's K (per token);
  BLOCK (128, 128)  weights (square, so the same scales serve W and W^T in the backward pass);
  TENSOR            one scale for the whole matrix (the per-tensor contrast).
`quantize_row_tiles` makes 128 x 1 tiles along the token dimension that never straddle an expert's
group of rows: the operands of the weight-gradient GEMM, whose K is the token dimension.

Edge cases: shapes that do not divide by the block are zero-padded (padding never changes an amax);
an all-zero block gets scale 1 (its values are exact zeros anyway); amax / max below the smallest
normal fp32 is clamped up to it. Non-finite input raises NonFiniteTensorError when `check_finite`
(the default; one host sync); with check_finite=False a block holding inf or NaN decodes to NaN, so
the NaN reaches the loss and the trainer's non-finite-step skip handles it (no sync in training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    max: float  # largest finite magnitude
    min_subnormal: float  # smallest non-zero magnitude; anything below half of it becomes 0
    mantissa_bits: int


E4M3 = Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0 ** -9, 3)
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0 ** -16, 2)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}

TILE = (1, 128)
BLOCK = (128, 128)
TENSOR = (None, None)

_TINY = torch.finfo(torch.float32).tiny


class NonFiniteTensorError(ValueError):
    """Quantisation met inf or NaN (an FP8 scale cannot represent them)."""


@dataclass
class Quantized:
    """FP8 values and their scales. data [..., R, C] in fmt.dtype; scale [..., ceil(R/br), ceil(C/bc)]
    fp32, or (row tiles) scale [tiles, C] with row_tile [R] naming each row's tile."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    fmt: Fp8Format
    row_tile: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = self.data.to(torch.float32)
        if self.row_tile is not None:
            return (values * self.scale.index_select(0, self.row_tile)).to(dtype)
        *batch, R, C = values.shape
        br, bc = self.block
        nR, nC = self.scale.shape[-2:]
        if R % br or C % bc:
            values = F.pad(values, (0, nC * bc - C, 0, nR * br - R))
        out = values.view(*batch, nR, br, nC, bc) * self.scale[..., :, None, :, None]
        out = out.view(*batch, nR * br, nC * bc)
        return out[..., :R, :C].to(dtype) if (R % br or C % bc) else out.to(dtype)


def compute_scale(amax: torch.Tensor, fmt: Fp8Format, pow2: bool = False) -> torch.Tensor:
    """amax / fmt.max, or (pow2) rounded up to a power of two, an exponent-only UE8M0 scale: then
    x / scale and back are exact shifts. All-zero blocks get 1."""
    scale = amax.float() / fmt.max
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)).clamp(-126, 127))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    return scale.clamp_min(_TINY)


def _check(amax: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteTensorError(f"cannot quantise {what} to FP8: it holds inf or NaN")


def quantize(x: torch.Tensor, block: tuple[int | None, int | None] = TILE, fmt: Fp8Format = E4M3,
             pow2: bool = False, check_finite: bool = True) -> Quantized:
    """Quantise the last two dims of x [..., R, C] in blocks of br x bc (None = the whole dim)."""
    if x.dim() < 2:
        raise ValueError(f"quantize needs a matrix (or a stack of them), got shape {tuple(x.shape)}")
    *batch, R, C = x.shape
    br = R if block[0] is None else block[0]
    bc = C if block[1] is None else block[1]
    br, bc = max(br, 1), max(bc, 1)
    nR, nC = math.ceil(R / br), math.ceil(C / bc)
    xf = x.to(torch.float32)
    if R % br or C % bc:
        xf = F.pad(xf, (0, nC * bc - C, 0, nR * br - R))
    blocks = xf.reshape(*batch, nR, br, nC, bc)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nR, nC]
    if check_finite:
        _check(amax, f"a tensor of shape {tuple(x.shape)}")
    scale = compute_scale(amax, fmt, pow2)
    q = (blocks / scale[..., :, None, :, None]).clamp_(-fmt.max, fmt.max).to(fmt.dtype)
    q = q.view(*batch, nR * br, nC * bc)
    if R % br or C % bc:
        q = q[..., :R, :C].contiguous()
    return Quantized(q, scale, (br, bc), fmt)


def quantize_row_tiles(x: torch.Tensor, counts: torch.Tensor | None = None, tile: int | None = 128,
                       fmt: Fp8Format = E4M3, pow2: bool = False, check_finite: bool = True) -> Quantized:
    """x [M, C]: one scale per column per `tile` consecutive rows, tiles restarting at each group of
    `counts` rows (an expert's tokens), so a weight-gradient GEMM per group sees only its own scales.
    tile=None: one scale per group (per-tensor scaling per expert)."""
    M, C = x.shape
    if counts is None or counts.numel() == 1:  # one group: plain reshape-based blocks (no scatter)
        q = quantize(x, (tile, 1), fmt, pow2, check_finite)
        return q
    counts = counts.to(device=x.device, dtype=torch.long)
    step = tile if tile is not None else M + 1
    tiles_per_group = (counts + step - 1) // step
    first_tile = tiles_per_group.cumsum(0) - tiles_per_group
    group_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts, output_size=M)
    pos = torch.arange(M, device=x.device) - (counts.cumsum(0) - counts).index_select(0, group_of_row)
    row_tile = first_tile.index_select(0, group_of_row) + torch.div(pos, step, rounding_mode="floor")
    n_tiles = int(tiles_per_group.sum())
    xf = x.to(torch.float32)
    amax = torch.zeros(n_tiles, C, device=x.device).scatter_reduce_(0, row_tile[:, None].expand(M, C), xf.abs(), "amax")
    if check_finite:
        _check(amax, f"a tensor of shape {tuple(x.shape)}")
    scale = compute_scale(amax, fmt, pow2)
    q = (xf / scale.index_select(0, row_tile)).clamp_(-fmt.max, fmt.max).to(fmt.dtype)
    return Quantized(q, scale, (step, 1), fmt, row_tile=row_tile)


def fake_quantize(x: torch.Tensor, block=TILE, fmt: Fp8Format = E4M3, pow2: bool = False) -> torch.Tensor:
    """Quantise and dequantise (same shape and dtype as x): what an FP8 GEMM actually multiplies."""
    return quantize(x, block, fmt, pow2).dequantize(x.dtype)


def relative_rms_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    return float((approx.float() - exact).norm() / exact.norm().clamp_min(_TINY))
