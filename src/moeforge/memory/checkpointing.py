"""Activation checkpointing applied from outside: chosen candidates run under torch.utils.checkpoint.

Non-reentrant checkpointing (`use_reentrant=False`) is used because it recomputes exactly the tensors
autograd saved, keeps the original graph (so fp32 gradients are bit-identical to no checkpointing) and
runs the first forward with grad enabled (so router hooks still see it). The recompute runs inside
`RecomputeScope`: MoE token counters and balance-loss probes are not counted twice.

Modes:
  none       nothing is recomputed
  full       every transformer block (main and MTP): only block inputs are kept
  selective  a fixed, DeepSeek-V3-like list: the MLA up-projections (q and kv paths, with their norms)
             and every SwiGLU (routed experts, shared experts, dense MLP) are recomputed; the attention
             core, whose recompute is the most expensive per byte, is kept
  auto       the cheapest set that fits a memory budget (see `moeforge.memory.auto`); besides
             checkpointed regions it may choose a Block's `weight_casts` (its bf16 weight copies recast
             in the backward, `moeforge.memory.recast`)
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .candidates import BLOCK, RECAST, Candidate, find_candidates
from .instrument import Patch, remove_all
from .recast import recasting
from .recompute import RecomputeScope, recomputing

MODES = ("none", "full", "selective", "auto")
SELECTIVE_KINDS = ("q_proj", "kv_proj", "routed_experts", "shared_experts", "dense_mlp")

# Called as observer(candidate, args) when a checkpointed region runs its first forward: the profiler
# listens to count the inputs the checkpoint keeps alive (they are not "saved tensors").
checkpoint_observers: list[Callable] = []


_outer = threading.local()  # depth of checkpointed first forwards: inputs of nested regions are not kept


def checkpointed(candidate: Candidate, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation: nothing to save, nothing to recompute
            return fn(*args, **kwargs)
        depth = getattr(_outer, "depth", 0)
        if not recomputing() and depth == 0:
            for observer in checkpoint_observers:
                observer(candidate, args)
        _outer.depth = depth + 1
        try:
            return checkpoint(fn, *args, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), RecomputeScope(candidate.owner)), **kwargs)
        finally:
            _outer.depth = depth

    return run


class ActivationCheckpointing:
    """The candidates of `model` named in `names`, checkpointed until `remove()`."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str]):
        by_name = {c.name: c for c in find_candidates(model)}
        names = list(names)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"unknown checkpointing candidate(s): {', '.join(unknown)}")
        chosen = [by_name[n] for n in names]  # nested regions are fine: non-reentrant checkpoints nest
        self.names = names
        # Recasting goes innermost (patched first, and inside each checkpointed region of its Block): the
        # recompute then reruns it too, so the saved-tensor hooks see the same saves in both passes, and
        # a region's recompute does not rebuild the weight copies (a smaller transient).
        recast_layers = {c.layer for c in chosen if c.kind == RECAST}
        self._patches = [Patch(c, recasting) for c in chosen if c.kind == RECAST]
        self._patches += [Patch(c, lambda fn, c=c: checkpointed(
            c, recasting(fn) if c.layer in recast_layers and c.kind != BLOCK else fn))
            for c in chosen if c.kind != RECAST]

    def remove(self) -> None:
        remove_all(self._patches)


def fixed_plan(model: torch.nn.Module, mode: str) -> list[str]:
    """Candidate names for the modes that need no measurement (none, full, selective)."""
    candidates = find_candidates(model)
    if mode == "none":
        return []
    if mode == "full":
        return [c.name for c in candidates if c.kind == BLOCK]
    if mode == "selective":
        return [c.name for c in candidates if c.kind in SELECTIVE_KINDS]
    raise ConfigError(f"activation checkpointing mode must be one of {', '.join(MODES)}, got {mode!r}")
