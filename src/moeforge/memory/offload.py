"""CPU offload for GPU runs: optimizer states between steps, saved activations during forward/backward.

* Optimizer states (AdamW moments) are only needed inside `optimizer.step()`; between steps they move
  to pinned CPU memory and come back just before the next step (step pre/post hooks), so the forward
  and backward -- where activations peak -- run without them. Cost: two host-device copies per step.
* Saved activations go through `torch.autograd.graph.save_on_cpu(pin_memory=True)`: every tensor
  autograd saves is copied to pinned CPU memory when saved and back when the backward needs it.
  Checkpointed regions keep their own (already smaller) storage.
On a CPU run both are no-ops: the "device" already is host memory.
"""

from __future__ import annotations

import functools

import torch

OFFLOAD = ("none", "optimizer", "activations", "all")


def _move_state(optimizer: torch.optim.Optimizer, device: torch.device | str, pin: bool = False) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # AdamW's step counters stay put
                moved = value.to(device, non_blocking=True)
                state[key] = moved.pin_memory() if pin and moved.device.type == "cpu" else moved


def offload_optimizer_states(optimizer: torch.optim.Optimizer, device: torch.device) -> list:
    """Keep optimizer state tensors on the CPU except during `step()`; returns the hook handles."""
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: _move_state(opt, device))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: _move_state(opt, "cpu", pin=True))
    return [pre, post]


def offload_activations(model: torch.nn.Module):
    """Run `model`'s forward under save_on_cpu (instance override of forward); returns an undo function."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return inner(*args, **kwargs)

    model.forward = forward
    return lambda: model.__dict__.pop("forward", None)


def apply_offload(kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """Apply `kind` (none | optimizer | activations | all); returns a one-line description."""
    if kind == "none":
        return "offload: none"
    if device.type != "cuda":
        return f"offload {kind}: no-op on {device.type} (states and activations already live in host memory)"
    done = []
    if kind in ("optimizer", "all"):
        offload_optimizer_states(optimizer, device)
        done.append("optimizer states between steps")
    if kind in ("activations", "all"):
        offload_activations(model)
        done.append("saved activations (save_on_cpu)")
    return "offload to CPU: " + ", ".join(done)
