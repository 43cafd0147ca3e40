"""Redundant experts across expert-parallel ranks (the idea of DeepSeek-V3's EPLB), applied from outside.

A placement (`moeforge.balance.placement.plan_placement`, or `moeforge balance plan --json`) gives, per MoE
layer, S physical slots for E logical experts: `phy2log[s]` is the expert slot s holds, and rank r of the
ep group holds slots r * S/ep ... (r + 1) * S/ep - 1 (slot s on device s // (S / ep), as the planner
assumes). A hot expert has several slots, possibly on several ranks. Each MoE layer's `GroupedExperts` is
swapped for a `ReplicatedExpertParallelExperts` holding this rank's S/ep slots (plain parameters of shape
[S/ep, ...], a weight copy per slot), with the experts' contract with `MoE.forward` unchanged: rows [M, D]
sorted by logical expert and counts [E] in, rows in the same order out (so routing, the combine and the
logical `tokens_per_expert` counts stay in the plain model).

Forward, on each rank (M rows, S slots, n = S/ep local slots):
  1. each row picks one replica of its expert: the j-th row of expert e on source rank src goes to
     replica (j + src) mod logcnt[e] (deterministic; every source spreads an expert's rows evenly over its
     replicas, and the source offset keeps the odd rows of different sources on different replicas);
  2. rows are sorted by slot (hence by owning rank), counts per slot are exchanged, rows go to their
     slot's rank (all_to_all_single), are permuted to slot order, and the rank's n slots run as one
     grouped GEMM (the swapped-out `GroupedExperts`, called with this rank's slot weights);
  3. the inverse permutation, the inverse all-to-all and the inverse sort give the rows back in the
     input order. All moves are gathers or autograd all-to-alls: the backward is the inverse exchange.

Backward leaves each slot with the gradient of the rows it computed. `sync_replica_grads(model,
divide_by=dp)` gives every slot its logical expert's gradient: it adds the local slots' gradients into a
dense [E, ...] buffer per weight, all-reduces (sums) it over the group (the ep group by default; pass the
dp group when ep < dp, so that copies on other expert-data-parallel ranks are summed too), divides by
`divide_by` (the dp degree when each rank's loss is the mean over its own tokens), and copies row
phy2log[s] back into slot s. Replicas then have identical gradients and (with identical optimizer state)
identical updates. Cost per MoE layer and step, when the group is the ep group: one all-reduce of the
gradients of the experts with copies on several ranks only (the others have all their copies on one rank,
whose local sum is the whole gradient), plus one scalar for the norm; over a larger group (dp, when
ep < dp) the whole dense buffer, E x 3 x F x D numbers, ep times what unreplicated EP reduces over edp. An
all-reduce per replica group over subgroups would send less there but needs a process group per distinct
set of ranks.

The squared norm of the logical expert gradients is kept by the sync (`replica_grad_sq`), so clipping can
count each logical expert once (`clip_grad_norm(..., uncounted=slot params, extra_sq=replica_grad_sq(model))`),
not once per replica.

Checkpoints in the logical (Hugging Face) layout: `logical_expert_state(model)` gathers each logical
expert's weights (from its first replica) into [E, ...] tensors keyed by the plain model's names, and
`load_logical_expert_state(model, state)` writes them into every slot. The trainer uses this module
through `moeforge.parallel.rebalance` (`moeforge train --redundant-experts R --rebalance-every K`), which
also re-plans the placement during the run (`set_placement` + moving the slots' weights and moments).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.func import functional_call

from ..errors import ConfigError
from ..model.moe import GroupedExperts, MoE
from .expert import _Permute, source_to_expert_order

WEIGHTS = ("gate_up_proj", "down_proj")


# --- placements ------------------------------------------------------------------------------------
def check_placement(phy2log, logcnt, n_layers: int, n_experts: int, ep: int) -> list[list[int]]:
    """Validate a placement for a model with `n_layers` MoE layers of `n_experts` experts on `ep` ranks;
    returns phy2log as lists. logcnt (may be None) must equal each layer's replica counts. Raises a
    one-line ConfigError."""
    try:
        layers = [[int(v) for v in row] for row in phy2log]
    except (TypeError, ValueError):
        raise ConfigError("expert placement: phy2log must be a [layers][slots] list of expert ids") from None
    if len(layers) != n_layers:
        raise ConfigError(f"expert placement has {len(layers)} layers, the model has {n_layers} MoE layers")
    if logcnt is not None and len(logcnt) != n_layers:
        raise ConfigError(f"expert placement: logcnt has {len(logcnt)} layers, phy2log {n_layers}")
    for i, row in enumerate(layers):
        S = len(row)
        if S < n_experts:
            raise ConfigError(f"expert placement layer {i}: {S} slots for {n_experts} experts")
        if S % ep:
            raise ConfigError(f"expert placement layer {i}: {S} slots do not divide over ep={ep} ranks")
        bad = [v for v in row if not 0 <= v < n_experts]
        if bad:
            raise ConfigError(f"expert placement layer {i}: expert id {bad[0]} outside 0..{n_experts - 1}")
        counts = [0] * n_experts
        for v in row:
            counts[v] += 1
        if 0 in counts:
            raise ConfigError(f"expert placement layer {i}: expert {counts.index(0)} has no slot")
        if logcnt is not None and [int(c) for c in logcnt[i]] != counts:
            raise ConfigError(f"expert placement layer {i}: logcnt {list(logcnt[i])} does not match phy2log "
                              f"(replica counts {counts})")
    return layers


def load_placement(path) -> tuple[list[list[int]], list[list[int]] | None]:
    """(phy2log, logcnt) from a JSON file written by `moeforge balance plan --json`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"expert placement {path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict) or "phy2log" not in data:
        raise ConfigError(f"expert placement {path}: no 'phy2log' (write it with moeforge balance plan --json)")
    return data["phy2log"], data.get("logcnt")


