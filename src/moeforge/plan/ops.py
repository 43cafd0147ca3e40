"""The operations of one training step on one rank, from the model config and the layout.

Why a list: a step is not FLOPs at an efficiency. Small grouped expert GEMMs run far below peak,
norms, activations, routing and permutes are memory-bound, every kernel has a launch cost, and each
collective has its own size and group. `step_ops` lists them; `device.py` prices each one.

Per micro-batch on the fullest pipeline stage (phase "fwd" / "bwd"; a recomputed forward is listed
again under "bwd"), plus once per optimizer step (phase "step": optimizer, clipping, gradient sync).
GEMMs are (groups x) [m, k] @ [k, n]; the backward of y = x W is dX = dY W^T ([m, n] @ [n, k]) and
dW = X^T dY ([k, m] @ [m, n]), so every linear contributes three GEMMs.

Two implementations of the element-wise work (`Impl`):
  fused  production GPU training (fused norms/SwiGLU/RoPE, flash attention, permute kernels,
         FP8 quantisation fused into neighbours): one kernel and its minimal bytes per op;
  eager  moeforge's own PyTorch trainer: each op as the ATen kernels `moeforge.model` runs (counted
         from the model code: e.g. RMSNorm forward is vector_norm, square, div, add, rsqrt, two
         multiplies), eager attention materialising the T x T scores, fused AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .layout import Layout, TrainSettings
from .memory import piece_rank, rank_pieces, stage_layers
from .models import ModelShape


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # gemm | attention | memory | collective | host (the eager trainer's Python and autograd)
    phase: str  # fwd | bwd | step
    count: float = 1.0  # repetitions (per micro-batch for fwd/bwd, per optimizer step for "step")
    m: int = 0
    n: int = 0
    k: int = 0
    groups: int = 1  # grouped GEMM: `groups` independent [m, k] @ [k, n]
    precision: str = "bf16"  # GEMM input precision
    bytes: float = 0.0  # memory traffic (memory ops) or payload per rank (collectives)
    kernels: float = 1.0  # kernel launches (per count)
    collective: str = ""  # all_reduce | all_gather | reduce_scatter | all_to_all | moe_a2a | p2p
    group: str = ""  # tp | ep | dp | edp | pp | cp
    hideable: bool = False  # may overlap with compute (EP/PP/DP traffic); TP all-reduces never are
    causal: bool = False  # attention: only half of the T x T products are computed
    timed: str = ""  # a memory op a measured device times at its shape (groups, m, n) instead of by bytes:
    #                 "softmax", eager attention's row softmax over [B*H, T, T]; "swiglu", silu(gate) * up over
    #                 [m, n] (both exp-bound, not bandwidth-bound)

    @property
    def work_phase(self) -> str:
        """The phase whose work the op repeats: a forward recomputed in backward (`_recompute`) is a forward."""
        return "fwd" if self.name.endswith(RECOMPUTE_SUFFIX) else self.phase

    @property
    def flops(self) -> float:
        f = 2.0 * self.groups * self.m * self.n * self.k
        return f / 2 if self.causal else f


@dataclass(frozen=True)
class Impl:
    """How the element-wise work is implemented (see the module docstring)."""

    name: str = "fused"
    flash_attention: bool = True  # fused causal attention (no T x T tensor); eager: baddbmm/softmax/bmm
    sequence_parallel_experts: bool = True  # routed experts see tokens/tp (Megatron/DeepSeek); moeforge's
    #                                          local TP replicates the routed experts on every TP rank
    fp8_casts: bool = True  # fp8 precision: each GEMM input is quantised (one extra pass)


FUSED = Impl()
EAGER = Impl("eager", flash_attention=False, sequence_parallel_experts=False, fp8_casts=False)

# (kernels, passes over the tensor) for forward and backward of each element-wise op, fused and eager.
# A pass reads or writes the tensor once. Fused: what one kernel must move (norm: read x, write y;
# backward: read x, dy, write dx). Eager: counted from moeforge.model (norm.py, moe.py, mla.py, rope.py).
ELEMENTWISE = {
    #            fused fwd  fused bwd   eager fwd  eager bwd
    "rmsnorm": ((1, 2), (1, 3), (7, 6), (9, 14)),
    "rope": ((1, 2), (1, 2), (10, 8), (10, 8)),
    "concat_heads": ((0, 0), (0, 0), (2, 4), (2, 4)),  # q/k assembled from nope and rope parts
    "swiglu": ((1, 3), (1, 5), (2, 5), (9, 16)),
    "residual": ((1, 3), (1, 3), (1, 3), (1, 3)),
    "softmax_scores": ((0, 0), (0, 0), (2, 3), (2, 4)),  # eager attention: mask + softmax over T x T
    "attn_out_copy": ((0, 0), (0, 0), (1, 2), (1, 2)),  # transpose(1, 2).reshape
    "router": ((2, 2), (2, 2), (20, 8), (10, 6)),  # on [T, E]: sigmoid, bias, group top-k, gather, norm
    "permute": ((1, 2), (1, 2), (2, 2), (3, 4)),  # token -> expert order (dispatch) [T*K, D]
    "unpermute": ((1, 3), (1, 4), (3, 6), (8, 9)),  # weighted combine [T*K, D] -> [T, D]
    "embedding": ((1, 2), (1, 3), (1, 2), (3, 3)),
    "loss": ((1, 2), (1, 2), (4, 5), (4, 5)),  # log-softmax + NLL over [T, V] (fp32)
    "fp8_cast": ((1, 2), (1, 2), (0, 0), (0, 0)),
}


def _ew(name: str, elems: float, elem_bytes: float, impl: Impl, tag: str = "", timed: str = "",
        shape: tuple[int, int, int] = (1, 0, 0)) -> list[Op]:
    fused_f, fused_b, eager_f, eager_b = ELEMENTWISE[name]
    fwd, bwd = (fused_f, fused_b) if impl.name == "fused" else (eager_f, eager_b)
    out = []
    g, m, n = shape
    timed = timed if impl.name == "eager" else ""  # fused kernels are priced by their bytes
    for phase, (kernels, passes) in (("fwd", fwd), ("bwd", bwd)):
        if kernels:
            out.append(Op(f"{tag}{name}", "memory", phase, bytes=elems * elem_bytes * passes, kernels=kernels,
                          timed=timed, groups=g, m=m, n=n, precision="bf16" if elem_bytes == 2 else "fp32"))
    return out


def _linear(name: str, m: int, k: int, n: int, precision: str, groups: int = 1) -> list[Op]:
    """y[m, n] = x[m, k] @ W[k, n] and its two backward GEMMs."""
    if min(m, n, k) <= 0:
        return []
    return [Op(name, "gemm", "fwd", m=m, n=n, k=k, groups=groups, precision=precision),
            Op(name + ".dgrad", "gemm", "bwd", m=m, n=k, k=n, groups=groups, precision=precision),
            Op(name + ".wgrad", "gemm", "bwd", m=k, n=n, k=m, groups=groups, precision=precision)]


def _attention_ops(model: ModelShape, tokens: int, seqs: int, seq: int, tp: int, act: float, impl: Impl,
                   precision: str, tag: str, cp: int = 1) -> list[Op]:
    """Projections and the attention core of one layer for `tokens` = seqs x seq / cp tokens of this rank.
    Context parallel (cp > 1, MLA): the compressed KV of the whole sequences is all-gathered (backward: its
    gradient reduce-scattered), every rank rebuilds K and V of all seq keys with kv_b_proj, and its seq / cp
    queries attend to them (load-balanced chunks: on average half the products, as causal)."""
    D, ops = model.hidden_size, []
    c = model.moe_config
    keys = tokens * cp
    if c is not None:  # MLA
        H = c.num_attention_heads // tp
        qk, v = c.qk_head_dim, c.v_head_dim
        if c.q_lora_rank:
            ops += _linear(tag + "q_a_proj", tokens, D, c.q_lora_rank, precision)
            ops += _ew("rmsnorm", tokens * c.q_lora_rank, act, impl, tag + "q_")
            ops += _linear(tag + "q_b_proj", tokens, c.q_lora_rank, H * qk, precision)
        else:
            ops += _linear(tag + "q_proj", tokens, D, H * qk, precision)
        ops += _linear(tag + "kv_a_proj", tokens, D, c.kv_lora_rank + c.qk_rope_head_dim, precision)
        ops += _ew("rmsnorm", tokens * c.kv_lora_rank, act, impl, tag + "kv_")
        if cp > 1:
            ops += cp_kv_exchange(model, seqs, seq, act, tag)
        ops += _linear(tag + "kv_b_proj", keys, c.kv_lora_rank, H * (c.qk_nope_head_dim + v), precision)
        ops += _ew("rope", tokens * (H + 1) * c.qk_rope_head_dim, act, impl, tag)
        ops += _ew("concat_heads", tokens * H * qk, act, impl, tag)
        o_in = H * v
    else:  # GQA
        H, KV, hd = model.num_heads // tp, model.num_kv_heads // tp, model.head_dim
        qk = v = hd
        ops += _linear(tag + "qkv_proj", tokens, D, (H + 2 * KV) * hd, precision)
        ops += _ew("rope", tokens * (H + KV) * hd, act, impl, tag)
        if cp > 1:
            ops += cp_kv_exchange(model, seqs, seq, act, tag, tp)
        o_in = H * hd
    # attention core: per sequence and head, scores [seq, qk] @ [qk, seq], then probs @ v; BF16 even in
    # FP8 training (DeepSeek-V3 Sec. 3.3). Backward: two GEMMs per forward GEMM.
    core_prec = "bf16" if precision in ("fp8", "mxfp8") else precision
    groups = seqs * H
    causal = impl.flash_attention
    q_seq = seq // cp
    for name, (m, n, k) in (("scores", (q_seq, seq, qk)), ("probs_v", (q_seq, v, seq))):
        ops.append(Op(tag + "attn." + name, "attention", "fwd", m=m, n=n, k=k, groups=groups,
                      precision=core_prec, causal=causal, kernels=0 if impl.flash_attention and name == "probs_v" else 1))
        ops.append(Op(tag + "attn." + name + ".bwd", "attention", "bwd", m=m, n=n, k=k, groups=2 * groups,
                      precision=core_prec, causal=causal, kernels=0 if impl.flash_attention else 2))
    if not impl.flash_attention:
        ops += _ew("softmax_scores", groups * q_seq * seq, 4, impl, tag, timed="softmax", shape=(groups, q_seq, seq))
        ops += _ew("attn_out_copy", tokens * o_in, act, impl, tag)
    ops += _linear(tag + "o_proj", tokens, o_in, D, precision)
    return ops


def cp_kv_exchange(model: ModelShape, seqs: int, seq: int, act: float, tag: str = "", tp: int = 1) -> list[Op]:
    """Context parallelism's exchange in one layer, all-gathered over the cp group in forward, the gradient
    reduce-scattered in backward. Per token, MLA: the normed latent and the roped shared key
    (kv_lora_rank + qk_rope_head_dim numbers; moeforge's parallel/context.py); GQA: this TP rank's K and V
    heads (2 x kv_heads / tp x head_dim: the all-gather CP of the Llama 3 paper, Sec. 3.3.2). Bytes: the
    gathered buffer per rank (network.py's convention), of which a rank receives (cp - 1) / cp."""
    c = model.moe_config
    per_token = c.kv_lora_rank + c.qk_rope_head_dim if c is not None else 2 * model.num_kv_heads // tp * model.head_dim
    gathered = seqs * seq * per_token * act
    return [Op(tag + "cp.kv_gather", "collective", "fwd", bytes=gathered, collective="all_gather", group="cp"),
            Op(tag + "cp.kv_gather.bwd", "collective", "bwd", bytes=gathered, collective="reduce_scatter",
               group="cp")]


def _mlp_ops(tokens: int, D: int, F: int, act: float, impl: Impl, precision: str, tag: str) -> list[Op]:
    """A SwiGLU MLP (gate and up as one GEMM of width 2F)."""
    if F <= 0:
        return []
    return (_linear(tag + "gate_up", tokens, D, 2 * F, precision)
            + _ew("swiglu", tokens * F, act, impl, tag, timed="swiglu", shape=(1, tokens, F))
            + _linear(tag + "down", tokens, F, D, precision))


def _moe_ops(model: ModelShape, tokens: int, lo: Layout, act: float, impl: Impl, precision: str,
             settings: TrainSettings, tag: str) -> list[Op]:
    D, K = model.hidden_size, model.experts_per_token
    E, F = model.n_routed_experts, model.expert_intermediate
    ops = _linear(tag + "router", tokens, D, E, "fp32" if impl.name == "eager" else precision)
    ops += _ew("router", tokens * E, 4, impl, tag)
    shared_f = F * model.n_shared_experts // lo.tp
    ops += _mlp_ops(tokens, D, shared_f, act, impl, precision, tag + "shared.")
    # routed experts: tokens of this rank (sequence-parallel under TP), K rows each, spread over the EP
    # group; each rank runs E/ep experts on (on average) as many rows as it sends, times
    # `expert_load` for a rank whose experts draw more or fewer than the mean
    routed_tokens = tokens // lo.tp if impl.sequence_parallel_experts else tokens
    rows = routed_tokens * K
    received = rows * settings.expert_load
    local = E // lo.ep
    per_expert = max(1, round(received / local))
    ops += _ew("permute", rows * D, act, impl, tag)
    if lo.ep > 1:
        for name, nbytes in (("dispatch", settings.dispatch_bytes), ("combine", settings.combine_bytes)):
            # m tokens of n = D elements to k = K experts; bytes = the rank's payload before routing
            ops.append(Op(tag + "ep." + name, "collective", "fwd", m=routed_tokens, n=D, k=K,
                          bytes=routed_tokens * D * nbytes, collective="moe_a2a", group="ep", hideable=True))
            ops.append(Op(tag + "ep." + name + ".bwd", "collective", "bwd", m=routed_tokens, n=D, k=K,
                          bytes=routed_tokens * D * settings.combine_bytes, collective="moe_a2a", group="ep",
                          hideable=True))
        if impl.name == "eager":  # received rows (source, expert) <-> (expert, source), both ways; before
            # the dispatch, each rank's rows per expert are exchanged (parallel/expert.py: the split sizes)
            ops += _ew("permute", received * D, act, impl, tag + "ep.")
            ops.append(Op(tag + "ep.counts", "collective", "fwd", bytes=E * 8, collective="all_to_all", group="ep"))
    ops += _linear(tag + "experts.gate_up", per_expert, D, 2 * F, precision, groups=local)
    ops += _ew("swiglu", received * F, act, impl, tag + "experts.", timed="swiglu", shape=(1, round(received), F))
    ops += _linear(tag + "experts.down", per_expert, F, D, precision, groups=local)
    ops += _ew("unpermute", rows * D, act, impl, tag)
    return ops


def _tp_block_collectives(model: ModelShape, moe: bool, tokens: int, act: float, impl: Impl, tag: str) -> list[Op]:
    """The TP all-reduces of one block (payload: tokens x the summed tensor's width).

    Megatron (fused): one after attention and one after the MLP, forward and backward (the fused QKV and
    gate-up projections sum their input gradient once). moeforge (eager, DTensor's ColwiseParallel): each
    column-parallel module sums its own input gradient in backward: q_b_proj (or q_proj), kv_b_proj and the
    shared rope key (parallel/tensor.py's hook) in MLA; gate_proj and up_proj in the MLP, which in a MoE
    layer is its shared experts only (routed experts are replicated on TP ranks)."""
    D, c = model.hidden_size, model.moe_config
    if impl.name != "eager":
        widths = {"attn": (D, [D]), "mlp": (D, [D])}
    else:
        attn_bwd = [c.q_lora_rank or D, c.kv_lora_rank, c.qk_rope_head_dim] if c is not None else [D]
        widths = {"attn": (D, attn_bwd)}
        if not moe or model.n_shared_experts:
            widths["mlp"] = (D, [D, D])
    ops = []
    for where, (fwd, bwd) in widths.items():
        for phase, sizes in (("fwd", [fwd]), ("bwd", bwd)):
            for width in sizes:
                ops.append(Op(f"{tag}tp.{where}", "collective", phase, bytes=tokens * width * act,
                              collective="all_reduce", group="tp"))
    return ops


@lru_cache(maxsize=4096)
def layer_ops(model: ModelShape, moe: bool, lo: Layout, settings: TrainSettings, impl: Impl,
              seqs: int, tag: str = "") -> tuple[Op, ...]:
    """One transformer block on `seqs` sequences of one micro-batch (TP-sharded), forward + backward."""
    s = settings
    seq, act, prec = s.seq_len, s.act_bytes, s.precision
    tokens = seqs * seq // lo.cp  # this rank's share of each sequence (context parallel)
    D = model.hidden_size
    sp_tokens = tokens // lo.tp if impl.sequence_parallel_experts else tokens  # norms under sequence parallel
    ops = _ew("rmsnorm", sp_tokens * D, act, impl, tag + "attn_")
    ops += _attention_ops(model, tokens, seqs, seq, lo.tp, act, impl, prec, tag, lo.cp)
    ops += _ew("residual", sp_tokens * D, act, impl, tag + "attn_")
    ops += _ew("rmsnorm", sp_tokens * D, act, impl, tag + "mlp_")
    if moe:
        ops += _moe_ops(model, tokens, lo, act, impl, prec, s, tag)
    else:
        ops += _mlp_ops(tokens, D, model.dense_intermediate // lo.tp, act, impl, prec, tag + "mlp.")
    ops += _ew("residual", sp_tokens * D, act, impl, tag + "mlp_")
    if lo.tp > 1:
        ops += _tp_block_collectives(model, moe, tokens, act, impl, tag)
    if prec in ("fp8", "mxfp8") and impl.fp8_casts:  # quantise each GEMM input (fused into neighbours
        # on GPUs would be free; DeepSeek-V3 fuses most: one pass of the layer's inputs is kept)
        ops += _ew("fp8_cast", tokens * D * 3 / lo.tp, act, impl, tag)
    return tuple(ops)


def step_ops(model: ModelShape, lo: Layout, settings: TrainSettings, impl: Impl = FUSED,
             stage: int | None = None) -> list[Op]:
    """The operations of one optimizer step on a rank of `stage` (default: the fullest one).

    fwd/bwd ops are per micro-batch (`micro_batches(lo, settings)` of them per step); recomputation
    adds the forward of what it rebuilds to the backward; "step" ops run once per optimizer step."""
    return [op for block in step_blocks(model, lo, settings, impl, stage) for op in block]


def step_blocks(model: ModelShape, lo: Layout, settings: TrainSettings, impl: Impl = FUSED,
                stage: int | None = None) -> list[tuple[Op, ...]]:
    """`step_ops` in blocks (identical layers folded into one block with counts): the planner prices
    thousands of layouts that share blocks, so each block is built (and priced) once."""
    s = settings
    if stage is None:
        stage = max(range(lo.pp), key=lambda i: (rank_layers(model, lo, i), i == 0))
    # DualPipe: each micro-batch passes through one of the rank's two stages (share 1/2 each);
    # DualPipeV: through both of its pieces (memory.rank_pieces)
    n_pieces, pieces, share = rank_pieces(lo, stage)
    layers_by_piece = stage_layers(model.num_layers, n_pieces)
    blocks = []
    for piece in pieces:
        n_moe = sum(1 for i in layers_by_piece[piece] if i >= model.dense_layers)
        for moe, n in ((False, len(layers_by_piece[piece]) - n_moe), (True, n_moe)):
            if n:
                blocks.append(layer_block(model, moe, lo.tp, lo.ep, lo.micro_batch, s, impl, n * share, lo.recompute,
                                          lo.cp))
        if piece == 0 or piece == n_pieces - 1:
            blocks.append(ends_block(model, lo.tp, lo.ep, lo.micro_batch, s, impl, piece == 0,
                                     piece == n_pieces - 1, share, lo.recompute, lo.cp))
    tokens = lo.micro_batch * s.seq_len // lo.cp
    extra = []
    if lo.pp > 1:
        if lo.schedule == "interleaved-1f1b":
            sends = lo.virtual_stages
        elif lo.schedule == "dualpipev":  # a piece whose successor lives on another rank sends to it
            sends = sum(1 for p in pieces if p < n_pieces - 1 and piece_rank(lo, p + 1) != stage)
        else:
            sends = 1
        for phase in ("fwd", "bwd"):
            extra.append(Op("pp.send", "collective", phase, bytes=tokens * model.hidden_size * s.act_bytes / lo.tp,
                            collective="p2p", group="pp", hideable=True, count=sends))
    blocks.append(tuple(extra + _step_ops(model, lo, s, impl, stage)))
    return blocks


def fsdp_units(model: ModelShape, lo: Layout, stage: int) -> dict[str, int]:
    """FSDP units of the rank's parameters, each gathered and reduced by its own collective (fully_shard per
    decoder block plus the root's embedding, norm and head, as moeforge and torchtitan wrap): dense = the
    rank's layers + 1, experts = its MoE layers (at least 1)."""
    layers = rank_layer_ids(model, lo, stage)
    return {"dense": len(layers) + 1, "experts": max(1, sum(1 for i in layers if i >= model.dense_layers))}


def rank_layer_ids(model: ModelShape, lo: Layout, stage: int) -> list[int]:
    """Decoder layers the rank at pipeline position `stage` holds (both pieces under DualPipe(V))."""
    n_pieces, pieces, _ = rank_pieces(lo, stage)
    return [i for p in pieces for i in stage_layers(model.num_layers, n_pieces)[p]]


def rank_layers(model: ModelShape, lo: Layout, stage: int) -> int:
    return len(rank_layer_ids(model, lo, stage))


def _scaled(ops, factor: float, recompute: str) -> tuple[Op, ...]:
    ops = list(ops)
    if recompute != "none":
        ops += _recompute(ops, recompute)
    if factor != 1.0:
        ops = [replace(o, count=o.count * factor) for o in ops]
    return tuple(ops)


@lru_cache(maxsize=8192)
def layer_block(model: ModelShape, moe: bool, tp: int, ep: int, seqs: int, s: TrainSettings, impl: Impl,
                factor: float, recompute: str, cp: int = 1) -> tuple[Op, ...]:
    """`factor` identical layers (counts scaled), with what recomputation redoes in backward."""
    tag = "moe." if moe else "dense."
    ops = layer_ops(model, moe, Layout(tp=tp, ep=ep, dp=max(tp, ep), cp=cp), s, impl, seqs, tag)
    return _scaled(list(ops) + _host_ops(tag, "moe" if moe else "dense", impl), factor, recompute)


def _host_ops(tag: str, category: str, impl: Impl) -> list[Op]:
    """The eager trainer's host work for one module (a layer, an MTP module, the pipeline ends) per
    micro-batch: Python, dispatch and autograd beside its kernels, priced by a measured device from its
    `category` of host_cost.py's table (kept in `timed`)."""
    if impl.name != "eager":
        return []
    return [Op(tag + "host", "host", phase, kernels=0, timed=category) for phase in ("fwd", "bwd")]


@lru_cache(maxsize=8192)
def ends_block(model: ModelShape, tp: int, ep: int, seqs: int, s: TrainSettings, impl: Impl, first: bool,
               last: bool, factor: float, recompute: str, cp: int = 1) -> tuple[Op, ...]:
    """The embedding (first stage); final norm, head, loss and the MTP modules (last stage)."""
    tokens = seqs * s.seq_len // cp
    D, V = model.hidden_size, model.vocab_size
    head_prec = s.precision if impl.name == "eager" else "bf16"  # DeepSeek-V3 keeps the head in BF16
    ops: list[Op] = []
    if first:
        ops += _ew("embedding", tokens * D, s.act_bytes, impl, "")
        ops += _vocab_tp_collectives("embedding", tokens, D, V, tp, s.act_bytes, impl, "")
    if last:
        ops += _ew("rmsnorm", tokens * D, s.act_bytes, impl, "final_")
        ops += _head_and_loss(tokens, D, V, tp, head_prec, impl, s.act_bytes, "")
        depth = model.moe_config.num_nextn_predict_layers if model.moe_config is not None else 0
        for d in range(depth):  # MTP: embedding of the shifted tokens, enorm, hnorm, eh_proj, one MoE block,
            tag = f"mtp{d}."  # final norm, head, loss
            ops += _ew("embedding", tokens * D, s.act_bytes, impl, tag)
            ops += _vocab_tp_collectives("embedding", tokens, D, V, tp, s.act_bytes, impl, tag)
            ops += _ew("rmsnorm", 2 * tokens * D, s.act_bytes, impl, tag)
            ops += _linear(tag + "eh_proj", tokens, 2 * D, D, s.precision)
            ops += layer_ops(model, model.moe_layers > 0, Layout(tp=tp, ep=ep, dp=max(tp, ep), cp=cp), s, impl, seqs, tag)
            ops += _ew("rmsnorm", tokens * D, s.act_bytes, impl, tag + "final_")
            ops += _head_and_loss(tokens, D, V, tp, head_prec, impl, s.act_bytes, tag)
            ops += _host_ops(tag, "mtp", impl)
        ops += _host_ops("ends.", "ends", impl)  # embedding, head, loss and autograd's start: counted on the last stage
    return _scaled(ops, factor, recompute)


def _head_and_loss(tokens: int, D: int, V: int, tp: int, precision: str, impl: Impl, act: float, tag: str) -> list[Op]:
    """The vocabulary-parallel head, its TP collectives and the cross-entropy. moeforge (eager) gathers
    the logits whole on every TP rank, so each rank's loss runs over all V; Megatron's vocab-parallel
    cross-entropy (fused) works on V / tp."""
    ops = _linear(tag + "lm_head", tokens, D, V // tp, precision)
    ops += _vocab_tp_collectives("head", tokens, D, V, tp, act, impl, tag)
    return ops + _ew("loss", tokens * V / (tp if impl.name != "eager" else 1), 4, impl, tag)


def _vocab_tp_collectives(where: str, tokens: int, D: int, V: int, tp: int, act: float, impl: Impl,
                          tag: str) -> list[Op]:
    """TP collectives of the vocabulary-parallel embedding (forward: the partial lookups summed) and head
    (backward: its input gradient summed; forward, eager: the logits all-gathered, moeforge's
    ColwiseParallel(output Replicate); fused: the cross-entropy's max, target logit and sum of exponentials,
    one number per token each)."""
    if tp <= 1:
        return []
    op = lambda phase, nbytes, kind="all_reduce": Op(f"{tag}tp.{where}", "collective", phase, bytes=nbytes,  # noqa: E731
                                                      collective=kind, group="tp")
    if where == "embedding":
        return [op("fwd", tokens * D * act)]
    fwd = [op("fwd", tokens * V * act, "all_gather")] if impl.name == "eager" else [op("fwd", tokens * 4)] * 3
    return fwd + [op("bwd", tokens * D * act)]


RECOMPUTE_SUFFIX = ".recompute"
RECOMPUTED = {"selective": ("rmsnorm", "swiglu", "q_b_proj", "kv_b_proj")}


def _recompute(ops: list[Op], mode: str) -> list[Op]:
    """The forward work recomputed in backward: everything (full) or norms, SwiGLU and MLA
    up-projections (selective, DeepSeek-V3 Sec. 3.2.2)."""
    out = []
    for op in ops:
        if op.phase != "fwd" or op.kind == "collective" and mode != "full":
            continue
        if mode == "full" or any(key in op.name for key in RECOMPUTED["selective"]):
            out.append(replace(op, name=op.name + RECOMPUTE_SUFFIX, phase="bwd"))
    return out


def _step_ops(model: ModelShape, lo: Layout, s: TrainSettings, impl: Impl, stage: int) -> list[Op]:
    """Once per optimizer step: gradient sync over DP / expert-DP, ZeRO-3 gathers, clipping, AdamW."""
    from .memory import stage_params

    dense_p, expert_p = stage_params(model, lo, stage)  # all the rank's pieces, MTP modules included
    depth = model.moe_config.num_nextn_predict_layers if model.moe_config is not None else 0
    ops = []
    units = fsdp_units(model, lo, stage)
    for name, p, dp, group in (("dense", dense_p, lo.dense_replicas, "dp"), ("experts", expert_p, lo.edp, "edp")):
        if dp > 1 and p:
            # ZeRO: one collective per FSDP unit (each its own latency; gloo's is ~0.1-1 ms), a flattened
            # all-reduce of the whole gradient without ZeRO
            n = units[name] if lo.zero else 1
            kind = "all_reduce" if lo.zero == 0 else "reduce_scatter"
            ops.append(Op(f"{group}.grad_sync", "collective", "step", bytes=p * s.grad_comm_bytes / n,
                          collective=kind, group=group, hideable=True, count=n))
            if lo.zero in (1, 2):
                ops.append(Op(f"{group}.param_gather", "collective", "step", bytes=p * s.weight_bytes / n,
                              collective="all_gather", group=group, hideable=True, count=n))
            if lo.zero == 3:  # gather the weights for every forward and backward of every micro-batch
                for phase in ("fwd", "bwd"):
                    ops.append(Op(f"{group}.zero3_gather", "collective", phase, bytes=p * s.weight_bytes / n,
                                  collective="all_gather", group=group, hideable=True, count=n))
    if impl.name == "eager":
        ops += _trainer_syncs(model, lo, stage)
    shard = lambda p, dp: p / (dp if lo.zero >= 1 else 1)  # noqa: E731
    local = shard(dense_p, lo.dense_replicas) + shard(expert_p, lo.edp)
    grad_b, master_b, mom_b = s.grad_bytes, s.master_bytes or s.weight_bytes, s.moment_bytes
    # clipping: a norm over the gradients (one read) and a scale (read + write); AdamW: read param,
    # grad, two moments, write param and moments (one fused pass); BF16 working copy refreshed
    ops.append(Op("clip_grad_norm", "memory", "step", bytes=local * grad_b * 3, kernels=4))
    adam = local * (master_b * 2 + grad_b + mom_b * 4) + (local * s.weight_bytes if s.master_bytes else 0)
    tensors = 12 * (model.num_layers + depth) // lo.pp + 4
    ops.append(Op("adamw", "memory", "step", bytes=adam, kernels=tensors if impl.name == "eager" else 1))
    if impl.name == "eager":  # the trainer's step around its kernels (host_cost.py)
        ops.append(Op("trainer.host", "host", "step", kernels=0, timed="step"))
    return ops


def _trainer_syncs(model: ModelShape, lo: Layout, stage: int) -> list[Op]:
    """The small collectives moeforge's distributed trainer adds to every step (parallel/trainer.py,
    pipeline.py, grads.py, balance/): the non-finite check over all ranks (and the EP traffic counters),
    the gradient norm's sum once per kind of sharded gradient (tensor-parallel weights: two placements;
    FSDP shards; expert shards), and over the data-parallel group the loss means, the expert counts and one
    bias update per MoE layer; a pipeline sums its loss, counts, norm and the two embedding copies'
    gradients over its stages. Latency-bound, each one a point where the ranks wait for each other."""
    def op(name, group, nbytes, n=1):
        return Op(f"sync.{name}", "collective", "step", bytes=nbytes, collective="all_reduce", group=group, count=n)

    if lo.gpus <= 1:
        return []
    E = model.n_routed_experts if model.moe_layers else 0
    depth = model.moe_config.num_nextn_predict_layers if model.moe_config is not None else 0
    moe_here = sum(1 for i in rank_layer_ids(model, lo, stage) if i >= model.dense_layers)
    n_pieces, pieces, _ = rank_pieces(lo, stage)
    moe_here += depth if n_pieces - 1 in pieces and model.moe_layers else 0
    ops = [op("finite", "world", 4)]
    if lo.ep > 1:
        ops.append(op("ep_bytes", "world", 16))
    for group, n in (("tp", 2 if lo.tp > 1 else 0), ("dp", int(bool(lo.zero) and lo.dense_replicas > 1)),
                     ("ep", int(lo.ep > 1))):
        if n:
            ops.append(op("grad_norm", group, 4, n))
    ops.append(op("loss_mean", "dp", 32))
    if E:
        ops.append(op("expert_counts", "dp", (model.moe_layers + depth) * E * 4))
    if E and moe_here:
        ops.append(op("bias_update", "dp", E * 4, moe_here))
    if lo.pp > 1:
        ops += [op("pp_loss", "pp", 16), op("pp_counts", "pp", (model.moe_layers + depth) * E * 4),
                op("pp_grad_norm", "pp", 4)]
        if piece_rank(lo, 0) != piece_rank(lo, n_pieces - 1):  # the embedding on two ranks
            ops.append(op("pp_embedding_grad", "pp", model.vocab_size * model.hidden_size / lo.tp * 4))
    return ops


def summarize(ops: list[Op], micro: int) -> dict[str, float]:
    """FLOPs and bytes of one optimizer step (for tests and the --against breakdown)."""
    flops = sum(o.flops * o.count * (1 if o.phase == "step" else micro) for o in ops if o.kind in ("gemm", "attention"))
    mem = sum(o.bytes * o.count * (1 if o.phase == "step" else micro) for o in ops if o.kind == "memory")
    kernels = sum(o.kernels * o.count * (1 if o.phase == "step" else micro) for o in ops if o.kind != "collective")
    return {"flops": flops, "memory_bytes": mem, "kernels": kernels}
