"""Measuring activation memory: which tensors autograd keeps for backward, who saved them, and what a
checkpointing plan would keep.

`ActivationRecorder` is a context manager around a forward pass:
* a `saved_tensors_hooks` pack hook sees every tensor autograd saves; tensors are identified by their
  storage (a view and its base, or one tensor saved by three ops, count once), parameters and buffers
  are left out (they are counted as parameters; also the full parameters FSDP2 gathers for a forward);
* global module pre/post forward hooks keep a stack of running modules, so each saved storage is
  attributed to the innermost module that saved it first (its type, and the Block it sits in);
* optionally, every checkpointing candidate is instrumented: its forward time is measured and the
  candidates running at each save are noted, which is enough to compute exactly what any set of
  checkpointed candidates would keep (`ActivationProfile.held`) from this one no-checkpoint forward;
* regions already checkpointed report the inputs they keep alive (torch.utils.checkpoint holds a
  region's arguments until its recompute) -- they count as activations too.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .candidates import Candidate, find_candidates, is_recast
from .checkpointing import checkpoint_observers
from .instrument import Patch, remove_all
from .recast import cast_source
from .recompute import recomputing


def storage_key(t: torch.Tensor) -> tuple:
    """(device, storage address), storage bytes. A DTensor (TP/FSDP parameters) counts as its local
    shard; a tensor without a real storage (other wrapper subclasses) counts as 0 bytes."""
    if isinstance(t, DTensor):
        t = t._local_tensor
    try:
        s = t.untyped_storage()
        return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return (t.device.type, t.device.index, ("no-storage", id(t))), 0


def module_type(module: torch.nn.Module) -> str:
    """The module's class name, as in the plain model (FSDP2 makes a sharded Block an FSDPBlock)."""
    from torch.distributed.fsdp import FSDPModule

    name = type(module).__name__
    return name.removeprefix("FSDP") if isinstance(module, FSDPModule) else name


@dataclass
class SavedStorage:
    nbytes: int
    module_type: str  # innermost module that saved it first
    layer: str  # the Block it was saved in ("layers.3", "mtp.0.block"), or "-" outside blocks
    contexts: set = field(default_factory=set)  # frozensets of candidate names running at each save
    cast_of: object = None  # (parameter, dtype) if it is a low-precision copy of a parameter (recastable)


@dataclass
class ActivationProfile:
    """What one forward saved for backward. Sizes in bytes."""

    saved: dict  # storage key -> SavedStorage
    inputs: dict  # candidate name -> (frozenset of storage keys of its tensor arguments, its own context)
    input_bytes: dict  # storage key -> bytes, for candidate inputs
    checkpoint_inputs: dict  # storage key -> (bytes, layer) held by regions that were checkpointed
    seconds: dict  # candidate name -> forward seconds (fastest of the recorded passes)
    tokens: int = 0

    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved.values())

    @property
    def total_bytes(self) -> int:
        """Activation bytes kept at the end of the forward: saved tensors plus checkpoint-held inputs."""
        extra = sum(b for k, (b, _) in self.checkpoint_inputs.items() if k not in self.saved)
        return self.saved_bytes + extra

    def by_type(self) -> dict[str, int]:
        out = defaultdict(int)
        for s in self.saved.values():
            out[s.module_type] += s.nbytes
        for k, (b, _) in self.checkpoint_inputs.items():
            if k not in self.saved:
                out["(checkpoint inputs)"] += b
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def by_layer(self) -> dict[str, int]:
        out = defaultdict(int)
        for s in self.saved.values():
            out[s.layer] += s.nbytes
        for k, (b, layer) in self.checkpoint_inputs.items():
            if k not in self.saved:
                out[layer] += b
        return dict(out)

    def held(self, plan) -> int:
        """Bytes kept at the end of the forward if the candidates in `plan` were checkpointed (exact for the
        recorded forward): a storage stays if some save of it happened outside every planned region, or if
        it is an argument of a planned region that is not itself inside another planned region."""
        plan = frozenset(plan)
        if not plan:
            return self.saved_bytes
        ckpt, recast = _split(plan)
        kept = {k for k, s in self.saved.items() if any(not _dropped(s, c, ckpt, recast) for c in s.contexts)}
        return self._plus_region_inputs(kept, ckpt)

    def rebuilt(self, name: str, inner=()) -> int:
        """Bytes a region's recompute rebuilds and keeps for its backward (a transient), when the regions
        `inner` nested in it are checkpointed (or recast) too (they keep only their inputs during that
        recompute). For a `weight_casts` candidate: the largest weight copy it recasts at once."""
        if is_recast(name):
            return max((s.nbytes for s in self.saved.values() if s.cast_of is not None
                        and any(name in c for c in s.contexts)), default=0)
        ckpt, recast = _split(frozenset(inner))
        kept = {k for k, s in self.saved.items()
                if any(name in c and not _dropped(s, c, ckpt, recast) for c in s.contexts)}
        return self._plus_region_inputs(kept, ckpt)

    def _plus_region_inputs(self, kept: set, regions: frozenset) -> int:
        """Bytes of the storages `kept`, plus the inputs that each checkpointed region in `regions` (not
        nested in another of them) keeps alive, each storage counted once."""
        total = sum(self.saved[k].nbytes for k in kept)
        for name in regions:
            keys, context = self.inputs[name]
            if context & regions:
                continue
            for k in keys - kept:
                kept.add(k)
                total += self.saved[k].nbytes if k in self.saved else self.input_bytes[k]
        return total


def _split(plan: frozenset) -> tuple[frozenset, frozenset]:
    """(checkpointed regions, weight_casts candidates) of a plan."""
    recast = frozenset(n for n in plan if is_recast(n))
    return plan - recast, recast