# --- the module ------------------------------------------------------------------------------------
class ReplicatedExpertParallelExperts(nn.Module):
    """A drop-in for `GroupedExperts` holding this rank's S/ep physical slots (see the module docstring)."""

    def __init__(self, experts: GroupedExperts, ep_mesh, phy2log):
        super().__init__()
        ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        E = experts.n_experts
        phy2log = check_placement([phy2log], None, 1, E, ep)[0]
        S = len(phy2log)
        self.n_experts, self.n_slots, self.n_local, self.ep_mesh = E, S, S // ep, ep_mesh
        self.ep, self.rank = ep, rank
        self.impl = experts.impl
        dev = experts.gate_up_proj.device
        self.register_buffer("slot_counts", torch.zeros(self.n_local, dtype=torch.long, device=dev), persistent=False)
        self.set_placement(phy2log)
        local = self.local_phy2log
        for name in WEIGHTS:
            w = getattr(experts, name).detach()
            setattr(self, name, nn.Parameter(w[local.to(w.device)].clone()))
            setattr(experts, name, nn.Parameter(torch.empty_like(w[:self.n_local], device="meta")))
        # The swapped-out module computes this rank's slots with their weights (as in ExpertParallelExperts:
        # whatever wraps the plain experts, e.g. FP8 kernels, keeps working).
        experts.n_experts = self.n_local
        self._kernel = (experts,)  # a tuple: not a submodule
        self.logical_grad_sq: torch.Tensor | None = None  # set by sync_grads

    @torch.no_grad()
    def set_placement(self, phy2log) -> None:
        """Take a new placement (same slot count): recompute the routing tables. The slot weights are not
        touched: moving them is the caller's job (`moeforge.parallel.rebalance.move_slots`)."""
        phy2log = check_placement([phy2log], None, 1, self.n_experts, self.ep)[0]
        if len(phy2log) != self.n_slots:
            raise ConfigError(f"placement has {len(phy2log)} slots, this layer {self.n_slots}")
        E, dev = self.n_experts, self.slot_counts.device
        p2l = torch.tensor(phy2log, dtype=torch.long)
        logcnt = torch.bincount(p2l, minlength=E)
        # slots_of[e, r]: the r-th replica's slot of expert e (slot order), padded with -1.
        order = torch.argsort(p2l, stable=True)
        starts = logcnt.cumsum(0) - logcnt
        slots_of = torch.full((E, int(logcnt.max())), -1, dtype=torch.long)
        for e in range(E):
            slots_of[e, :logcnt[e]] = order[starts[e]:starts[e] + logcnt[e]]
        lo, hi = self.rank * self.n_local, (self.rank + 1) * self.n_local
        first = torch.zeros(self.n_slots, dtype=torch.bool)
        first[slots_of[:, 0]] = True  # each expert's first replica: the copy read for the logical weights
        rank_of = torch.arange(self.n_slots) // self.n_local
        ranks = torch.zeros(E, self.ep, dtype=torch.bool)
        ranks[p2l, rank_of] = True  # ranks[e, r]: rank r holds a copy of expert e
        spread = torch.nonzero(ranks.sum(1) > 1).flatten()  # copies on several ranks: gradients all-reduced
        single = torch.nonzero((ranks.sum(1) == 1) & ranks[:, self.rank]).flatten()  # all copies here
        for name, value in (("phy2log", p2l), ("logcnt", logcnt), ("slots_of", slots_of),
                            ("local_phy2log", p2l[lo:hi]), ("local_first", first[lo:hi]),
                            ("spread_experts", spread), ("single_rank_experts", single)):
            self.register_buffer(name, value.to(dev), persistent=False)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by logical expert, counts [E] -> [M, D] in the same order."""
        group = self.ep_mesh.get_group()
        ep, n, M = self.ep, self.n_local, x.shape[0]
        with torch.no_grad():
            counts = counts.to(torch.long)
            expert = torch.repeat_interleave(torch.arange(self.n_experts, device=x.device), counts, output_size=M)
            j = torch.arange(M, device=x.device) - (counts.cumsum(0) - counts)[expert]
            slot = self.slots_of[expert, (j + self.rank) % self.logcnt[expert]]
            order = torch.argsort(slot, stable=True)  # rows grouped by slot, hence by owning rank
            inv_order = torch.empty_like(order)
            inv_order[order] = torch.arange(M, device=x.device)
            send_counts = torch.bincount(slot, minlength=self.n_slots)  # [ep * n]
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=group)
            recv_counts = recv_counts.view(ep, n)  # [source, local slot]
            input_splits = send_counts.view(ep, n).sum(1).tolist()
            output_splits = recv_counts.sum(1).tolist()
            index = source_to_expert_order(recv_counts)
            inverse = torch.empty_like(index)
            inverse[index] = torch.arange(index.numel(), device=index.device)
            per_slot = recv_counts.sum(0)
            self.slot_counts += per_slot
        rows = _Permute.apply(x, order, inv_order)
        recv = all_to_all_single_autograd(rows.contiguous(), output_splits, input_splits, group)
        local_in = _Permute.apply(recv, index, inverse)
        kernel = self._kernel[0]
        kernel.impl = self.impl
        local_out = functional_call(kernel, {name: getattr(self, name) for name in WEIGHTS}, (local_in, per_slot))
        back = _Permute.apply(local_out, inverse, index)
        out = all_to_all_single_autograd(back.contiguous(), input_splits, output_splits, group)
        return _Permute.apply(out, inv_order, order)

    @torch.no_grad()
    def sync_grads(self, divide_by: float = 1.0, group=None) -> None:
        """Every slot's gradient := (sum over all replicas of its expert, over `group`) / divide_by.

        When `group` is the ep group itself, only the experts with copies on several ranks are all-reduced
        (the others' copies are all on one rank: their local sum is the whole gradient, bitwise what the
        dense all-reduce would give, as the other ranks add zeros); over a larger group (dp with ep < dp)
        every expert has copies elsewhere and the dense buffer is all-reduced."""
        ep_group = self.ep_mesh.get_group()
        group = ep_group if group is None else group
        compact = group is ep_group or dist.get_process_group_ranks(group) == dist.get_process_group_ranks(ep_group)
        spread = self.spread_experts
        sq = None
        for name in WEIGHTS:
            w = getattr(self, name)
            grad = w.grad if w.grad is not None else torch.zeros_like(w)  # every rank must join the collective
            dense = grad.new_zeros((self.n_experts,) + tuple(w.shape[1:]))
            dense.index_add_(0, self.local_phy2log, grad)
            if not compact:
                dist.all_reduce(dense, group=group)
            elif spread.numel():
                rows = dense.index_select(0, spread)
                dist.all_reduce(rows, group=group)
                dense.index_copy_(0, spread, rows)
            if divide_by != 1.0:
                dense /= divide_by
            w.grad = dense.index_select(0, self.local_phy2log)
            if compact:  # spread experts: the same on every rank, counted by rank 0; the others by their rank
                mine = self.single_rank_experts if self.rank else torch.cat([self.single_rank_experts, spread])
                part = dense.index_select(0, mine).float().square().sum()
            else:
                part = dense.float().square().sum()
            sq = part if sq is None else sq + part
        if compact:
            dist.all_reduce(sq, group=group)
        self.logical_grad_sq = sq

    @torch.no_grad()
    def logical_weights(self) -> dict[str, torch.Tensor]:
        """{name: [E, ...]} each logical expert's weights, read from its first replica (on every rank)."""
        out = {}
        for name in WEIGHTS:
            w = getattr(self, name).detach()
            dense = w.new_zeros((self.n_experts,) + tuple(w.shape[1:]))
            dense[self.local_phy2log[self.local_first]] = w[self.local_first]
            dist.all_reduce(dense, group=self.ep_mesh.get_group())
            out[name] = dense
        return out

    @torch.no_grad()
    def load_logical_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Write logical [E, ...] weights into this rank's slots."""
        for name in WEIGHTS:
            w = getattr(self, name)
            src = weights[name]
            if tuple(src.shape) != (self.n_experts,) + tuple(w.shape[1:]):
                raise ConfigError(f"{name}: expected logical shape {(self.n_experts,) + tuple(w.shape[1:])}, "
                                  f"got {tuple(src.shape)}")
            w.copy_(src.to(w.device, w.dtype)[self.local_phy2log])

    def extra_repr(self) -> str:
        return (f"slots {self.n_local} of {self.n_slots} on this rank (experts {self.local_phy2log.tolist()}), "
                f"{self.n_experts} logical experts, impl={self.impl}")


