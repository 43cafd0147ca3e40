"""Measured memory of one training step on one rank of a real (distributed) trainer, for checking
`plan/memory.py` (issue 17, item 3): weights, gradients, optimizer states and the peak of activations.

Why a live count: under a pipeline schedule several micro-batches' activations are alive at once and
freed one backward at a time, so the bytes saved at the end of one forward (`ActivationRecorder`) are not
the peak. Here every tensor autograd saves is wrapped in a small holder while it is saved; the holder dies
when autograd releases it (after that node's backward), so the live bytes are known at every moment and
their maximum over the step is the activation peak. Storages are counted once (views, a tensor saved by
several ops) and parameters (the rank's local shards) are left out, as in `moeforge.memory.profiler`.
Sizes count the rank's own tensors (a DTensor as its local shard), not the allocator's slack.
"""

from __future__ import annotations

import torch

from ..memory.profiler import storage_key


class LiveSaved:
    """saved_tensors_hooks that keep a running total of the distinct storages autograd holds, and its peak."""

    def __init__(self, exclude: set):
        self.exclude, self.refs, self.sizes = exclude, {}, {}
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor):
        key, nbytes = storage_key(t)
        if key in self.exclude or not nbytes:
            return t
        return _Held(self, key, nbytes, t)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def add(self, key, nbytes) -> None:
        n = self.refs.get(key, 0)
        self.refs[key] = n + 1
        if n == 0:
            self.sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def drop(self, key) -> None:
        n = self.refs.get(key, 0) - 1
        if n <= 0:
            self.refs.pop(key, None)
            self.live -= self.sizes.pop(key, 0)
        else:
            self.refs[key] = n

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Held:
    __slots__ = ("owner", "key", "t")

    def __init__(self, owner: LiveSaved, key, nbytes: int, t: torch.Tensor):
        self.owner, self.key, self.t = owner, key, t
        owner.add(key, nbytes)

    def __del__(self):
        self.owner.drop(self.key)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            key, nbytes = storage_key(t)
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


def measure_step(trainer) -> dict:
    """Run one training step of `trainer` (a Trainer or DistributedTrainer after a warm-up step) and return
    this rank's bytes: weights, gradients (just before the optimizer step), optimizer states, activations
    (the peak of live saved tensors)."""
    params = list(trainer.model.parameters())
    exclude = {storage_key(p)[0] for p in params}
    grads = {}

    def before_step(opt, args, kwargs):
        grads["bytes"] = _bytes(p.grad for p in params if p.grad is not None)

    handle = trainer.optimizer.register_step_pre_hook(before_step)
    live = LiveSaved(exclude)
    try:
        with live.hooks():
            trainer.train_step()
        trainer.step += 1
    finally:
        handle.remove()
    state = (v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"weights": _bytes(params), "gradients": grads.get("bytes", 0), "optimizer": _bytes(state),
            "activations": live.peak}


def predicted_rank_memory(run, world: int, rank: int) -> dict:
    """plan/memory.py's bytes for `rank` of the run's layout (its pipeline stage: rank // (dp x tp))."""
    from .against import run_layout
    from .memory import stage_memory
    from .models import from_moe

    lo, s = run_layout(run, world)
    stage = rank // (lo.dp * lo.tp)
    m = stage_memory(from_moe(run.model, run.train.preset), lo, s, stage).to_json()
    return {k: m[k] for k in ("weights", "gradients", "optimizer", "activations")}
