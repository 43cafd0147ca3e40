"""ZeRO-style data parallelism with FSDP2 (`fully_shard`), applied per transformer block, then the root.

* ZeRO-2-like (`zero=2`): parameters stay gathered from forward to backward (no second all-gather);
  gradients and optimizer state are sharded. ZeRO-3-like (`zero=3`): parameters are resharded after
  forward and gathered again for backward. (`zero=1` is refused: FSDP2 has no optimizer-state-only mode.)
* Expert weights (already DTensors over the ep mesh) are sharded over the expert-data-parallel mesh
  "edp" (x "cp"): the ranks that hold the same experts. Their gradient reduction divides by the full
  dp (x cp) degree, since every rank's tokens reached them through the all-to-all (torchtitan does the same).
* Redundant expert slots (`replicated.py`) are left out (`ignored_params`): each rank's slots hold
  different experts, so FSDP must neither shard nor average them; `replicated.sync_replica_grads` does.
* Mixed precision: an optional `MixedPrecisionPolicy` (e.g. bf16 parameters for compute, fp32
  gradient reduction); sharded master weights and optimizer state stay fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .expert import ExpertParallelExperts
from .mesh import ParallelLayout
from .replicated import slot_parameters


def mixed_precision(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None = torch.float32):
    """None when param_dtype is None (plain fp32); else FSDP2's policy (bf16 compute, fp32 reduce)."""
    if param_dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: nn.Module, mesh, layout: ParallelLayout, mp_policy: MixedPrecisionPolicy | None = None):
    """Shard each block (experts separately over "edp"), the MTP projections and the output head, then
    the root (embedding, norms) over "dp" (x "cp")."""
    # FP8 linears return their [B, T, N] output as a view of the [B*T, N] GEMM result, and FSDP2 warns that an
    # in-place op on such a view would skip its pre-backward hook. The model only uses them out of place (the
    # FP8 x EP x ZeRO-3 runs equal the single process), so the warning is noise for these modules.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPFp8Linear\) returned a view tensor")
    kw = {"reshard_after_forward": layout.reshard_after_forward}
    slots = set(slot_parameters(model))
    if slots:
        kw["ignored_params"] = slots
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    dp_mesh = mesh["dp_cp"]  # context-parallel ranks average their gradients like data-parallel ones
    mtp = list(getattr(model, "mtp", []))
    for block in list(model.layers) + [m.block for m in mtp]:
        for module in block.modules():
            if isinstance(module, ExpertParallelExperts):
                expert_mesh = mesh["edp_cp"]  # edp (x cp: context-parallel ranks hold the same experts)
                fully_shard(module, mesh=expert_mesh, **kw)
                module.set_gradient_divide_factor(float(layout.dp * layout.cp))
                # gloo has no PREMUL_SUM: reduce with SUM, then scale. (Not on a 1-rank mesh: torch 2.13
                # divides there twice when forced to sum.)
                if expert_mesh.size() > 1 and dist.get_backend(expert_mesh.get_group()) == "gloo":
                    module.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=dp_mesh, **kw)
    # The head and the MTP input projections get units of their own: under a mixed-precision policy a
    # unit casts its input to the compute dtype, and they receive fp32 activations (the MoE combine sums
    # in fp32). (Not the whole MTP module: the model calls its final norm from outside its forward.)
    for proj in [m.eh_proj for m in mtp]:
        fully_shard(proj, mesh=dp_mesh, **kw)
    if model.lm_head.weight is not model.embed_tokens.weight:
        fully_shard(model.lm_head, mesh=dp_mesh, **kw)
    fully_shard(model, mesh=dp_mesh, **kw)
    return model