# --- applying and using it -------------------------------------------------------------------------
def _moe_layers(model: nn.Module) -> tuple[list[MoE], list[MoE]]:
    """(main-model MoE layers in `model.moe_layers()` order, MoE layers of the MTP blocks)."""
    main = [moe for _, moe in model.moe_layers()]
    seen = {id(m) for m in main}
    extra = [m for m in model.modules() if isinstance(m, MoE) and id(m) not in seen]
    return main, extra


def apply_replicated_expert_parallel(model: nn.Module, ep_mesh, phy2log, logcnt=None) -> nn.Module:
    """Swap every MoE layer's experts for `ReplicatedExpertParallelExperts`. phy2log [layers][slots] (and the
    optional logcnt [layers][experts], checked against it) follow `model.moe_layers()`, as `plan_placement`
    returns them; MoE layers of the MTP blocks, which a load plan does not cover, keep one copy per expert
    (slots = experts, expert e on rank e // (E / ep))."""
    main, extra = _moe_layers(model)
    E, ep = model.config.n_routed_experts, ep_mesh.size()
    layers = check_placement(phy2log, logcnt, len(main), E, ep)
    if extra and E % ep:
        raise ConfigError(f"ep={ep} must divide the {E} experts of the MTP MoE layers (one copy each)")
    for moe, row in zip(main + extra, layers + [list(range(E))] * len(extra)):
        if not isinstance(moe.experts, GroupedExperts):
            raise ConfigError(f"replicated expert parallelism needs plain GroupedExperts, found "
                              f"{type(moe.experts).__name__}")
        moe.experts = ReplicatedExpertParallelExperts(moe.experts, ep_mesh, row)
    return model


