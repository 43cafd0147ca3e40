"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own shards,
and a checkpoint loads at any other layout (2 ranks with EP=2 -> 1 process, 1 -> 2, ...).

What makes resharding work: model and optimizer state are keyed by the plain model's parameter names
(`get_state_dict`), and sharded weights are DTensors with their global shape (expert weights included,
see `moeforge.parallel.expert`), so DCP's planner maps saved chunks onto whatever shards the loading
layout has. A plain single-process model and optimizer save and load through the same two functions.
Training-loop state that is not a tensor shard (step, schedule, ...) goes into `extra.pt`, written once.

The optimizer state is saved flattened (`flatten_optimizer_state_dict`: hyperparameters keyed by
parameter name, as torchtitan does): pipeline stages hold different parameters, and a per-group list of
parameter names would be one key with a different value on every stage, of which DCP keeps one.
Checkpoints written before this (unflattened, `optim.param_groups.0.params`) still load.

`view`: an object whose `to_saved(model_sd, optim_sd)` maps this rank's state dicts to the layout saved
(and loaded), and `from_saved(...)` back; redundant expert slots use it to keep checkpoints in the
logical layout (`moeforge.parallel.rebalance.RedundantExperts`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import CheckpointError

EXTRA_FILE = "extra.pt"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None,
         view=None):
    """Write model + optimizer shards (all ranks call this) and `extra` (rank 0) to folder `path`."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    if view is not None:
        model_sd, optim_sd = view.to_saved(model_sd, optim_sd)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if _is_main():
        torch.save(extra or {}, path / EXTRA_FILE)
    if dist.is_initialized():
        dist.barrier()


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         alias: Callable[[str], str] | None = None, view=None) -> dict:
    """Load a checkpoint saved at any layout into this (already parallelised) model and optimizer (all
    ranks call this); returns its `extra` dict. A fresh optimizer is fine: its state is created first.

    alias(key) -> the saved key holding the same values, for entries this layout has and others do not
    (DualPipeV's second embedding on rank 0 takes the embedding's weights and optimizer state)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a distributed checkpoint (no .metadata)")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    options = StateDictOptions(flatten_optimizer_state_dict="optim.param_groups.0.params" not in saved)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if view is not None:  # placeholders in the saved layout, filled by dcp.load
        model_sd, optim_sd = view.to_saved(model_sd, optim_sd)
    state = {"model": model_sd, "optim": optim_sd}
    copies = _take_out_aliases(state, saved, alias) if alias else []
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]  # DCP: each rank's traceback; the
        reason = lines[-1] if lines else type(e).__name__                # last line says what is wrong
        raise CheckpointError(f"{path}: does not match this model and layout ({reason[:300]})") from None
    for part, key, source in copies:
        value = state[part][source]
        state[part][key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    if view is not None:
        state["model"], state["optim"] = view.from_saved(state["model"], state["optim"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    extra = path / EXTRA_FILE
    return torch.load(extra, map_location="cpu", weights_only=True) if extra.is_file() else {}


def _take_out_aliases(state: dict, saved, alias) -> list[tuple[str, str, str]]:
    """Remove the entries the checkpoint lacks but holds under alias(key) (also in this state dict); the
    (part, key, source key) to copy after loading."""
    copies = []
    for part, entries in state.items():
        for key in list(entries):
            source = alias(key)
            if f"{part}.{key}" not in saved and source != key and f"{part}.{source}" in saved and source in entries:
                del entries[key]
                copies.append((part, key, source))
    return copies
