"""Recasting low-precision weight copies in the backward instead of keeping them.

Under bf16 autocast every matmul reads a bf16 copy of its fp32 weight (autocast's cast for `nn.Linear`,
`GroupedExperts`' explicit `.to(dtype)`), and autograd keeps that copy for the backward: for a small
batch it is a large share of the activations (a tiny MoE layer at 2 x 256 tokens: 3 MiB of 11.7 MiB are
bf16 expert weights). The copy is a pure function of a parameter, which stays in memory anyway, so a
`saved_tensors_hooks` pack hook can keep (parameter, dtype, view geometry) instead and the unpack hook
casts again: the same `.to(dtype)` kernel on the same values, so the backward is bit-identical, for the
price of one cast per weight per backward (memory-bound, far cheaper per byte than recomputing a GEMM).

Applied per Block from outside, as the `weight_casts` candidate (see `candidates.py`); a parameter
changed in place between forward and backward (never the case within a training step) is an error.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class Recast:
    """What a saved weight copy is packed into: enough to rebuild it exactly."""

    __slots__ = ("param", "dtype", "size", "stride", "offset", "version")

    def __init__(self, param, dtype, size, stride, offset):
        self.param, self.dtype, self.size, self.stride, self.offset = param, dtype, size, stride, offset
        self.version = param._version

    def rebuild(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError("a parameter was modified in place between forward and backward; its recast "
                               "weight copy would differ from the one the forward used")
        return self.param.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


def cast_source(t: torch.Tensor) -> nn.Parameter | None:
    """The parameter `t` is a plain dtype copy of (or a view of such a copy), else None."""
    if isinstance(t, DTensor) or type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        return None
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return None
    p = getattr(fn.next_functions[0][0], "variable", None)
    if (not isinstance(p, nn.Parameter) or isinstance(p, DTensor) or p.dtype == base.dtype
            or p.device != base.device or p.shape != base.shape or p.stride() != base.stride()
            or base.storage_offset() != 0 or p.storage_offset() != 0 or not p.is_contiguous()):
        return None
    return p


class _Outer:
    """A save handed on to the saved-tensor hooks that were active around the recasting region."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def recasting(fn: Callable) -> Callable:
    """`fn` with the weight copies it saves for backward recast instead of kept.

    Every other save goes to the hooks that were on top when `fn` was entered (a checkpoint around it,
    which drops it, or the memory profiler, which counts it): hooks do not stack by themselves, the
    innermost one alone sees a save."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
        outer_pack, outer_unpack = outer if outer is not None else (None, None)

        def pack(t: torch.Tensor):
            if cast_source(t) is not None:
                return Recast(cast_source(t), t.dtype, t.size(), t.stride(), t.storage_offset())
            return t if outer_pack is None else _Outer(outer_pack(t))

        def unpack(x):
            if isinstance(x, Recast):
                return x.rebuild()
            return x if not isinstance(x, _Outer) else outer_unpack(x.packed)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return fn(*args, **kwargs)

    return run
