"""RMSNorm and the SwiGLU MLP: the two small building blocks every layer uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (as DeepSeek and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """HF semantics, `weight * (x / rms(x)).to(x.dtype)` with the statistics in fp32 (at least), in fewer
    memory passes than autograd through the composite: the forward keeps only x and 1/rms, the backward
    is dx = (g*w - xhat * mean(g*w * xhat)) / rms, dw = sum(g * xhat) over rows (measured 2x faster on CPU).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        D = x.shape[-1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(D).add_(eps).rsqrt_()
        ctx.save_for_backward(x, r, weight)
        xhat = xf * r
        if xhat.dtype == x.dtype:
            return xhat.mul_(weight) if weight.dtype == x.dtype else xhat * weight
        return xhat.to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, r, weight = ctx.saved_tensors
        D = x.shape[-1]
        xhat = x.to(r.dtype) * r
        g = grad.to(r.dtype)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gy = g * weight
            dot = torch.linalg.vecdot(gy, xhat).unsqueeze(-1).div_(-D)
            dx = torch.addcmul(gy, xhat, dot).mul_(r).to(x.dtype)
        return dx, dw, None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only gate and up for backward (autograd through the composite would also
    keep silu(gate): one more [tokens, F] tensor per SwiGLU, 25% of its activations)."""
    return _SiluMul.apply(gate, up)


class _SiluMul(torch.autograd.Function):
    """Backward in fp32 (at least): d up = g * silu(gate), d gate = silu_backward(g * up, gate) =
    g * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate). torch's fused silu_backward and silu make it
    4 passes over [tokens, F] instead of 10 (measured 2.5x faster on CPU; equal to ~1e-7 relative in fp32)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        acc = torch.promote_types(gate.dtype, torch.float32)
        g, x, u = grad.to(acc), gate.to(acc), up.to(acc)
        d_up = F.silu(x).mul_(g).to(up.dtype) if ctx.needs_input_grad[1] else None
        d_gate = torch.ops.aten.silu_backward(g * u, x).to(gate.dtype) if ctx.needs_input_grad[0] else None
        return d_gate, d_up
