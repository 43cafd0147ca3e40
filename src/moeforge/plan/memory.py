"""Memory per rank for a parallel layout: weights, gradients, optimizer states and activations.

Why per stage: pipeline stages differ (the first holds the embedding, the last the head and the
logits), and the planner must check the fullest one. DualPipe holds two stages per device (Sun et al.,
DualPipe README: 2x parameters, PP+1 micro-batches of activations); 1F1B's first stage holds PP.

Activation bytes count the tensors autograd saves per token per layer (listed in `layer_activation_elems`);
they are an estimate for fused kernels (flash attention saves only its output and log-sum-exp).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from .layout import Layout, TrainSettings
from .models import ModelShape


@dataclass(frozen=True)
class Memory:
    """Bytes on the fullest rank."""

    weights: float
    gradients: float
    optimizer: float  # master weights + moments
    activations: float
    stage: int  # which pipeline stage is the fullest

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total}


@lru_cache(maxsize=4096)
def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Consecutive layers per stage, the remainder spread over the first stages."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def rank_pieces(layout: Layout, stage: int) -> tuple[int, tuple[int, ...], float]:
    """How the pipeline cuts the layers, and what the rank at pipeline position `stage` runs:
    (pieces the layers are cut into, the pieces this rank holds, the share of micro-batches each sees).

    1F1B (and interleaved 1F1B, modelled as contiguous stages): PP pieces, the rank's own, every
    micro-batch. DualPipe (DeepSeek-V3): PP pieces; the rank holds `stage` and PP-1-`stage`, so the
    pipeline holds two copies of the model, and each micro-batch runs through one of them (half go each
    way). DualPipeV (moeforge's `--pp-schedule dualpipev`, the "cut-in-half" V of DeepSeek's DualPipe
    repository): 2PP pieces; the rank holds `stage` and 2PP-1-`stage` (one copy), and every
    micro-batch runs down through the first and back up through the second."""
    n = n_pieces(layout)
    if layout.schedule == "dualpipe":
        pieces = (stage, n - 1 - stage) if n - 1 - stage != stage else (stage,)
        return n, pieces, 1.0 / len(pieces)
    if layout.schedule == "dualpipev":
        return n, (stage, n - 1 - stage), 1.0
    return n, (stage,), 1.0


def n_pieces(layout: Layout) -> int:
    """The pieces `rank_pieces` cuts the layers into."""
    return 2 * layout.pp if layout.schedule == "dualpipev" else layout.pp


def piece_rank(layout: Layout, piece: int) -> int:
    """The pipeline position that holds `piece` of `rank_pieces`' cut (DualPipe: the lower of its two)."""
    n = n_pieces(layout)
    return min(piece, n - 1 - piece) if layout.schedule in ("dualpipe", "dualpipev") else piece


def stage_params(model: ModelShape, layout: Layout, stage: int) -> tuple[float, float]:
    """(non-expert, routed-expert) parameters of everything the rank at pipeline position `stage` holds."""
    n, pieces, _ = rank_pieces(layout, stage)
    dense_p = expert_p = 0.0
    for piece in pieces:
        d, e = _stage_params(model, layout.tp, layout.ep, n, piece)
        dense_p, expert_p = dense_p + d, expert_p + e
    if layout.schedule == "dualpipe" and {0, n - 1} <= set(pieces) and model.head_params and _mtp_depth(model):
        # first and last stage on one rank: one embedding (assumed of DeepSeek's DualPipe). moeforge's
        # DualPipeV keeps the MTP's copy beside the first piece's (measured), so it is counted there.
        dense_p -= model.embedding_params / layout.tp
    return dense_p, expert_p


