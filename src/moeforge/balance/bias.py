"""Auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2; Wang et al. 2024).

After each optimizer step every router's `e_score_correction_bias` moves by gamma towards balance:
b_i += gamma * sign(mean_load - load_i). The bias only enters expert *selection* (see
`moeforge.model.moe.Router`), never the gate weights, so it steers load without distorting outputs.
It runs outside `forward`, once per optimizer step, on counts summed over micro-batches (and over
ranks when a process group is given), so activation recomputation cannot count tokens twice here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .monitor import moe_modules


@dataclass
class BiasBalancer:
    gamma: float = 1e-3  # bias update speed (DeepSeek-V3: 0.001 for most of training)
    freeze_after: int | None = None  # step from which gamma is 0 (V3 froze it for the last 500B tokens)
    final_gamma: float | None = None  # decay gamma geometrically to this by `total_steps` (None: constant)
    total_steps: int | None = None

    def speed(self, step: int) -> float:
        """gamma at `step`. A sign update moves every bias by gamma each step, so the loads oscillate around
        balance with an amplitude set by gamma: a large gamma balances a short run quickly, a decaying one
        then settles it (geometric, like the scale of the correction needed)."""
        if self.freeze_after is not None and step >= self.freeze_after:
            return 0.0
        if self.final_gamma is None or not self.total_steps or self.gamma == 0:
            return self.gamma
        progress = min(1.0, step / max(1, self.total_steps - 1))
        return self.gamma * (self.final_gamma / self.gamma) ** progress

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, group=None) -> None:
        """Apply one update to every MoE module (main layers and MTP blocks) from its token counts."""
        gamma = self.speed(step)
        if gamma == 0:
            return
        for moe in moe_modules(model):
            load = moe.tokens_per_expert.clone()
            if group is not None:
                import torch.distributed as dist

                dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
            if load.sum() == 0:
                continue
            bias = moe.gate.e_score_correction_bias
            bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
