"""Tensor parallelism (Megatron-style, via DTensor `parallelize_module`) for the plain moeforge model.

Applied from outside, like torchtitan's `parallelize_llama`/`parallelize_deepseekv3`; the model code
does not know about ranks. What is sharded over the `tp` mesh (H heads, F hidden width, V vocab):

  MLA        q_b_proj (or q_proj) and kv_b_proj column-parallel by head, o_proj row-parallel (one
             all-reduce per attention). The low-rank down projections q_a_proj / kv_a_proj_with_mqa and
             their norms are small (D x rank) and stay replicated: every rank computes the same latent.
             Each rank's MLA then runs H/tp heads (its `n_heads` is set to the local count here).
  MLP        dense SwiGLU and the MoE's shared experts: gate/up column-parallel, down row-parallel.
  vocab      embed_tokens row-parallel over the vocabulary (each rank looks up its id range, an
             all-reduce sums), lm_head column-parallel with logits all-gathered to every rank.
  replicated router, routed experts (expert parallelism shards those, see the EP module), MTP eh_proj,
             all norms.

One MLA-specific fix: the decoupled RoPE key (the last qk_rope_head_dim columns of kv_a_proj_with_mqa's
output) is shared by all heads, so on each rank it only receives the gradient of that rank's heads. The
latent columns are fine (the column-parallel kv_b_proj sums its input gradient over ranks), but the rope
key's gradient must be summed explicitly: a forward hook routes it through a DTensor Replicate ->
local(grad Partial) round trip, whose backward is one all-reduce (Megatron's "f" operator).
torchtitan reaches the same result by keeping the whole attention in DTensors (NoParallel on wkv_a).

Combine with FSDP (2D) by calling `apply_tensor_parallel` first on the `tp` sub-mesh, then `fully_shard`
on the `dp` sub-mesh (the torchtitan order: TP -> EP -> activation checkpointing -> compile -> FSDP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..errors import ConfigError
from ..model.mla import MLA
from ..model.norm import SwiGLU
from ..model.transformer import Transformer


def check_tensor_parallel(config, tp: int) -> None:
    """Raise ConfigError if a TP degree cannot split this model (heads must divide evenly)."""
    if tp < 1:
        raise ConfigError(f"tensor-parallel degree must be >= 1, got {tp}")
    if config.num_attention_heads % tp:
        raise ConfigError(f"tensor-parallel degree {tp} must divide num_attention_heads="
                          f"{config.num_attention_heads}")


def mla_plan(attn: MLA) -> dict:
    """Column-parallel (by head) up projections, row-parallel output projection."""
    q = "q_proj" if attn.config.q_lora_rank is None else "q_b_proj"
    return {q: ColwiseParallel(), "kv_b_proj": ColwiseParallel(), "o_proj": RowwiseParallel()}


def swiglu_plan() -> dict:
    return {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}


def vocab_plan() -> dict:
    """Vocabulary-parallel embedding and output head; logits come back whole ([B, T, V] on every rank)."""
    return {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> Transformer:
    """Shard `model` in place over the 1-D `tp_mesh` (see module docstring); returns it.

    Every rank of the mesh must hold the same initial weights and see the same input batch.
    """
    if tp_mesh.ndim != 1:
        raise ConfigError(f"apply_tensor_parallel wants a 1-D tensor-parallel mesh, got {tp_mesh.ndim}-D")
    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp)
    tied = model.config.tie_word_embeddings
    plan = vocab_plan()
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            plan.update({f"{name}.{k}": v for k, v in mla_plan(module).items()})
        elif isinstance(module, SwiGLU):  # dense MLPs and MoE shared experts
            plan.update({f"{name}.{k}": v for k, v in swiglu_plan().items()})
    parallelize_module(model, tp_mesh, plan)
    if tied:  # both sides are Shard(0) over the vocabulary: one DTensor can serve both again
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, MLA):
            module.n_heads = module.config.num_attention_heads // tp  # local heads
            module.kv_a_proj_with_mqa.register_forward_hook(_sum_rope_key_grad_hook(module.rope_dim, tp_mesh))
    return model


def _sum_rope_key_grad_hook(rope_dim: int, mesh: DeviceMesh):
    """Forward hook on kv_a_proj_with_mqa: identity forward, rope-key gradient summed over the mesh."""

    def hook(module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        latent, rope = out.split([out.shape[-1] - rope_dim, rope_dim], dim=-1)
        return torch.cat((latent, sum_grad_over(rope, mesh)), dim=-1)

    return hook


def sum_grad_over(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """x unchanged in forward; in backward its gradient is all-reduced (summed) over `mesh`."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor unchanged): what this rank computes and communicates."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered over its mesh (a collective of its mesh's ranks); a plain tensor unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor (DTensors gathered): for comparisons and single-file export."""
    return {k: full_tensor(v).detach().clone() for k, v in model.named_parameters()}


def split_param_groups(groups: list[dict]) -> list[dict]:
    """Optimizer param groups split so that each holds one kind of tensor: plain, or DTensors of one mesh
    and placement. Fused/foreach optimizer kernels refuse to mix them; the update itself is unchanged.

    Use: `opt = make_optimizer(model, cfg); opt = type(opt)(split_param_groups(opt.param_groups))`.
    """
    out = []
    for group in groups:
        kinds: dict[tuple, list] = {}
        for p in group["params"]:
            key = (p.device_mesh, p.placements) if isinstance(p, DTensor) else (None, None)
            kinds.setdefault(key, []).append(p)
        out.extend({**group, "params": params} for params in kinds.values())
    return out
