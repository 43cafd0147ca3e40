"""Distributed training applied to the plain model from outside, in one fixed order:
tensor parallelism (DTensor, by head / hidden width / vocabulary), expert parallelism (swap experts,
exchange tokens), then FSDP2 (ZeRO-2/3) over the data-parallel mesh (x the context-parallel one), then
context parallelism (each sequence split over the cp ranks, MLA's compressed KV all-gathered).

    layout = ParallelLayout.resolve(world_size, dp=0, ep=2)
    mesh = build_mesh(layout, "cpu")
    model = parallelize(model, layout, mesh)

See docs/distributed.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from . import dist_checkpoint
from .expert import DISPATCH_FORMATS, ExpertParallelExperts, apply_expert_parallel, pop_comm_bytes
from .context import apply_context_parallel
from .fsdp import apply_fsdp, mixed_precision
from .grads import clip_grad_norm
from .mesh import ParallelLayout, ParallelMesh, build_mesh
from .replicated import apply_replicated_expert_parallel
from .tensor import apply_tensor_parallel

__all__ = ["DISPATCH_FORMATS", "ExpertParallelExperts", "ParallelLayout", "ParallelMesh", "apply_expert_parallel",
           "apply_context_parallel", "apply_fsdp", "apply_replicated_expert_parallel", "apply_tensor_parallel", "build_mesh", "clip_grad_norm",
           "dist_checkpoint", "mixed_precision", "parallelize", "pop_comm_bytes"]


def parallelize(model: nn.Module, layout: ParallelLayout, mesh, param_dtype: torch.dtype | None = None,
                ep_dispatch: str = "compute", ep_overlap_shared: bool = True, expert_placement=None) -> nn.Module:
    """Apply the layout to a built (and hardware-configured) model on every rank; returns the same model.
    `ep_dispatch` (compute, fp8, logfmt) and `ep_overlap_shared` configure expert parallelism (expert.py);
    `expert_placement` (phy2log [MoE layers][slots]) swaps in redundant expert slots instead (replicated.py).

    The model must be initialised identically on every rank (same seed): each rank keeps its shards.
    Pipeline stages (pp > 1, with any of dp, ep and tp) are cut from the TP- and EP-parallelised model
    afterwards with `moeforge.parallel.pipeline.build_pipeline`, which also averages their gradients over dp
    (experts over edp): FSDP is not applied then (the stages are replicated over their dp ranks).
    """
    layout.check_model(model.config)
    layout.check_trainer()
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if layout.ep > 1 and expert_placement is not None:
        apply_replicated_expert_parallel(model, mesh["ep"], expert_placement)
    elif layout.ep > 1:
        apply_expert_parallel(model, mesh["ep"], ep_dispatch, ep_overlap_shared)
    if (layout.dp > 1 or layout.ep > 1 or layout.cp > 1) and layout.pp == 1:
        apply_fsdp(model, mesh, layout, mixed_precision(param_dtype))
    if layout.cp > 1:
        apply_context_parallel(model, mesh["cp"].get_group())
    return model