def _dropped(s: SavedStorage, context: frozenset, ckpt: frozenset, recast: frozenset) -> bool:
    """Whether a save made while `context` ran is not kept: inside a checkpointed region, or a weight copy
    inside a recasting Block."""
    return bool(context & ckpt) or (s.cast_of is not None and bool(context & recast))


class ActivationRecorder:
    """Context manager recording one or more forward passes of `model` (see the module docstring).

    `candidates=True` instruments every checkpointing candidate (timing and region membership)."""

    def __init__(self, model: torch.nn.Module, candidates: bool | list[Candidate] = False):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.layers = {id(m): n for n, m in model.named_modules() if module_type(m) == "Block"}
        self.static = {storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}
        if candidates is True:
            candidates = find_candidates(model)
        self.candidates = list(candidates or [])
        self._reset()

    def _reset(self) -> None:
        self.saved: dict = {}
        self.inputs: dict = {}
        self.input_bytes: dict = {}
        self.checkpoint_inputs: dict = {}
        self.seconds: dict = {}
        self._keep: list[torch.Tensor] = []  # keeps recorded storages alive so addresses are not reused
        self._modules: list[torch.nn.Module] = []
        self._regions: list[str] = []

    def new_pass(self) -> None:
        """Forget saves and inputs (keep timings): call between repeated forwards of the same batch."""
        seconds = self.seconds
        self._reset()
        self.seconds = seconds

    # --- hooks ---------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if recomputing() or t.numel() == 0:
            return t
        key, nbytes = storage_key(t)
        if key in self.static or key in self._running_parameters():
            return t
        rec = self.saved.get(key)
        if rec is None:
            module = self._modules[-1] if self._modules else None
            rec = self.saved[key] = SavedStorage(nbytes, module_type(module) if module is not None else "-",
                                                 self._layer())
            p = cast_source(t)
            if p is not None:
                rec.cast_of = (p, t.dtype)
            self._keep.append(t)
        rec.contexts.add(frozenset(self._regions))
        return t

    def _running_parameters(self) -> set:
        """Storages of the running modules' parameters now: FSDP2 swaps in the full (gathered) parameters
        for a forward, new storages that are parameters, not activations (checkpointing keeps them too)."""
        return {storage_key(p)[0] for m in self._modules for p in m.parameters(recurse=False)}

    def _layer(self) -> str:
        for m in reversed(self._modules):
            if id(m) in self.layers:
                return self.layers[id(m)]
        return "-"

    def _pre(self, module, args):
        if id(module) in self.names:
            self._modules.append(module)

    def _post(self, module, args, output):
        if self._modules and self._modules[-1] is module:
            self._modules.pop()

    def _tensor_keys(self, args) -> frozenset:
        keys = set()
        for a in args:
            if isinstance(a, torch.Tensor) and a.numel():
                key, nbytes = storage_key(a)
                if key not in self.static:
                    keys.add(key)
                    self.input_bytes[key] = nbytes
                    self._keep.append(a)
        return frozenset(keys)

    def _observe_checkpoint(self, candidate: Candidate, args) -> None:
        for a in args:
            if isinstance(a, torch.Tensor) and a.numel():
                key, nbytes = storage_key(a)
                if key not in self.static:
                    self.checkpoint_inputs[key] = (nbytes, candidate.layer)
                    self._keep.append(a)

    def _timed(self, candidate: Candidate, fn):
        cuda = next(self.model.parameters()).is_cuda

        def run(*args, **kwargs):
            if recomputing():
                return fn(*args, **kwargs)
            self.inputs[candidate.name] = (self._tensor_keys(args), frozenset(self._regions))
            self._regions.append(candidate.name)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.seconds[candidate.name] = min(dt, self.seconds.get(candidate.name, dt))
                self._regions.pop()

        return run

    # --- context -----------------------------------------------------------------------------------------
    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]
        self._patches = [Patch(c, lambda fn, c=c: self._timed(c, fn)) for c in self.candidates]
        checkpoint_observers.append(self._observe_checkpoint)
        return self

    def __exit__(self, *exc):
        checkpoint_observers.remove(self._observe_checkpoint)
        remove_all(self._patches)
        for h in self._handles:
            h.remove()
        self._hooks.__exit__(*exc)
        return False

    def _time_recasts(self) -> None:
        """The cost of a `weight_casts` candidate is not its forward but casting its weights once more:
        timed here (fastest of 3) for the weight copies saved inside it."""
        for c in self.candidates:
            if not is_recast(c.name):
                continue
            casts = {(id(s.cast_of[0]), s.cast_of[1]): s.cast_of for s in self.saved.values()
                     if s.cast_of is not None and any(c.name in ctx for ctx in s.contexts)}
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                for p, dtype in casts.values():
                    p.detach().to(dtype)
                if casts and next(iter(casts.values()))[0].is_cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            self.seconds[c.name] = best

    def profile(self, tokens: int = 0) -> ActivationProfile:
        if self.saved:
            self._time_recasts()
        prof = ActivationProfile(dict(self.saved), dict(self.inputs), dict(self.input_bytes),
                                 dict(self.checkpoint_inputs), dict(self.seconds), tokens)
        self._keep = []
        return prof


def profile_forward(model, input_ids, shift_labels, candidates: bool = False, repeats: int = 1,
                    autocast=None) -> ActivationProfile:
    """Record `repeats` forwards of one batch (the graph is dropped, no backward); timings are the fastest."""
    from contextlib import nullcontext

    with ActivationRecorder(model, candidates) as rec:
        for i in range(repeats):
            rec.new_pass()
            with autocast or nullcontext():
                out = model(input_ids, shift_labels=shift_labels)
            del out
        return rec.profile(tokens=input_ids.numel())
