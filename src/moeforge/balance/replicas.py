"""Replicated (redundant) experts at run time, applied by swapping each MoE's expert module from outside.

A placement (see `placement.py`) gives S physical slots for E logical experts. `ReplicatedExperts`
holds one weight copy per slot; each token assigned to logical expert e goes to replica
(its rank among e's tokens) mod logcnt[e], so an expert's tokens spread evenly over its replicas.
Because all replicas hold the same weights the outputs equal the unreplicated model's; after backward,
`sync_replica_grads` gives every replica the sum of its group's gradients (the logical expert's
gradient), so identical optimizer updates keep the copies identical. In an expert-parallel run the
replicas sit on different ranks and that sum is an all-reduce: `moeforge.parallel.replicated`; here
all replicas live in one process.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import GroupedExperts, MoE


class ReplicatedExperts(nn.Module):
    def __init__(self, experts: GroupedExperts, phy2log, logcnt):
        super().__init__()
        self.phy2log = torch.as_tensor(phy2log, dtype=torch.long)  # [S]
        self.logcnt = torch.as_tensor(logcnt, dtype=torch.long)  # [E]
        if int(self.logcnt.sum()) != len(self.phy2log) or (self.logcnt < 1).any():
            raise ValueError("placement: every expert needs >= 1 replica and counts must sum to the slots")
        self.n_logical = experts.n_experts
        self.physical = GroupedExperts(len(self.phy2log), experts.gate_up_proj.shape[2], experts.hidden,
                                       impl=experts.impl)
        with torch.no_grad():
            self.physical.gate_up_proj.copy_(experts.gate_up_proj[self.phy2log])
            self.physical.down_proj.copy_(experts.down_proj[self.phy2log])
        # Slots of each logical expert in replica order: slots_of[e, r] (padded with -1).
        order = torch.argsort(self.phy2log, stable=True)
        starts = torch.cumsum(self.logcnt, 0) - self.logcnt
        self.slots_of = torch.full((self.n_logical, int(self.logcnt.max())), -1, dtype=torch.long)
        for e in range(self.n_logical):
            self.slots_of[e, :self.logcnt[e]] = order[starts[e]:starts[e] + self.logcnt[e]]

    @property
    def impl(self) -> str:
        return self.physical.impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.physical.impl = value

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by logical expert, counts [E] -> [M, D] in the same order."""
        expert = torch.repeat_interleave(torch.arange(self.n_logical, device=x.device), counts, output_size=len(x))
        rank_in_expert = torch.arange(len(x), device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
        slot = self.slots_of.to(x.device)[expert, rank_in_expert % self.logcnt.to(x.device)[expert]]
        order = torch.argsort(slot, stable=True)  # rows grouped by physical slot
        phys_counts = torch.bincount(slot, minlength=len(self.phy2log))
        y = self.physical(x[order], phys_counts)
        return torch.empty_like(y).index_copy_(0, order, y)

    @torch.no_grad()
    def sync_grads(self) -> None:
        for w in (self.physical.gate_up_proj, self.physical.down_proj):
            if w.grad is None:
                continue
            total = torch.zeros((self.n_logical,) + w.shape[1:], dtype=w.grad.dtype, device=w.grad.device)
            total.index_add_(0, self.phy2log.to(w.device), w.grad)
            w.grad.copy_(total[self.phy2log.to(w.device)])

    def logical_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) per logical expert, read from each expert's first replica."""
        first = self.slots_of[:, 0]
        return self.physical.gate_up_proj[first], self.physical.down_proj[first]


def replicate_experts(model: nn.Module, phy2log, logcnt) -> nn.Module:
    """Swap every main-model MoE layer's experts for replicated ones; phy2log/logcnt are [layers][...]
    in `model.moe_layers()` order (as `plan_placement` returns them)."""
    layers = model.moe_layers()
    if len(phy2log) != len(layers):
        raise ValueError(f"placement has {len(phy2log)} layers, the model {len(layers)} MoE layers")
    for (_, moe), slots, counts in zip(layers, phy2log, logcnt):
        moe.experts = ReplicatedExperts(moe.experts, slots, counts)
    return model


def sync_replica_grads(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ReplicatedExperts):
            module.sync_grads()


def unreplicate_experts(model: nn.Module) -> nn.Module:
    """Back to one copy per expert (e.g. before saving in the Hugging Face layout)."""
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, ReplicatedExperts):
            rep = module.experts
            plain = GroupedExperts(rep.n_logical, rep.physical.gate_up_proj.shape[2], rep.physical.hidden,
                                   impl=rep.impl)
            gate_up, down = rep.logical_weights()
            with torch.no_grad():
                plain.gate_up_proj.copy_(gate_up)
                plain.down_proj.copy_(down)
            module.experts = plain
    return model