@lru_cache(maxsize=65536)
def _stage_params(model: ModelShape, tp: int, ep: int, pp: int, stage: int) -> tuple[float, float]:
    """(non-expert, routed-expert) parameters held by one rank of a pipeline stage.

    Non-expert weights are split by TP (heads, MLP columns, vocab) except MLA's low-rank down projections
    (q_a, kv_a: every TP rank needs the whole latent) and the norms, which are replicated; routed experts
    by EP, each expert whole (no expert TP, as in DeepSeek-V3). The last stage also holds the MTP modules
    (eh_proj, norms, one MoE block each) and, when it is not the first, a copy of the input embedding
    they read (measured on moeforge's pipeline, docs/planner.md)."""
    m = model
    layers = stage_layers(m.num_layers, pp)[stage]
    dense_params, expert = 0.0, 0.0
    layer_norms = (m.norm_params - m.hidden_size) / max(1, m.num_layers)
    replicated = _replicated_attention_params(m)
    attention = (m.attention_params - replicated) / tp + replicated
    for i in layers:
        dense_params += attention + layer_norms
        if i < m.dense_layers:
            dense_params += m.dense_mlp_params / tp
        else:
            dense_params += m.shared_expert_params / tp
            expert += m.routed_expert_params / ep
    if stage == 0:
        dense_params += m.embedding_params / tp
    if stage == pp - 1:  # the head (a tied table needs its own copy when it sits on another stage)
        dense_params += (m.head_params or m.embedding_params * (pp > 1)) / tp + m.hidden_size
        depth = _mtp_depth(m)
        if depth:
            D = m.hidden_size
            dense_params += depth * (2 * D * D + 3 * D + attention + layer_norms + m.shared_expert_params / tp)
            expert += depth * m.routed_expert_params / ep
            if pp > 1 and m.head_params:  # the embedding the MTP modules look up
                dense_params += m.embedding_params / tp
    return dense_params, expert


def _mtp_depth(model: ModelShape) -> int:
    return model.moe_config.num_nextn_predict_layers if model.moe_config is not None else 0


