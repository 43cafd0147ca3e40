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

Dispatch payload (`dispatch`, `--ep-dispatch`): "compute" sends the rows in the compute dtype; "fp8"
(DeepSeek-V3) quantises every row to E4M3 with one fp32 scale per 1x128 tile (quant.py) and sends FP8
bytes and scales as one uint8 row each ([M, D + 4 ceil(D/128)] bytes: gloo has no float8 dtypes);
"logfmt" sends LogFMT-8 codes and each tile's fp32 lo and hi (logfmt.py; D + 8 ceil(D/128) bytes). The
receiver decodes to the compute dtype (an FP8 expert kernel quantises again itself). All rows are
encoded, those a rank keeps for itself too, so results do not depend on the layout: EP with "fp8"
computes what one process computes with the routed experts' inputs quantised and dequantised. The
backward is a straight-through estimator: the gradient of the received rows goes back through the
inverse exchange in the compute dtype. The combine stays in the compute dtype (as in DeepSeek-V3).
`comm_bytes` counts the bytes each forward exchange sends to other ranks (`pop_comm_bytes`).

Shared experts (`overlap_shared`): the routed and shared experts of an MoE layer are independent, and
`MoE.forward` runs them through its `expert_runner` hook point (in turn by default). With overlap on,
`apply_expert_parallel` sets `overlap_shared_experts` as the layer's runner: it calls the EP module with
`during_dispatch` = the shared-experts module's ordinary call on x (hooks, checkpoint and TP wrappers
included), which the EP module runs after starting the dispatch and before waiting for it (DeepSeek-V3's
overlap). Same operations on the same inputs: results are bitwise those without overlap. A layer whose
routed-experts `forward` is wrapped on the instance (activation checkpointing of that region, the memory
profiler) runs in turn: its recompute would run the shared experts inside the routed region again.

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
from torch.profiler import record_function

from ..model.moe import MoE, GroupedExperts, run_experts_in_turn
from ..precision.logfmt import LogFmtPayload, logfmt_decode, logfmt_encode
from ..precision.quant import E4M3, TILE, Quantized, quantize
from .tensor import local_tensor as _local

DISPATCH_FORMATS = ("compute", "fp8", "logfmt")


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


