"""Redundant experts in the trainer: `moeforge train --ep N --redundant-experts R --rebalance-every K`.

Every main-model MoE layer gets S = E + R physical slots, S / ep per rank (`replicated.py` runs them).
The first placement is the planner's for even loads; then, every K steps, the loads the routers produced
since the last re-placement (summed over steps and over the data-parallel ranks) go to
`moeforge.balance.placement.plan_placement` (hierarchical where expert groups and nodes allow), and each
slot whose expert changes receives that expert's weights *and its AdamW moments* from a rank holding a
copy (one all-to-all per layer; a copy this rank already holds is copied locally). Replicas have identical
weights and moments (their gradients are the logical expert's), so any copy is the expert: the run stays
numerically what it is without redundancy. MTP blocks' MoE layers keep one copy per expert.

What the trainer sees (`RedundantExperts`):
* `sync_and_clip` after backward: every slot gets its logical expert's gradient (summed over the dp group,
  / dp), and the norm counts each logical expert once (`clip_grad_norm(uncounted=slots, extra_sq=...)`);
* `after_step`: the rows each EP rank's slots computed this step (`ep_rank_rows`, the straggler signal),
  and on re-placement steps a `rebalance` record: predicted balancedness (mean / max device load, per
  layer, from the observed loads) with the old and the new placement, slots changed and bytes moved;
* `to_saved` / `from_saved` (the `view` of `dist_checkpoint`): checkpoints hold the logical [E, ...]
  expert weights and moments, as DTensors sharded over ep, the same tensors as a run without redundancy,
  so a checkpoint resumes at any R, ep degree or in one process; `logical_weights` for the Hugging Face
  export; the placement is kept in extra.pt and taken over by a resume with the same slots and ep.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..balance.monitor import device_load, main_moe_modules
from ..balance.placement import plan_placement
from .replicated import (WEIGHTS, ReplicatedExpertParallelExperts, replica_grad_sq, replicated_modules,
                         slot_parameters, sync_replica_grads)
from .grads import clip_grad_norm


MIN_GAIN = 0.005  # balancedness a layer's new placement must gain to be moved to


def n_nodes(ep: int) -> int:
    """Nodes the ep ranks span (torchrun's LOCAL_WORLD_SIZE ranks per node), for hierarchical placement."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ep))
    return ep // local if 0 < local < ep and ep % local == 0 else 1


def plan(loads: np.ndarray, model_config, ep: int, n_slots: int):
    """The placement of `n_slots` slots per layer over ep ranks for loads [MoE layers, E]."""
    groups = model_config.n_group if model_config.n_routed_experts % max(model_config.n_group, 1) == 0 else 1
    return plan_placement(loads, n_slots, n_groups=groups, n_nodes=n_nodes(ep), n_devices=ep, policy="auto")


def initial_placement(model_config, ep: int, redundant: int) -> list[list[int]]:
    """Before any load is seen (phy2log [main MoE layers][slots]): a guess, corrected by the first
    re-placement. The planner's placement for even loads, the extra copies going to the last experts
    (ties broken that way, not toward expert 0, which is the one `--routing hot:F` makes hot)."""
    L, E = model_config.num_moe_layers, model_config.n_routed_experts
    guess = 1.0 + (np.arange(E) >= E - redundant)
    return plan(np.tile(guess, (L, 1)), model_config, ep, E + redundant).phy2log.tolist()


def balancedness(loads: np.ndarray, phy2log: np.ndarray, ep: int) -> list[float]:
    """Mean / max device load per layer, each expert's load split evenly over its replicas."""
    load = torch.as_tensor(loads, dtype=torch.float64)
    p2l = torch.as_tensor(np.asarray(phy2log), dtype=torch.long)
    logcnt = torch.stack([torch.bincount(row, minlength=load.shape[1]) for row in p2l])
    dev = device_load(load, p2l, logcnt, ep).double()
    return [round(float(v), 4) for v in dev.mean(1) / dev.amax(1).clamp_min(1e-12)]


def _state_tensors(optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-slot state of p (AdamW's moments: tensors shaped like p); not the step counter."""
    return [t for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor) and t.shape == p.shape]


@torch.no_grad()
def move_slots(module: ReplicatedExpertParallelExperts, phy2log: list[int], optimizer) -> int:
    """Re-place one layer's slots: every slot of the new placement gets its expert's weights and optimizer
    moments (from this rank's old copy if it has one, else from the lowest rank holding one), then the
    routing tables switch. Every rank of the ep group calls it with the same phy2log. -> bytes this rank
    received from other ranks."""
    ep, n, me = module.ep, module.n_local, module.rank
    old = module.phy2log.tolist()
    holder = {}  # expert -> (rank, local index) of its first old copy
    for s, e in enumerate(old):
        holder.setdefault(e, (s // n, s % n))
    local_old = [{e: j for j, e in reversed(list(enumerate(old[r * n:(r + 1) * n])))} for r in range(ep)]
    # source of every new slot: (destination rank, its local slot, source rank, source local slot)
    moves = []
    for s, e in enumerate(phy2log):
        dst, j = divmod(s, n)
        src = (dst, local_old[dst][e]) if e in local_old[dst] else holder[e]
        moves.append((dst, j, *src))
    tensors = []
    for name in WEIGHTS:
        p = getattr(module, name)
        tensors += [p.data, *_state_tensors(optimizer, p)]
    send = [(dst, sj) for dst, _, src, sj in moves if src == me and dst != me]  # ordered by destination
    recv = sorted(((src, j) for dst, j, src, _ in moves if dst == me and src != me))  # ordered by source, slot
    in_splits = [sum(1 for d, _ in send if d == r) for r in range(ep)]
    out_splits = [sum(1 for s, _ in recv if s == r) for r in range(ep)]
    width = [t[0].numel() for t in tensors]
    ref = tensors[0]
    rows_out = torch.cat([t[[sj for _, sj in send]].reshape(len(send), -1) for t in tensors], 1) if send else \
        ref.new_zeros(0, sum(width))
    rows_in = ref.new_empty(len(recv), sum(width))
    dist.all_to_all_single(rows_in, rows_out.contiguous(), out_splits, in_splits, group=module.ep_mesh.get_group())
    local = [(j, sj) for dst, j, src, sj in moves if dst == me and src == me]
    news = [t.clone() for t in tensors]
    for new, t in zip(news, tensors):
        if local:
            new[[j for j, _ in local]] = t[[sj for _, sj in local]]
    if recv:
        at = 0
        for new, w in zip(news, width):
            new[[j for _, j in recv]] = rows_in[:, at:at + w].reshape(len(recv), *new.shape[1:])
            at += w
    for new, t in zip(news, tensors):
        t.copy_(new)
    module.set_placement(phy2log)
    return rows_in.numel() * rows_in.element_size()


class RedundantExperts:
    """The redundant expert slots of one DistributedTrainer's model (see the module docstring)."""

    def __init__(self, model, mesh, layout, cfg, model_config):
        self.model, self.layout, self.cfg, self.model_config = model, layout, cfg, model_config
        self.ep_group, self.dp_group = mesh["ep"].get_group(), mesh["dp"].get_group()
        self.ep_rank = mesh["ep"].get_local_rank()
        self.modules = replicated_modules(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [names[id(m)] for m in self.modules]
        main = {id(moe.experts) for moe in main_moe_modules(model)}
        self.main = [m for m in self.modules if id(m) in main]  # the planned layers, in moe_layers() order
        self._moes = main_moe_modules(model)
        self.loads = torch.zeros(len(self._moes), model_config.n_routed_experts, dtype=torch.float64)
        self.rebalances = 0

    # --- placement ------------------------------------------------------------------------------
    def placement(self) -> list[list[int]]:
        return [m.phy2log.tolist() for m in self.main]

    def apply_placement(self, phy2log, optimizer) -> int:
        """Move every planned layer to phy2log [layers][slots]; -> bytes moved over all ranks."""
        moved = 0
        for m, row in zip(self.main, phy2log):
            if list(row) != m.phy2log.tolist():
                moved += move_slots(m, [int(e) for e in row], optimizer)
        total = torch.tensor([moved], dtype=torch.float64)
        dist.all_reduce(total, group=self.dp_group)
        return int(total.item())

    # --- per step -------------------------------------------------------------------------------
    def start_step(self) -> None:
        for m in self.modules:  # evaluation's forwards are not the step's rows
            m.slot_counts.zero_()

    def sync_and_clip(self, params, max_norm: float) -> torch.Tensor:
        """After backward: slots get their logical experts' gradients; the global norm (clipped to max_norm)
        counts each logical expert once."""
        sync_replica_grads(self.model, divide_by=float(self.layout.dp), group=self.dp_group)
        slots = slot_parameters(self.model)
        seen = {id(p) for p in params}
        params = list(params) + [p for p in slots if id(p) not in seen]
        return clip_grad_norm(params, max_norm, uncounted=slots, extra_sq=replica_grad_sq(self.model))

    def after_step(self, step: int, optimizer, console=None) -> dict:
        """Metrics of the step just done (rows per EP rank), and the re-placement when step % K == 0."""
        rows = torch.zeros(self.layout.ep, dtype=torch.float64)
        rows[self.ep_rank] = float(sum(int(m.slot_counts.sum()) for m in self.modules))
        dist.all_reduce(rows, group=self.ep_group)
        self.loads += torch.stack([moe.tokens_per_expert.double().cpu() for moe in self._moes])
        out = {"ep_rank_rows": [int(r) for r in rows.tolist()],
               "ep_rows_max_over_mean": round(float(rows.max() / rows.mean().clamp_min(1e-12)), 4)}
        if step % self.cfg.rebalance_every == 0:
            out["rebalance"] = self.rebalance(optimizer)
            if console is not None:
                r = out["rebalance"]
                console.print(f"  step {step}: experts re-placed ({r['slots_changed']} slots, "
                              f"{r['bytes_moved'] / 1e6:.2f} MB moved), balancedness (mean/max device load, worst "
                              f"layer) {min(r['balancedness_before']):.3f} -> {min(r['balancedness_after']):.3f}")
        return out

    def rebalance(self, optimizer) -> dict:
        """Re-plan from the loads summed since the last re-placement (over dp ranks) and move the slots."""
        loads = self.loads.clone()
        dist.all_reduce(loads, group=self.dp_group)
        self.loads.zero_()
        loads = loads.numpy()
        old = np.array(self.placement())
        planned = plan(loads, self.model_config, self.layout.ep, old.shape[1]).phy2log
        before = balancedness(loads, old, self.layout.ep)
        # A layer moves only if the plan is clearly better there (the greedy planner can come out slightly
        # worse than a placement that happens to fit; moving costs bytes and changes nothing then).
        better = np.array(balancedness(loads, planned, self.layout.ep)) > np.array(before) + MIN_GAIN
        new = np.where(better[:, None], planned, old)
        moved = self.apply_placement(new.tolist(), optimizer)
        self.rebalances += 1
        return {"balancedness_before": before, "balancedness_after": balancedness(loads, new, self.layout.ep),
                "slots_changed": int((old != new).sum()), "bytes_moved": moved,
                "replicas": [np.bincount(row, minlength=loads.shape[1]).tolist() for row in new]}

    # --- checkpoints ----------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"ep": self.layout.ep, "phy2log": self.placement()}

    def restore(self, extra: dict, optimizer) -> bool:
        """Take over a checkpoint's placement if it was made for the same ep and slot count."""
        saved = (extra or {}).get("expert_placement")
        if not saved or saved.get("ep") != self.layout.ep or np.array(saved["phy2log"]).shape != \
                np.array(self.placement()).shape:
            return False
        self.apply_placement(saved["phy2log"], optimizer)
        return True

    @torch.no_grad()
    def _logical(self, m: ReplicatedExpertParallelExperts, t: torch.Tensor) -> torch.Tensor:
        """Per-slot tensor [S/ep, ...] -> the logical [E, ...] tensor (first replicas), on every rank."""
        dense = t.new_zeros((m.n_experts,) + tuple(t.shape[1:]))
        dense[m.local_phy2log[m.local_first]] = t[m.local_first]
        dist.all_reduce(dense, group=self.ep_group)
        return dense

    def _entries(self, optim_sd: dict):
        """(container, key, module, weight name) of every per-slot entry of the model-side names in a flattened
        (`state.<fqn>.<name>`) or nested (`state: {fqn: {...}}`) optimizer state dict."""
        for m, prefix in zip(self.modules, self.prefixes):
            for name in WEIGHTS:
                fqn = f"{prefix}.{name}"
                nested = optim_sd.get("state", {}).get(fqn) if isinstance(optim_sd.get("state"), dict) else None
                if nested is not None:
                    yield from ((nested, k, m, fqn) for k, v in nested.items() if _is_slot(v, m))
                else:
                    yield from ((optim_sd, k, m, fqn) for k, v in list(optim_sd.items())
                                if k.startswith(f"state.{fqn}.") and _is_slot(v, m))

    def to_saved(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Slot tensors -> logical [E, ...] DTensors sharded over ep (what a run without redundancy saves)."""
        ep_mesh = self.modules[0].ep_mesh
        rows = self.model_config.n_routed_experts // self.layout.ep

        def shard(m, t):
            full = self._logical(m, t)
            return DTensor.from_local(full[self.ep_rank * rows:(self.ep_rank + 1) * rows].contiguous(), ep_mesh,
                                      [Shard(0)], run_check=False)

        model_sd = dict(model_sd)
        for m, prefix in zip(self.modules, self.prefixes):
            for name in WEIGHTS:
                model_sd[f"{prefix}.{name}"] = shard(m, model_sd[f"{prefix}.{name}"])
        for container, key, m, _ in list(self._entries(optim_sd)):
            container[key] = shard(m, container[key])
        return model_sd, optim_sd

    def from_saved(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """The inverse of to_saved: logical DTensors -> this rank's slots."""
        def slots(m, t):
            return t.full_tensor()[m.local_phy2log]

        for m, prefix in zip(self.modules, self.prefixes):
            for name in WEIGHTS:
                model_sd[f"{prefix}.{name}"] = slots(m, model_sd[f"{prefix}.{name}"])
        for container, key, m, _ in [(c, k, m, f) for c, k, m, f in self._logical_entries(optim_sd)]:
            container[key] = slots(m, container[key])
        return model_sd, optim_sd

    def _logical_entries(self, optim_sd: dict):
        for m, prefix in zip(self.modules, self.prefixes):
            for name in WEIGHTS:
                fqn = f"{prefix}.{name}"
                state = optim_sd.get("state")
                if isinstance(state, dict) and fqn in state:
                    yield from ((state[fqn], k, m, fqn) for k, v in state[fqn].items() if isinstance(v, DTensor))
                else:
                    yield from ((optim_sd, k, m, fqn) for k, v in list(optim_sd.items())
                                if k.startswith(f"state.{fqn}.") and isinstance(v, DTensor))

    def logical_weights(self) -> dict[str, torch.Tensor]:
        """{plain model name: logical [E, ...] weights} for the Hugging Face export (every rank calls it)."""
        return {f"{prefix}.{name}": self._logical(m, getattr(m, name).detach())
                for m, prefix in zip(self.modules, self.prefixes) for name in WEIGHTS}

    def full_to_slots(self, weights: dict, optim_state: dict) -> None:
        """A single-process checkpoint's full logical weights and per-name optimizer state -> this rank's slots
        (in place)."""
        for m, prefix in zip(self.modules, self.prefixes):
            index = m.local_phy2log.cpu()
            for name in WEIGHTS:
                key = f"{prefix}.{name}"
                weights[key] = weights[key][index]
                for k, v in (optim_state.get(key) or {}).items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == m.n_experts:
                        optim_state[key][k] = v[index]


def _is_slot(v, m: ReplicatedExpertParallelExperts) -> bool:
    return isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0 and v.shape[0] == m.n_local