def replicated_modules(model: nn.Module) -> list[ReplicatedExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ReplicatedExpertParallelExperts)]


def slot_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, name) for m in replicated_modules(model) for name in WEIGHTS]


def sync_replica_grads(model: nn.Module, divide_by: float = 1.0, group=None) -> None:
    """After backward, on every rank: each slot gets its logical expert's summed gradient / divide_by."""
    for m in replicated_modules(model):
        m.sync_grads(divide_by, group)


def replica_grad_sq(model: nn.Module) -> torch.Tensor:
    """Squared L2 norm of the logical expert gradients (each expert once), from the last sync."""
    parts = [m.logical_grad_sq for m in replicated_modules(model)]
    if any(p is None for p in parts):
        raise RuntimeError("replica_grad_sq: call sync_replica_grads after backward first")
    return torch.stack(parts).sum() if parts else torch.zeros(())


def pop_slot_counts(model: nn.Module) -> list[torch.Tensor]:
    """Rows each local slot computed since the last call, per replicated MoE layer; resets the counters."""
    out = []
    for m in replicated_modules(model):
        out.append(m.slot_counts.clone())
        m.slot_counts.zero_()
    return out


def logical_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert weights in the plain model's layout ({'layers.1.mlp.experts.gate_up_proj': [E, ...]}),
    gathered from the slots on every rank: what a Hugging Face export or a logical checkpoint stores."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for m in replicated_modules(model):
        for name, w in m.logical_weights().items():
            out[f"{names[id(m)]}.{name}"] = w
    return out


def load_logical_expert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Scatter logical expert weights (as `logical_expert_state` returns them) into every rank's slots."""
    names = {id(m): n for n, m in model.named_modules()}
    for m in replicated_modules(model):
        prefix = names[id(m)]
        missing = [f"{prefix}.{n}" for n in WEIGHTS if f"{prefix}.{n}" not in state]
        if missing:
            raise ConfigError(f"logical expert state lacks {missing[0]}")
        m.load_logical_weights({n: state[f"{prefix}.{n}"] for n in WEIGHTS})