# --- dispatch payloads -----------------------------------------------------------------------------
def _tiles(dim: int) -> int:
    return -(-dim // TILE[1])


def encode_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [M, D] -> uint8 [M, payload_row_bytes(D, fmt)]: each row's codes followed by its tiles' fp32
    numbers (fp8: one scale per tile; logfmt: lo per tile, then hi per tile). No host sync: a tile holding
    inf or NaN decodes to NaN."""
    M, D = x.shape
    if M == 0:
        return torch.empty(0, payload_row_bytes(D, fmt, x.dtype), dtype=torch.uint8, device=x.device)
    if fmt == "fp8":
        q = quantize(x, TILE, E4M3, check_finite=False)
        return torch.cat([q.data.view(torch.uint8), q.scale.view(torch.uint8)], dim=1)
    if fmt == "logfmt":
        p = logfmt_encode(x, bits=8, tile=TILE[1], check_finite=False)
        return torch.cat([p.codes[:, :D], p.lo.view(torch.uint8), p.hi.view(torch.uint8)], dim=1)
    raise ValueError(f"unknown dispatch format {fmt!r}; choose from {DISPATCH_FORMATS}")


def decode_rows(payload: torch.Tensor, dim: int, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `encode_rows`: uint8 [R, bytes] -> [R, dim] in `dtype`."""
    R, T = payload.shape[0], _tiles(dim)
    if R == 0:
        return torch.empty(0, dim, dtype=dtype, device=payload.device)
    if fmt == "fp8":
        data = payload[:, :dim].contiguous().view(E4M3.dtype)
        scale = payload[:, dim:].contiguous().view(torch.float32)
        return Quantized(data, scale, TILE, E4M3).dequantize(dtype)
    if fmt == "logfmt":
        codes = torch.nn.functional.pad(payload[:, :dim], (0, T * TILE[1] - dim))
        lo = payload[:, dim:dim + 4 * T].contiguous().view(torch.float32)
        hi = payload[:, dim + 4 * T:].contiguous().view(torch.float32)
        return logfmt_decode(LogFmtPayload(codes, lo, hi, 8, (R, dim), dtype, TILE[1]))
    raise ValueError(f"unknown dispatch format {fmt!r}; choose from {DISPATCH_FORMATS}")


def payload_row_bytes(dim: int, fmt: str, dtype: torch.dtype) -> int:
    """Bytes one dispatched row of width `dim` takes on the wire."""
    if fmt == "compute":
        return dim * dtype.itemsize
    return dim + (4 if fmt == "fp8" else 8) * _tiles(dim)


class _ReceiveEncoded(torch.autograd.Function):
    """Forward: decode the received payload into rows of x's dtype (x only connects the graph: its rows
    left through the forward exchange, done outside autograd). Backward (straight-through): the gradient
    of the received rows returns through the inverse all-to-all in that dtype."""

    @staticmethod
    def forward(ctx, x, payload, fmt, input_splits, output_splits, group):
        ctx.shape, ctx.splits, ctx.group = x.shape, (input_splits, output_splits), group
        return decode_rows(payload, x.shape[1], fmt, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        input_splits, output_splits = ctx.splits
        dx = grad.new_empty(ctx.shape)
        dist.all_to_all_single(dx, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return dx, None, None, None, None, None


class ExpertParallelExperts(nn.Module):
    """A drop-in for `GroupedExperts` holding this rank's E / ep experts (see the module docstring)."""

    def __init__(self, experts: GroupedExperts, ep_mesh, dispatch: str = "compute"):
        super().__init__()
        if dispatch not in DISPATCH_FORMATS:
            raise ValueError(f"unknown dispatch format {dispatch!r}; choose from {DISPATCH_FORMATS}")
        self.dispatch = dispatch
        self.comm_bytes = {"dispatch": 0, "combine": 0}  # forward bytes sent to other ranks, since reset
        self.overlaps_shared = False  # apply_expert_parallel: its MoE runs the shared experts in its dispatch
        self.overlapped = 0  # forwards that ran work during the dispatch (the shared experts), since creation
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

    def forward(self, x: torch.Tensor, counts: torch.Tensor, during_dispatch=None) -> torch.Tensor:
        """x [M, D] sorted by global expert, counts [E] -> [M, D] in the same order; `during_dispatch()`, if
        given, runs while the dispatch is in flight. The dispatch and the combine run inside
        `moeforge.ep.dispatch` / `.combine` profiler ranges (`moeforge profile`)."""
        with record_function("moeforge.ep.dispatch"):
            local_in, index, inverse, recv_counts, splits = self._dispatch(x, counts, during_dispatch)
        kernel = self._kernel[0]
        kernel.impl = self.impl
        weights = {name: _local(getattr(self, name)) for name in ("gate_up_proj", "down_proj")}
        local_out = functional_call(kernel, weights, (local_in, recv_counts.sum(0)))
        with record_function("moeforge.ep.combine"):
            back = _Permute.apply(local_out, inverse, index)
            input_splits, output_splits = splits
            me = self.ep_mesh.get_local_rank()
            self.comm_bytes["combine"] += (sum(output_splits) - output_splits[me]) * x.shape[1] * back.dtype.itemsize
            return all_to_all_single_autograd(back.contiguous(), input_splits, output_splits, self.ep_mesh.get_group())

    def _dispatch(self, x: torch.Tensor, counts: torch.Tensor, during_dispatch=None):
        """Send x's rows to their experts' ranks -> (rows for the local experts in expert order, the
        permutation and its inverse, recv_counts [S, El], (input_splits, output_splits))."""
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
        me = self.ep_mesh.get_local_rank()
        D = x.shape[1]
        row_bytes = payload_row_bytes(D, self.dispatch, x.dtype)
        self.comm_bytes["dispatch"] += (sum(input_splits) - input_splits[me]) * row_bytes
        if self.dispatch == "compute":  # an AsyncCollectiveTensor: waited for at its first use (_Permute)
            recv = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
            self._while_in_flight(during_dispatch)
        else:
            with torch.no_grad():
                payload = encode_rows(x.detach(), self.dispatch)
                received = payload.new_empty(sum(output_splits), payload.shape[1])
                work = dist.all_to_all_single(received, payload, output_splits, input_splits, group=group,
                                              async_op=True)
            self._while_in_flight(during_dispatch)
            work.wait()
            recv = _ReceiveEncoded.apply(x, received, self.dispatch, input_splits, output_splits, group)
        return _Permute.apply(recv, index, inverse), index, inverse, recv_counts, (input_splits, output_splits)

    def _while_in_flight(self, work) -> None:
        if work is not None:
            work()
            self.overlapped += 1

    def extra_repr(self) -> str:
        return (f"experts {self.n_local} of {self.n_experts} on this rank, impl={self.impl}, "
                f"dispatch={self.dispatch}, overlap_shared={self.overlaps_shared}")


def apply_expert_parallel(model: nn.Module, ep_mesh, dispatch: str = "compute",
                          overlap_shared: bool = True) -> nn.Module:
    """Swap every MoE layer's experts (main layers and MTP blocks) for their expert-parallel form, sending
    token rows as `dispatch` (compute, fp8 or logfmt); with `overlap_shared`, the shared experts run while
    the dispatch is in flight (the layer's `expert_runner` becomes `overlap_shared_experts`)."""
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, GroupedExperts):
            ep = module.experts = ExpertParallelExperts(module.experts, ep_mesh, dispatch)
            if overlap_shared and module.shared_experts is not None:
                module.expert_runner = overlap_shared_experts
                ep.overlaps_shared = True
    return model


def overlap_shared_experts(moe: MoE, xs: torch.Tensor, counts: torch.Tensor, x: torch.Tensor):
    """An `MoE.expert_runner`: the shared experts on x computed while the EP dispatch of xs is in flight."""
    experts = moe.experts
    if moe.shared_experts is None or not isinstance(experts, ExpertParallelExperts) or "forward" in vars(experts):
        return run_experts_in_turn(moe, xs, counts, x)  # a wrapped (checkpointed, profiled) region: see above
    shared = []
    y = experts(xs, counts, during_dispatch=lambda: shared.append(moe.shared_experts(x)))
    return y, shared[0]


def expert_parallel_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def pop_comm_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the EP exchanges of `model` sent to other ranks (forward dispatch and combine, this rank)
    since the last call; resets the counters."""
    total = {"dispatch": 0, "combine": 0}
    for m in expert_parallel_modules(model):
        for k in total:
            total[k] += m.comm_bytes[k]
            m.comm_bytes[k] = 0
    return total
