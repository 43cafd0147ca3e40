"""FP8 linear and FP8 grouped experts: drop-in replacements swapped into a built model by
`moeforge.precision.recipe.apply_fp8` (the model code never knows).

All three GEMMs take FP8 operands (DeepSeek-V3 fig. 6):
  Fprop  y  = x @ W^T      x in 1x128 tiles along K, W in 128x128 blocks;
  Dgrad  dx = dy @ W       dy in 1x128 tiles along N (this GEMM's K), the same W blocks (square);
  Wgrad  dW = dy^T @ x     dy and x in 128x1 tiles along the tokens (this GEMM's K), per expert group.
The high-precision input x is kept for Wgrad and re-quantised along tokens there (DeepSeek caches an
FP8 copy instead; that saves memory, not accuracy). Accumulation and outputs: fp32, then cast to the
compute dtype (bf16 under autocast). Master weights and their gradients stay fp32. The GEMMs run on
`Fp8Spec.backend` (precision/gemm.py: torch's blockwise or row-wise scaled matmul, or the emulation).

A module switched off FP8 (`module.fp8 = False`, by the dynamic policy) runs the same GEMMs in the
compute dtype; with `stats` attached it still measures what FP8 would have done, so the policy can
switch it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.moe import GroupedExperts, compute_dtype, swiglu
from .gemm import EMULATED, fp8_mm, fp8_wgrad, grouped_mm, grouped_wgrad
from .quant import BLOCK, E4M3, TENSOR, TILE, Fp8Format, Quantized, quantize, quantize_row_tiles

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Fp8Spec:
    """How one module quantises. granularity: blockwise (tiles/blocks) or tensorwise."""

    granularity: str = "blockwise"
    forward_format: Fp8Format = E4M3  # activations and weights
    backward_format: Fp8Format = E4M3  # output gradients (DeepSeek-V3: E4M3 everywhere)
    pow2_scales: bool = False
    backend: str = EMULATED

    @property
    def act_block(self):
        return TILE if self.granularity == "blockwise" else TENSOR

    @property
    def weight_block(self):
        return BLOCK if self.granularity == "blockwise" else TENSOR


class LayerStats:
    """What the dynamic policy reads for one module: per step, the worst over its GEMM calls of
    [amax, fraction of non-zeros that underflow to 0, fraction above the reference amax (would saturate
    under delayed scaling with the recent amax history), relative RMS quantisation error], for the
    activations (forward) and the output gradients (backward)."""

    FIELDS = ("amax", "underflow", "saturation", "error")

    def __init__(self):
        self.act: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.ref_amax = {"act": None, "grad": None}

    def record(self, kind: str, x: torch.Tensor, spec: Fp8Spec, q=None) -> None:
        with torch.no_grad():
            fmt = spec.forward_format if kind == "act" else spec.backward_format
            if q is None:
                q = quantize(x, spec.act_block, fmt, spec.pow2_scales, check_finite=False)
            xf = x.float()
            deq = q.dequantize()
            mag = xf.abs()
            ref = self.ref_amax[kind]
            values = torch.stack([
                mag.amax(),
                ((xf != 0) & (deq == 0)).float().mean(),
                (mag > ref).float().mean() if ref is not None else mag.new_zeros(()),
                (deq - xf).norm() / xf.norm().clamp_min(_TINY),
            ])
            old = getattr(self, kind)
            setattr(self, kind, values if old is None else torch.maximum(old, values))

    def pop(self) -> dict[str, list[float] | None]:
        out = {k: (None if getattr(self, k) is None else getattr(self, k).tolist()) for k in ("act", "grad")}
        self.act = self.grad = None
        return out


class _Fp8GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]^T: x [M, K] in the compute dtype, w [E, N, K] fp32, counts [E]
    (None when E = 1) -> y [M, N] in x's dtype. `fp8=False` runs the same GEMMs unquantised."""

    @staticmethod
    def forward(ctx, x, w, counts, spec: Fp8Spec, fp8: bool, stats: LayerStats | None):
        with torch.autocast(x.device.type, enabled=False):
            if fp8:
                xq = quantize(x, spec.act_block, spec.forward_format, spec.pow2_scales, check_finite=False)
                wq = quantize(w, spec.weight_block, spec.forward_format, spec.pow2_scales, check_finite=False)
                y = fp8_mm(xq, wq, counts, trans_b=True, backend=spec.backend)
                ctx.save_for_backward(x, counts, wq.data, wq.scale)
            else:
                xq = None
                y = grouped_mm(x, w.to(x.dtype), counts, trans_b=True)
                ctx.save_for_backward(x, counts, w)
            if stats is not None:
                stats.record("act", x, spec, xq)
        ctx.spec, ctx.fp8, ctx.stats, ctx.w_block = spec, fp8, stats, spec.weight_block
        ctx.n_groups, ctx.w_dtype = w.shape[0], w.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        spec = ctx.spec
        x, counts, *w_saved = ctx.saved_tensors
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.fp8:
                wq = Quantized(w_saved[0], w_saved[1], _resolved(ctx.w_block, w_saved[0]), spec.forward_format)
                dyq = quantize(dy, spec.act_block, spec.backward_format, spec.pow2_scales, check_finite=False)
                if ctx.needs_input_grad[0]:
                    dx = fp8_mm(dyq, wq, counts, trans_b=False, backend=spec.backend)
                if ctx.needs_input_grad[1]:
                    if spec.granularity == "blockwise":  # 128 x 1 tiles along the tokens, per expert group
                        dyt = quantize_row_tiles(dy, counts, 128, spec.backward_format, spec.pow2_scales, False)
                        xt = quantize_row_tiles(x, counts, 128, spec.forward_format, spec.pow2_scales, False)
                    else:
                        dyt = dyq
                        xt = quantize(x, TENSOR, spec.forward_format, spec.pow2_scales, check_finite=False)
                    dw = fp8_wgrad(dyt, xt, counts, ctx.n_groups, spec.backend)
            else:
                dyq = None
                w = w_saved[0]
                g = dy.to(x.dtype)
                if ctx.needs_input_grad[0]:
                    dx = grouped_mm(g, w.to(x.dtype), counts, trans_b=False)
                if ctx.needs_input_grad[1]:
                    dw = grouped_wgrad(g, x, counts, ctx.n_groups)
            if ctx.stats is not None:
                ctx.stats.record("grad", dy, spec, dyq)
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(ctx.w_dtype),
                None, None, None, None)


