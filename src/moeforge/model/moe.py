"""DeepSeekMoE: a router, fine-grained routed experts run as one grouped GEMM, and shared experts.

Shapes: N tokens (batch x sequence), D hidden, E routed experts, K experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import SwiGLU

EXPERT_IMPLS = ("grouped_mm", "bmm", "loop")


class Router(nn.Module):
    """Scores experts for each token and picks K of them (DeepSeek-V3 `Gate`, HF `DeepseekV3TopkRouter`).

    `e_score_correction_bias` steers *which* experts are chosen (auxiliary-loss-free balancing updates it
    from outside); the gate weights always come from the unbiased scores.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> gate weights [N, K] (fp32), expert ids [N, K], scores [N, E] (fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions stay in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.scoring_func == "sigmoid":  # V3: a group is as good as its two best experts
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:  # V2: ... as its best expert
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, applied to tokens already sorted by expert.

    Layout as in HF transformers v5: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
    `impl` picks the kernel (set by `moeforge.hardware`, never by the device here):
      grouped_mm  torch._grouped_mm over variable-size groups (no padding);
      bmm         pad every expert to the largest group and run one batched matmul;
      loop        one matmul per non-empty expert (reference / last resort).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, impl: str = "bmm"):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.impl = impl

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] tokens per expert -> [M, D]."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        w_in, w_out = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if self.impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x, w_in.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(swiglu(h), w_out.transpose(-2, -1), offs=offs)
        if self.impl == "bmm":
            return self._padded_bmm(x, counts, w_in, w_out)
        if self.impl == "loop":
            outs, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    xe = x[start:start + n]
                    outs.append(swiglu(xe @ w_in[e].T) @ w_out[e].T)
                    start += n
            return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])
        raise ValueError(f"unknown expert impl {self.impl!r}; choose from {EXPERT_IMPLS}")

    def _padded_bmm(self, x, counts, w_in, w_out):
        E, M = self.n_experts, x.shape[0]
        capacity = int(counts.max())
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(M, device=x.device) - starts[expert_of_row]
        padded = x.new_zeros(E, capacity, x.shape[1])
        padded[expert_of_row, slot] = x
        h = swiglu(torch.bmm(padded, w_in.transpose(1, 2)))
        return torch.bmm(h, w_out.transpose(1, 2))[expert_of_row, slot]


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would use for a matmul on x (custom kernels are not autocast-aware)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoE(nn.Module):
    """Routed experts (top-K of E) plus always-on shared experts.

    `tokens_per_expert` accumulates how many tokens each expert received since the last reset: the
    signal for load monitoring and balancing, which read and reset it from outside the model.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, indices, _ = self.gate(x)  # [N, K]
        flat = indices.flatten()  # [N*K]
        counts = torch.bincount(flat, minlength=self.gate.n_experts)
        with torch.no_grad():
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        order = flat.argsort(stable=True)  # rows grouped by expert
        token = order // self.top_k
        y = self.experts(x[token], counts)  # [N*K, D]
        y = y * weights.flatten()[order, None].to(y.dtype)
        out = torch.zeros_like(x, dtype=y.dtype).index_add_(0, token, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape[:-1] + out.shape[-1:])
