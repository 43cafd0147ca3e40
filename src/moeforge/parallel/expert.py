"""Expert parallelism, applied from outside: each MoE layer's `GroupedExperts` is swapped for an
`ExpertParallelExperts` that holds E / ep of the experts and exchanges token rows with the other ranks
of its ep group.

The swap keeps the experts' contract with `MoE.forward`: rows [M, D] sorted by (global) expert id and
counts [E] in, rows in the same order out. So routing, the token-order <-> expert-order permutation,
the weighted combine and the `tokens_per_expert` counts stay in the plain model, untouched.

Inside (M rows sorted by expert, E experts, El = E / ep local experts, S = ep source ranks):
  1. counts are exchanged (all_to_all) so each rank knows how many rows of each local expert every
     source sends; the row splits follow (the experts of rank j are contiguous in expert order);
  2. dispatch: rows go to their expert's rank (all_to_all_single with variable splits);
  3. received rows, ordered (source, expert), are permuted to (expert, source) for the grouped GEMM;
  4. combine: the inverse permutation and the inverse all-to-all bring results back in input order.
Both all-to-alls are autograd functional collectives: the backward of each is the inverse exchange.

The weights are DTensors sharded on dim 0 over the ep mesh, so their global shape and name equal the
single-process model's: distributed checkpoints reshard them to any other layout, and FSDP can shard
them further over the expert-data-parallel mesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard
from torch.func import functional_call

from ..model.moe import MoE, GroupedExperts


class _Permute(torch.autograd.Function):
    """out = x[index] for a permutation `index`; backward gathers through the inverse (no scatter)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def source_to_expert_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts [S, El] rows per (source, local expert), stored source-major -> index [R] such that
    rows[index] is expert-major (all of expert 0 from every source, then expert 1, ...)."""
    S, El = recv_counts.shape
    flat = recv_counts.flatten()
    starts = (flat.cumsum(0) - flat).view(S, El)  # where block (s, e) begins in source-major order
    sizes = recv_counts.t().flatten()  # block sizes in expert-major order
    block_start = starts.t().flatten()
    total = int(flat.sum())
    out_starts = sizes.cumsum(0) - sizes
    shift = torch.repeat_interleave(block_start - out_starts, sizes, output_size=total)
    return torch.arange(total, device=recv_counts.device) + shift


class ExpertParallelExperts(nn.Module):
    """A drop-in for `GroupedExperts` holding this rank's E / ep experts (see the module docstring)."""

    def __init__(self, experts: GroupedExperts, ep_mesh):
        super().__init__()
        ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        E = experts.n_experts
        self.n_experts, self.n_local, self.ep_mesh = E, E // ep, ep_mesh
        self.impl = experts.impl
        lo, hi = rank * self.n_local, (rank + 1) * self.n_local
        for name in ("gate_up_proj", "down_proj"):
            local = getattr(experts, name).detach()[lo:hi].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)))
            # The swapped-out module keeps no weights of its own (meta placeholders free the full copy) ...
            setattr(experts, name, nn.Parameter(torch.empty_like(local, device="meta")))
        # ... and computes this rank's experts with its shards: the same module, so whatever wraps the
        # plain model's experts (FP8 kernels, their statistics and the precision policy's switches) keeps
        # working under expert parallelism.
        experts.n_experts = self.n_local
        self._kernel = (experts,)  # a tuple: not a submodule (its placeholders are not parameters of the model)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by global expert, counts [E] -> [M, D] in the same order."""
        group = self.ep_mesh.get_group()
        ep, El = self.ep_mesh.size(), self.n_local
        with torch.no_grad():
            send_counts = counts.to(torch.long).contiguous()  # [ep * El]: to rank j, its experts' rows
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=group)
            recv_counts = recv_counts.view(ep, El)  # [S, El] from source s for local expert e
            input_splits = send_counts.view(ep, El).sum(1).tolist()
            output_splits = recv_counts.sum(1).tolist()
            index = source_to_expert_order(recv_counts)
            inverse = torch.empty_like(index)
            inverse[index] = torch.arange(index.numel(), device=index.device)
        recv = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
        local_in = _Permute.apply(recv, index, inverse)
        kernel = self._kernel[0]
        kernel.impl = self.impl
        weights = {name: _local(getattr(self, name)) for name in ("gate_up_proj", "down_proj")}
        local_out = functional_call(kernel, weights, (local_in, recv_counts.sum(0)))
        back = _Permute.apply(local_out, inverse, index)
        return all_to_all_single_autograd(back.contiguous(), input_splits, output_splits, group)

    def extra_repr(self) -> str:
        return f"experts {self.n_local} of {self.n_experts} on this rank, impl={self.impl}"


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def apply_expert_parallel(model: nn.Module, ep_mesh) -> nn.Module:
    """Swap every MoE layer's experts (main layers and MTP blocks) for their expert-parallel form."""
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, GroupedExperts):
            module.experts = ExpertParallelExperts(module.experts, ep_mesh)
    return model