def _resolved(block, data):
    R, C = data.shape[-2:]
    return (R if block[0] is None else block[0], C if block[1] is None else block[1])


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (see module docstring). Same parameters, same state dict."""

    spec: Fp8Spec = Fp8Spec()
    fp8: bool = True
    stats: LayerStats | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: Fp8Spec) -> "Fp8Linear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.spec = spec
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(compute_dtype(x))
        stats = self.stats if torch.is_grad_enabled() else None  # evaluation does not count
        y = _Fp8GroupedLinear.apply(x2, self.weight.unsqueeze(0), None, self.spec, self.fp8, stats)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.fp8}, granularity={self.spec.granularity}"


class Fp8GroupedExperts(GroupedExperts):
    """Routed experts with both grouped GEMMs in FP8 (SwiGLU between them in the compute dtype);
    Wgrad tiles never straddle two experts' tokens."""

    spec: Fp8Spec = Fp8Spec()
    fp8: bool = True
    stats: LayerStats | None = None

    @classmethod
    def from_experts(cls, experts: GroupedExperts, spec: Fp8Spec) -> "Fp8GroupedExperts":
        E, F2, D = experts.gate_up_proj.shape
        with torch.device("meta"):
            new = cls(E, D, F2 // 2, impl=experts.impl)
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.spec = spec
        return new

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]."""
        x = x.to(compute_dtype(x))
        stats = self.stats if torch.is_grad_enabled() else None  # evaluation does not count
        h = _Fp8GroupedLinear.apply(x, self.gate_up_proj, counts, self.spec, self.fp8, stats)
        return _Fp8GroupedLinear.apply(swiglu(h), self.down_proj, counts, self.spec, self.fp8, stats)

    def extra_repr(self) -> str:
        return f"fp8={self.fp8}, granularity={self.spec.granularity}"
