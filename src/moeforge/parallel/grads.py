"""Gradient-norm clipping over parameters that live on different meshes: the one clipping function of
every distributed layout (EP x FSDP, TP, pipeline stages, replicated experts).

Under EP x FSDP, dense weights are DTensors over the dp mesh and expert weights DTensors over the
(edp, ep) mesh; torch's `clip_grad_norm_` cannot stack norms of DTensors on different meshes. Here the
squared norm is computed per mesh and placement (TP mixes Shard and Replicate; each reduced to a full, global value), summed, and torch's
`clip_grads_with_norm_` applies the one global scale.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, group=None, uncounted=(), extra_sq=None) -> torch.Tensor:
    """Global L2 norm of all gradients (returned); scales them down to max_norm if larger.

    group: also sum the squared norm over this process group (pipeline stages hold different parameters).
    uncounted: parameters whose gradients are scaled but left out of the norm (a second copy of a
    parameter counted on another stage, e.g. the pipeline's last-stage embedding).
    extra_sq: a squared norm added to the total after any `group` reduction (already global; e.g. the
    logical expert gradients of replicated experts, whose slot parameters are then `uncounted`).
    """
    params = [p for p in params if p.grad is not None]
    skip = {id(p) for p in uncounted}
    by_mesh: dict = {}
    for p in params:
        if id(p) in skip:
            continue
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        by_mesh.setdefault(key, []).append(p)
    total_sq = None
    for group_params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group_params], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = norm.float() ** 2
        total_sq = sq if total_sq is None else total_sq + sq
    if group is not None:
        import torch.distributed as dist

        if total_sq is None:
            total_sq = torch.zeros((), device=params[0].grad.device if params else "cpu")
        dist.all_reduce(total_sq, group=group)
    if extra_sq is not None:
        total_sq = extra_sq.float() if total_sq is None else total_sq + extra_sq.float().to(total_sq.device)
    if total_sq is None:
        return torch.zeros(())
    total = total_sq.sqrt()
    if max_norm != float("inf"):
        for group_params in [*by_mesh.values(), [p for p in params if id(p) in skip]]:
            if group_params:
                torch.nn.utils.clip_grads_with_norm_(group_params, max_norm, total)
    return total
