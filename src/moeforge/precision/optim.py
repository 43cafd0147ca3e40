"""AdamW with BF16 moments and FP32 master weights (DeepSeek-V3 sec. 3.3.3).

torch.optim.AdamW keeps its moments in the parameter's dtype, and torchao's low-precision AdamWs either
quantise the moments to 8/4 bits or expect bf16 parameters; neither is "fp32 weights, bf16 moments".
So: a small Optimizer whose exp_avg / exp_avg_sq live in bf16 (4 bytes per parameter instead of 8)
and whose update runs in fp32: moments are upcast, updated, applied, and stored back rounded to
nearest. Caveat: a bf16 second moment has 8 significant bits, so with beta2 close to 1 (0.999) an
update of (1 - beta2) g^2 can be below half an ulp and be lost; DeepSeek-V3 used beta2 = 0.95, as
moeforge does by default.
"""

from __future__ import annotations

import math

import torch


class AdamWBF16Moments(torch.optim.Optimizer):
    """Same arguments and update as torch.optim.AdamW (decoupled weight decay, bias correction)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict) -> None:
        """torch's loader casts state tensors to the parameter dtype; put the moments back in bf16."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
            step = float(self.state[params[0]]["step"])
            grads = [p.grad.float() for p in params]
            m = [self.state[p]["exp_avg"].float() for p in params]
            v = [self.state[p]["exp_avg_sq"].float() for p in params]
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / bias1)
            for p, mi, vi in zip(params, m, v):
                self.state[p]["exp_avg"].copy_(mi)
                self.state[p]["exp_avg_sq"].copy_(vi)
        return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (after at least one step)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
