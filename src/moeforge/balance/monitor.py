"""Expert-load monitoring: token counts per layer and expert, and the MaxVio imbalance metric.

Counts come from each MoE module's `tokens_per_expert` buffer (summed over gradient-accumulation
micro-batches since the last reset); in a distributed run they are summed over the given process
group first, so every rank sees the global load.
"""

from __future__ import annotations

import torch

from ..model import MoE


def moe_modules(model: torch.nn.Module) -> list[MoE]:
    """Every MoE module, main-model layers first, then the MTP blocks'."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def main_moe_modules(model) -> list[MoE]:
    return [moe for _, moe in model.moe_layers()]


def reset_counts(model) -> None:
    for moe in moe_modules(model):
        moe.tokens_per_expert.zero_()


def gather_counts(model, group=None) -> torch.Tensor:
    """[moe layers, experts] token counts of the main model, all-reduced over `group` when given."""
    modules = main_moe_modules(model)
    if not modules:
        return torch.zeros(0, 0)
    counts = torch.stack([m.tokens_per_expert for m in modules]).clone()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load along the last dim (aux-loss-free balancing paper)."""
    load = load.float()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, (load.amax(dim=-1) - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))


def device_load(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, n_devices: int) -> torch.Tensor:
    """Per-device load [layers, devices] for a placement: each expert's load split evenly over its replicas;
    slot s lives on device s // (slots / devices)."""
    per_replica = load.float() / logcnt.clamp_min(1).float()  # [L, E]
    slot_load = per_replica.gather(1, phy2log.long())  # [L, S]
    return slot_load.view(load.shape[0], n_devices, -1).sum(-1)


def load_stats(counts: torch.Tensor) -> dict:
    """Metrics-file fields: per-layer max/mean ratio and MaxVio, and the worst layer's MaxVio."""
    if counts.numel() == 0:
        return {}
    vio = max_vio(counts)
    return {"expert_load_max_over_mean": [round(float(v) + 1, 4) for v in vio],
            "max_vio": round(float(vio.max()), 4)}
