"""Whether activation checkpointing is re-running a forward right now, and undoing its side effects.

A checkpointed region runs its forward twice: once in the forward pass (activations discarded) and again
in the backward pass to rebuild them. Anything a forward does besides computing its output then happens
twice. In moeforge two things do: `MoE.tokens_per_expert += counts` (the load signal of aux-loss-free
balancing) and `RouterProbe` recording router outputs for the balance loss. `RecomputeScope` is entered
only around the second run (torch.utils.checkpoint's `context_fn`): it raises the `recomputing()` flag
(observers such as RouterProbe skip recording) and restores every MoE token counter under the region
afterwards, so the model itself needs no knowledge of checkpointing.

This module imports nothing from moeforge, so any package (balance, memory) may depend on it.
"""

from __future__ import annotations

import threading

import torch

_state = threading.local()


def recomputing() -> bool:
    """True while an activation-checkpointed region is being recomputed in the backward pass."""
    return getattr(_state, "depth", 0) > 0


class RecomputeScope:
    """Context for the recompute of `module`'s region: flag on, token counters saved and restored."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1
        self._saved = [(b, b.clone()) for name, b in self.module.named_buffers() if name.endswith("tokens_per_expert")]
        return self

    def __exit__(self, *exc):
        # The recompute may stop early (torch.utils.checkpoint's early stop raises out of the forward once
        # it has rebuilt what backward needs): restoring, not subtracting, is right either way.
        with torch.no_grad():
            for buf, value in self._saved:
                buf.copy_(value)
        self._saved = []
        _state.depth -= 1
        return False
