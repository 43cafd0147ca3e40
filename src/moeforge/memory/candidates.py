"""The places where activation checkpointing can cut the model: whole blocks and the parts inside them.

A candidate is a callable attribute of one module instance -- its `forward` or a method such as
`MLA.project_q` -- that memory tools replace on the instance (never on the class, never by swapping
modules, so parameter names and checkpoints are unchanged). Kinds:

  block           a whole transformer Block (main layers and MTP blocks): keeps only the block input
  attention       the whole MLA (projections, rope, attention core, output projection)
  moe             the whole MoE layer (router, dispatch, experts, combine, shared experts)
  attn_norm       the Block's input RMSNorm
  mlp_norm        the Block's post-attention RMSNorm
  q_proj          MLA query path: q_a_proj -> q_a_layernorm -> q_b_proj (the MLA up-projection)
  kv_proj         MLA key/value path: kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj
  attention_core  softmax(q k^T) v (MLA.attention_core)
  routed_experts  the grouped SwiGLU experts of an MoE layer
  shared_experts  the always-on SwiGLU of an MoE layer
  dense_mlp       the SwiGLU of a dense layer
  weight_casts    not a checkpoint: the low-precision weight copies (autocast) the Block saves for
                  backward are recast from the parameters in the backward instead of kept
                  (`recast.py`); named "<block>.weight_casts", it holds no inputs and reruns no forward;
                  not offered for blocks whose parameters are DTensors (FSDP/ZeRO-3, TP)

A block contains all of its layer's candidates; `attention` contains q_proj, kv_proj and attention_core,
`moe` contains routed_experts and shared_experts (CONTAINER). Nested regions are allowed: an inner
checkpoint inside a checkpointed block shrinks what the block's recompute rebuilds at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import DTensor

from ..model.moe import MoE
from ..model.transformer import Block

BLOCK = "block"
RECAST = "weight_casts"
SUB_KINDS = ("attn_norm", "mlp_norm", "attention", "q_proj", "kv_proj", "attention_core", "moe", "routed_experts",
             "shared_experts", "dense_mlp", RECAST)
CONTAINER = {"q_proj": "attention", "kv_proj": "attention", "attention_core": "attention", "routed_experts": "moe",
             "shared_experts": "moe"}
KINDS = (BLOCK, *SUB_KINDS)


@dataclass(frozen=True, eq=False)
class Candidate:
    name: str  # module path + kind, e.g. "layers.2.self_attn.attention_core" or "layers.2" for a block
    kind: str  # one of KINDS
    layer: str  # "layers.2" or "mtp.0.block": the Block it belongs to
    owner: nn.Module  # the module whose attribute is replaced
    attr: str  # "forward" or a method name

    def original(self):
        """The callable as the class defines it (bound to the owner), ignoring instance overrides."""
        return getattr(type(self.owner), self.attr).__get__(self.owner)


def is_recast(name: str) -> bool:
    """Whether a candidate name is a `weight_casts` one (the profile knows names, not kinds)."""
    return name.endswith("." + RECAST)


def block_children(block: Block) -> list[tuple[str, nn.Module, str]]:
    """(kind, owner, attribute) for the sub-block candidates of one Block."""
    attn = block.self_attn
    out = [("attn_norm", block.input_layernorm, "forward"), ("mlp_norm", block.post_attention_layernorm, "forward"),
           ("attention", attn, "forward")]
    if attn.config.q_lora_rank is not None:
        out.append(("q_proj", attn, "project_q"))
    out += [("kv_proj", attn, "project_kv"), ("attention_core", attn, "attention_core")]
    if isinstance(block.mlp, MoE):
        out.append(("moe", block.mlp, "forward"))
        out.append(("routed_experts", block.mlp.experts, "forward"))
        if block.mlp.shared_experts is not None:
            out.append(("shared_experts", block.mlp.shared_experts, "forward"))
    else:
        out.append(("dense_mlp", block.mlp, "forward"))
    return out


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every candidate of a Transformer, block first, then its parts, in forward order."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer_name, block in ((n, m) for n, m in model.named_modules() if isinstance(m, Block)):
        out.append(Candidate(layer_name, BLOCK, layer_name, block, "forward"))
        if not any(isinstance(p, DTensor) for p in block.parameters()):
            # FSDP (ZeRO-3) frees the weights it gathered for the forward, so a backward recast would read
            # freed storage (FSDP's own param_dtype is the way to bf16 copies there); TP shards are DTensors
            out.append(Candidate(f"{layer_name}.{RECAST}", RECAST, layer_name, block, "forward"))
        for kind, owner, attr in block_children(block):
            path = names[id(owner)]
            out.append(Candidate(path if attr == "forward" else f"{path}.{attr}", kind, layer_name, owner, attr))
    return out
