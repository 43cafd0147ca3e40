"""Tensors that keep fp32 when the model is cast to bf16 / fp16.

Some small tensors carry decisions, not activations: the router's weight and `e_score_correction_bias`
pick the experts (bf16 router logits change which experts win near-ties, and from |bias| = 0.25 on,
bf16's spacing exceeds the 1e-3 steps of aux-loss-free balancing, which would be lost), the RoPE inverse
frequencies set every position's angle, and `tokens_per_expert` counts tokens (bf16 counts stop being
exact at 256). transformers keeps its router fp32 with `_keep_in_fp32_modules_strict =
["e_score_correction_bias", "gate.weight"]`, but only when `from_pretrained` is given a dtype;
`model.to(torch.bfloat16)` still narrows them there.

Here the module itself says which of its own tensors stay fp32, by overriding `nn.Module._apply`, the
one function every `.to()`, `.half()`, `.bfloat16()`, `.cuda()`, `to_empty()` goes through: a cast that
would narrow a listed fp32 tensor keeps it fp32 (device moves still apply; widening, e.g. `.double()`,
still applies). Parameters are updated in place, as `_apply` does for every other tensor, so optimizers
built before the cast keep working.
"""

from __future__ import annotations

import torch
from torch import nn


def _narrower_than_fp32(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


class KeepsFP32(nn.Module):
    """Mixin for modules whose tensors named in `fp32_tensors` (own parameters or buffers, not children's)
    must not be narrowed below fp32 by dtype casts of the model."""

    fp32_tensors: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        kept = set()
        for name in self.fp32_tensors:
            t = getattr(self, name, None)
            if t is not None:
                kept.add(id(t))
                if t.grad is not None:
                    kept.add(id(t.grad))

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in kept and t.dtype == torch.float32 and _narrower_than_fp32(out.dtype):
                return t.to(device=out.device)  # the cast's device move, without the narrowing
            return out

        return super()._apply(keep_fp32, recurse=False)
