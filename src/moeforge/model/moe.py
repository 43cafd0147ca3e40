"""DeepSeekMoE: a router, fine-grained routed experts run as one grouped GEMM, and shared experts.

Shapes: N tokens (batch x sequence), D hidden, E routed experts, K experts per token, F expert width,
S = N x K routed rows.

Moving rows between token order and expert order is done with gathers in both directions: every map
here is a known permutation (or a token read K times), so each backward is an `index_select` through
the inverse map too rather than a scatter-add (`index_add_`, `index_put_(accumulate=True)`). Activations
are cast to the compute dtype before the K-fold copy, and the K outputs per token are summed in fp32.
Measurements: benchmarks/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .fp32 import KeepsFP32
from .norm import SwiGLU, silu_mul

EXPERT_IMPLS = ("grouped_mm", "bmm", "loop")


class Router(KeepsFP32):
    """Scores experts for each token and picks K of them (DeepSeek-V3 `Gate`, HF `DeepseekV3TopkRouter`).

    `e_score_correction_bias` steers *which* experts are chosen (auxiliary-loss-free balancing updates it
    from outside); the gate weights always come from the unbiased scores. Both it and the weight stay fp32
    when the model is cast to bf16 (`KeepsFP32`): routing decisions do not depend on the weights' dtype.
    """

    fp32_tensors = ("weight", "e_score_correction_bias")

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


# --- row movement with gather-only backward ---------------------------------------------------------
class _Dispatch(torch.autograd.Function):
    """x [N, D] -> rows [N*K, D] in expert order (row r = token order[r] // K), cast to `dtype` first
    (N rows, not N*K). Backward: dx[n] = sum_k drows[rank[n, k]], K gathers accumulated in x's dtype."""

    @staticmethod
    def forward(ctx, x, order, rank, dtype):
        ctx.save_for_backward(rank)
        ctx.x_dtype = x.dtype
        return x.to(dtype).index_select(0, torch.div(order, rank.shape[1], rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (rank,) = ctx.saved_tensors
        dx = grad.index_select(0, rank[:, 0]).to(ctx.x_dtype)
        for k in range(1, rank.shape[1]):
            dx += grad.index_select(0, rank[:, k])
        return dx, None, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_k weights[n, k] * y[rank[n, k]] in fp32 (or y's dtype if wider): each token's K expert
    outputs, weighted and summed. Backward: dy[r] = weights_flat[order[r]] * dout[order[r] // K] (a
    gather through `order`, the inverse of `rank`), dweights[n, k] = <dout[n], y[rank[n, k]]>."""

    @staticmethod
    def forward(ctx, y, weights, rank, order):
        ctx.save_for_backward(y, weights, rank, order)
        acc = torch.promote_types(y.dtype, weights.dtype)
        out = torch.zeros(rank.shape[0], y.shape[1], dtype=acc, device=y.device)
        for k in range(rank.shape[1]):
            out.addcmul_(y.index_select(0, rank[:, k]), weights[:, k:k + 1])
        return out

    @staticmethod
    def backward(ctx, grad):
        y, weights, rank, order = ctx.saved_tensors
        N, K = rank.shape
        dweights = None
        if ctx.needs_input_grad[1]:
            dweights = torch.stack([(y.index_select(0, rank[:, k]) * grad).sum(-1) for k in range(K)], dim=1)
            dweights = dweights.to(weights.dtype)
        g = grad.to(y.dtype)
        dy = g.index_select(0, torch.div(order, K, rounding_mode="floor"))
        dy.mul_(weights.to(y.dtype).flatten().index_select(0, order).unsqueeze(1))
        return dy, dweights, None, None


class _Unpad(torch.autograd.Function):
    """Rows of the padded expert batch back to expert order: out = y[dest]. Backward: dy[p] = grad[src[p]]
    for real rows, 0 for padding rows (a gather plus a fill, not a scatter)."""

    @staticmethod
    def forward(ctx, y, dest, src, pad_rows):
        ctx.save_for_backward(src, pad_rows)
        return y.index_select(0, dest)

    @staticmethod
    def backward(ctx, grad):
        src, pad_rows = ctx.saved_tensors
        return grad.index_select(0, src).index_fill_(0, pad_rows, 0), None, None, None


class _Pad(torch.autograd.Function):
    """Expert-ordered rows into the padded [E * capacity] layout: out = x[src] with padding rows zeroed.
    Backward: dx = grad[dest] (each real row has exactly one padded slot)."""

    @staticmethod
    def forward(ctx, x, src, dest, pad_rows):
        ctx.save_for_backward(dest)
        return x.index_select(0, src).index_fill_(0, pad_rows, 0)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return grad.index_select(0, dest), None, None, None


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
            # torch.compile's shape function for _grouped_mm (torch 2.13) accepts only bf16: run other
            # dtypes outside the graph rather than fail.
            mm = torch._grouped_mm if x.dtype == torch.bfloat16 else _grouped_mm_eager
            h = mm(x, w_in.transpose(-2, -1), offs=offs)
            return mm(swiglu(h), w_out.transpose(-2, -1), offs=offs)
        if self.impl == "bmm":
            return self._padded_bmm(x, counts, w_in, w_out)
        if self.impl == "loop":
            # split/unbind rather than slicing and indexing: their backward is one cat/stack, where each
            # slice or w[e] would add a full-size zero tensor to the gradient.
            sizes = counts.tolist()
            outs = [swiglu(xe @ wi.T) @ wo.T
                    for xe, wi, wo, n in zip(x.split(sizes), w_in.unbind(0), w_out.unbind(0), sizes) if n]
            return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])
        raise ValueError(f"unknown expert impl {self.impl!r}; choose from {EXPERT_IMPLS}")

    def _padded_bmm(self, x, counts, w_in, w_out):
        E, M, D = self.n_experts, x.shape[0], x.shape[1]
        capacity = int(counts.max()) if M else 0
        # Row r, the j-th of expert e's group, goes to padded row dest[r] = e * capacity + j; src is the
        # inverse map (padding rows point at row 0 and are zeroed).
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
        starts = counts.cumsum(0) - counts
        dest = torch.arange(M, device=x.device) + expert_of_row * capacity - starts[expert_of_row]
        src = torch.zeros(E * capacity, dtype=torch.long, device=x.device)
        src[dest] = torch.arange(M, device=x.device)
        is_pad = torch.ones(E * capacity, dtype=torch.bool, device=x.device)
        is_pad[dest] = False
        pad_rows = is_pad.nonzero().squeeze(1)
        padded = _Pad.apply(x, src, dest, pad_rows).view(E, capacity, D)
        h = swiglu(torch.bmm(padded, w_in.transpose(1, 2)))
        y = torch.bmm(h, w_out.transpose(1, 2)).view(E * capacity, D)
        return _Unpad.apply(y, dest, src, pad_rows)


@torch.compiler.disable
def _grouped_mm_eager(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return silu_mul(gate, up)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would use for a matmul on x (custom kernels are not autocast-aware)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def run_experts_in_turn(moe: "MoE", xs: torch.Tensor, counts: torch.Tensor, x: torch.Tensor):
    """The default `MoE.expert_runner`: the routed experts on xs [N*K, D] (expert order, counts [E]), then
    the shared experts on x [N, D] -> (routed rows [N*K, D], shared output [N, D] or None)."""
    y = moe.experts(xs, counts)
    return y, (moe.shared_experts(x) if moe.shared_experts is not None else None)


class MoE(KeepsFP32):
    """Routed experts (top-K of E) plus always-on shared experts.

    `tokens_per_expert` accumulates how many tokens each expert received since the last reset: the
    signal for load monitoring and balancing, which read and reset it from outside the model. It stays
    fp32 under bf16 casts (bf16 counts are exact only up to 256).

    `expert_runner(moe, xs, counts, x) -> (routed rows, shared output or None)` is the hook point for how
    the two independent expert computations run: in turn (`run_experts_in_turn`), unless code outside the
    model sets another on the instance (expert parallelism runs the shared experts while its token
    exchange is in flight, `moeforge.parallel.expert`).
    """

    fp32_tensors = ("tokens_per_expert",)
    expert_runner = staticmethod(run_experts_in_turn)

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
        N, K = indices.shape
        flat = indices.flatten()  # [N*K]
        # Tokens per expert, [E] whatever the data (bincount's size depends on the data: a torch.compile break).
        counts = torch.zeros(self.gate.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        with torch.no_grad():
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        order = flat.argsort(stable=True)  # sorted row r holds routed slot order[r] = n * K + k
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)  # slot -> sorted row
        rank = rank.view(N, K)
        # Under autocast the experts compute in the autocast dtype: cast the N rows before the K-fold copy.
        xs = _Dispatch.apply(x, order, rank, compute_dtype(x))  # [N*K, D] in expert order
        y, shared = self.expert_runner(self, xs, counts, x)  # [N*K, D], [N, D] or None
        out = _Combine.apply(y, weights, rank, order)  # [N, D], fp32 sum of the K weighted outputs
        if shared is not None:
            out = out + shared
        # Back to the residual stream's dtype (bf16 weights: bf16; fp32 weights under autocast: fp32).
        return out.to(x.dtype).view(shape[:-1] + out.shape[-1:])
