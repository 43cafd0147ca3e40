"""The three FP8 GEMMs of a (grouped) linear layer: Fprop, Dgrad, Wgrad.

Shapes: M rows (tokens, grouped by expert), K input features, N output features, E weight matrices
(E = 1 for a plain linear); counts [E] rows per group.

How the FP8 product is computed here (`EMULATED`): dequantise both FP8 operands to fp32 (value x its
block's scale) and multiply in fp32. Every FP8 value has a 4-bit significand, so each dequantised value
is exact whenever the scale is a power of two and within one fp32 rounding otherwise; products and sums
then run in fp32. That is what a fine-grained FP8 kernel with FP32 promotion computes (DeepGEMM
multiplies each 128-wide partial sum by its two scales and adds it to an fp32 accumulator), up to fp32
summation order. It is the path on CPU, where torch 2.13's `torch._scaled_mm` accepts only tensorwise
and rowwise scales (blockwise raises "Invalid scaling configuration") and runs slower than an fp32
matmul (measured 73 ms vs 37 ms for 4096x256x768), and on CUDA for the grouped GEMMs.
`NATIVE` uses `torch._scaled_mm` for tensorwise-scaled plain linears (CPU or CUDA), the one case it
supports everywhere; tests check that it gives the same numbers as the emulation.
"""

from __future__ import annotations

import torch

from .quant import Quantized

EMULATED, NATIVE = "emulated", "native"


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor | None, trans_b: bool) -> torch.Tensor:
    """out[rows of group e] = a[rows of e] @ (b[e]^T if trans_b else b[e]); a [M, *], b [E, *, *]."""
    bt = b.transpose(-2, -1) if trans_b else b
    if b.shape[0] == 1:
        return a @ bt[0]
    if a.device.type == "cpu" and a.shape[1] % 4 == 0 and bt.shape[2] % 4 == 0:
        return torch._grouped_mm(a, bt, offs=counts.cumsum(0).to(torch.int32))
    parts = [ae @ be for ae, be in zip(a.split(counts.tolist()), bt.unbind(0))]
    return torch.cat(parts)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: torch.Tensor | None, n_groups: int) -> torch.Tensor:
    """dw[e] = dy[rows of e]^T @ x[rows of e]: dy [M, N], x [M, K] -> [E, N, K] (K of this GEMM = rows)."""
    if n_groups == 1:
        return (dy.t() @ x).unsqueeze(0)
    if dy.device.type == "cpu" and dy.shape[1] % 4 == 0 and x.shape[1] % 4 == 0:
        return torch._grouped_mm(dy.t(), x, offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.stack([de.t() @ xe for de, xe in zip(dy.split(sizes), x.split(sizes))])


def fp8_mm(a: Quantized, b: Quantized, counts: torch.Tensor | None, trans_b: bool,
           backend: str = EMULATED) -> torch.Tensor:
    """a [M, K] FP8 times b [E, ., .] FP8 per group, fp32 out."""
    if backend == NATIVE and b.data.shape[0] == 1 and a.scale.numel() == 1 and b.scale.numel() == 1:
        bt = b.data[0].t() if trans_b else b.data[0]
        if not trans_b:  # _scaled_mm wants its second operand column-major
            bt = bt.t().contiguous().t()
        return torch._scaled_mm(a.data, bt, scale_a=a.scale.reshape(()), scale_b=b.scale.reshape(()),
                                out_dtype=torch.float32)
    return grouped_mm(a.dequantize(), b.dequantize(), counts, trans_b)


def limited_precision_dot(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 14,
                          promote_every: int | None = None, truncate: bool = False) -> torch.Tensor:
    """Row-wise dot products sum_k a[:, k] * b[:, k] through an accumulator that keeps only
    `mantissa_bits` fraction bits (DeepSeek-V3 sec. 3.3.2: Hopper's FP8 tensor cores keep about 14),
    rounding to nearest (or truncating, `truncate`), optionally flushing it into an exact fp32 sum every `promote_every` elements of K (FP32 promotion).
    Products are exact (FP8 x FP8 fits in fp32); only the running sum is rounded. Used by
    benchmarks/fp8_fidelity.py to reproduce the accumulation-error experiment."""
    prod = a.float() * b.float()  # [R, K]
    acc = torch.zeros(prod.shape[0], dtype=torch.float64)
    total = torch.zeros(prod.shape[0], dtype=torch.float64)
    for k in range(prod.shape[1]):
        acc = round_mantissa(acc + prod[:, k].double(), mantissa_bits, truncate)
        if promote_every and (k + 1) % promote_every == 0:
            total += acc
            acc.zero_()
    return (total + acc).float()


def round_mantissa(x: torch.Tensor, bits: int, truncate: bool = False) -> torch.Tensor:
    """Keep `bits` fraction bits of x (float64): round to nearest, or truncate toward zero."""
    mant, exp = torch.frexp(x)  # x = mant * 2^exp, 0.5 <= |mant| < 1
    scale = 2.0 ** (bits + 1)
    return torch.ldexp((torch.trunc if truncate else torch.round)(mant * scale) / scale, exp)