def _replicated_attention_params(model: ModelShape) -> float:
    """MLA's q_a_proj and kv_a_proj_with_mqa: not split by TP (moeforge's parallel/tensor.py, Megatron)."""
    c = model.moe_config
    if c is None or model.kv_lora_rank is None:
        return 0.0
    return model.hidden_size * ((c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim)


@lru_cache(maxsize=1024)
def layer_activation_elems(model: ModelShape, moe: bool, selective: bool = False) -> float:
    """Activation-dtype elements saved for backward per token in one layer (see `layer_activation_split`)."""
    return sum(layer_activation_split(model, moe, selective))


@lru_cache(maxsize=1024)
def layer_activation_split(model: ModelShape, moe: bool, selective: bool = False) -> tuple[float, float]:
    """(split by TP heads or columns, the rest) of the elements saved for backward per token in one layer.

    No recomputation -- MLA: norm input and output, q_a output and its normed copy, q, the kv_a output,
    normed latent, kv_b output, the assembled k and v, the attention output. GQA: norm in/out, q, k, v,
    rotated q and k, attention output. MLP per expert a token visits: input, gate, up, act(gate)*up, output;
    router logits and scores (FP32, so 2 elements each).
    Selective (DeepSeek-V3 report, Sec. 3.2.2): norms, MLA up-projections and SwiGLU outputs are
    recomputed, and MoE expert inputs (dispatched tokens, SwiGLU inputs) are cached in FP8 (half an element).
    Expert outputs need not be kept for the gate-weight gradient: <dL/dy, W_down h> = <W_down^T dL/dy, h>,
    both of which the expert's backward computes anyway.
    The first part is what TP splits (per-head tensors, the shared experts' and dense MLP's columns); the
    rest (norms, the MLA latents, the router, routed experts, layer inputs) only sequence parallelism splits.
    """
    m, D = model, model.hidden_size
    F, K, S = m.expert_intermediate, m.experts_per_token, m.n_shared_experts
    if m.kv_lora_rank is not None:
        c = m.moe_config
        H = c.num_attention_heads
        q_lora = c.q_lora_rank or 0
        latent = c.kv_lora_rank + c.qk_rope_head_dim
        if selective:
            attn_tp, attn = H * c.v_head_dim, D + q_lora + latent
        else:
            attn_tp = H * c.qk_head_dim + H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.qk_head_dim + 2 * H * c.v_head_dim
            attn = 2 * D + 2 * q_lora + latent + c.kv_lora_rank
    else:
        H, KV, hd = m.num_heads, m.num_kv_heads, m.head_dim
        attn_tp = (H + 2 * KV) * hd + H * hd if selective else (H + 2 * KV) * hd + (H + KV) * hd + H * hd
        attn = D if selective else 2 * D
    if moe:
        router = 2 * 2 * m.n_routed_experts
        if selective:
            mlp_tp, mlp = S * 2 * F, D + router + K * (D / 2 + F)
        else:
            mlp_tp, mlp = S * 3 * F, 2 * D + router + K * (2 * D + 3 * F) + D
    else:
        F = m.dense_intermediate
        mlp_tp, mlp = (2 * F, 2 * D) if selective else (3 * F, 3 * D)
    return attn_tp + mlp_tp, attn + mlp


def cp_key_elems(model: ModelShape, selective: bool = False) -> float:
    """Of `layer_activation_elems`, the elements per key position that every context-parallel rank keeps for
    the whole sequence (parallel/context.py): the gathered normed latent and rope key, the per-head K and V
    rebuilt from them (kv_b output; not kept under selective recompute) and the assembled K and V. GQA: the
    gathered K and V heads (Llama 3's all-gather CP), split over TP by the caller like every activation."""
    c = model.moe_config
    if c is None:
        return 2 * model.num_kv_heads * model.head_dim
    if model.kv_lora_rank is None:
        return 0.0
    H = c.num_attention_heads
    kv_b = 0 if selective else H * (c.qk_nope_head_dim + c.v_head_dim)
    return c.kv_lora_rank + c.qk_rope_head_dim + kv_b + H * c.qk_head_dim + H * c.v_head_dim


def activation_bytes(model: ModelShape, layout: Layout, settings: TrainSettings, stage: int) -> float:
    """Activations of the fullest moment on the rank at pipeline position `stage` (of the fuller of its
    pieces under DualPipe / DualPipeV)."""
    n, pieces, _ = rank_pieces(layout, stage)
    per_piece = [_piece_activation_bytes(model, layout, settings, n, piece) for piece in pieces]
    # DualPipeV runs 1F1B over its 2PP pieces: each piece holds its own micro-batches, all at once
    # (PP+1 in all per rank, the DualPipe README's count); DualPipe's README count is per rank already
    return sum(per_piece) if layout.schedule == "dualpipev" else max(per_piece)


def _piece_activation_bytes(model: ModelShape, layout: Layout, settings: TrainSettings, n_pieces: int,
                            piece: int) -> float:
    """Activations of one piece (of `n_pieces`) at its fullest moment. With context parallelism a rank holds
    seq_len / cp of each sequence's tokens, but K and V (`cp_key_elems`) of the whole sequence."""
    m, lo = model, layout
    tokens = lo.micro_batch * settings.seq_len
    layers = stage_layers(m.num_layers, n_pieces)[piece]
    sel = lo.recompute == "selective"
    n_moe = sum(1 for i in layers if i >= m.dense_layers)
    if lo.cp > 1:  # a rank holds seq_len / cp of each sequence's tokens
        tokens = tokens // lo.cp
    scale = tokens * settings.act_bytes / lo.tp  # sequence parallel shards everything TP does not
    if settings.sequence_parallel:
        per_moe, per_dense = layer_activation_elems(m, True, sel), layer_activation_elems(m, False, sel)
    else:  # the unsplit part on every TP rank (in units of `scale`)
        per_moe, per_dense = (a + lo.tp * b for a, b in (layer_activation_split(m, moe, sel) for moe in (True, False)))
    if lo.cp > 1:  # per local token: also the whole sequence's keys, spread over the cp ranks
        keys = cp_key_elems(m, sel)
        per_moe, per_dense = per_moe + keys * (lo.cp - 1), per_dense + keys * (lo.cp - 1)
    per_layer = [per_moe] * n_moe + [per_dense] * (len(layers) - n_moe)
    working = 0.0
    unsplit = 1 if settings.sequence_parallel else lo.tp  # layer inputs, logits: whole on every TP rank
    if lo.recompute == "full":  # keep each layer's input; one layer is recomputed at a time in backward
        one_mb = len(layers) * m.hidden_size * scale * unsplit
        working = max(per_layer, default=0) * scale
    else:
        one_mb = sum(per_layer) * scale
    if lo.schedule == "dualpipe":  # the DualPipe README: PP + 1 per rank
        in_flight = n_pieces + 1
    else:  # 1F1B: piece k of n holds n - k micro-batches (DualPipeV's pieces too: 2PP + 1 on each rank)
        in_flight = min(n_pieces - piece, micro_batches_of(lo, settings))
    if lo.schedule == "interleaved-1f1b":  # Megatron: the first stage holds (1 + (p-1)/(p v)) x p micro-batches
        in_flight = min(micro_batches_of(lo, settings), lo.pp - piece) * (1 + (lo.pp - 1) / (lo.pp * lo.virtual_stages))
    act = one_mb * max(1, in_flight) + working
    if piece == n_pieces - 1:  # logits (activation dtype) and their FP32 copy for the loss, one micro-batch
        logits = tokens * m.vocab_size * (settings.act_bytes + 4) / lo.tp * unsplit
        depth = _mtp_depth(m)  # each MTP module: its inputs (2D, normed), one MoE block, its own logits
        act += logits + depth * ((4 * m.hidden_size * unsplit + per_moe) * scale + logits)
    return act


def micro_batches_of(layout: Layout, settings: TrainSettings) -> int:
    return max(1, settings.global_batch // (layout.dp * layout.micro_batch))


def memory_per_rank(model: ModelShape, layout: Layout, settings: TrainSettings) -> Memory:
    """The fullest rank's memory. ZeRO shards over DP (non-expert) or expert-DP (routed experts)."""
    lo = layout
    best: Memory | None = None
    for stage in range(lo.pp):
        mem = stage_memory(model, lo, settings, stage)
        if best is None or mem.total > best.total:
            best = mem
        if lo.schedule == "dualpipe" and stage >= math.ceil(lo.pp / 2):
            break
    assert best is not None
    return best


def stage_memory(model: ModelShape, layout: Layout, settings: TrainSettings, stage: int) -> Memory:
    """Memory of the rank at pipeline position `stage` (under DualPipe / DualPipeV: with both its pieces)."""
    s, lo = settings, layout
    dense_p, expert_p = stage_params(model, lo, stage)  # under DualPipe(V) the rank's two pieces
    rep = lo.dense_replicas  # dp (x cp)
    shards = {0: (1, 1, 1), 1: (1, 1, rep), 2: (1, rep, rep), 3: (rep, rep, rep)}[lo.zero]
    eshards = {0: (1, 1, 1), 1: (1, 1, lo.edp), 2: (1, lo.edp, lo.edp), 3: (lo.edp,) * 3}[lo.zero]
    weights = s.weight_bytes * (dense_p / shards[0] + expert_p / eshards[0])
    grads = s.grad_bytes * (dense_p / shards[1] + expert_p / eshards[1])
    opt = (s.master_bytes + 2 * s.moment_bytes) * (dense_p / shards[2] + expert_p / eshards[2])
    act = activation_bytes(model, lo, s, stage)
    return Memory(weights, grads, opt, act, stage)
