"""Training step time for a layout: compute, pipeline bubble, and the communication left exposed.

The model, per optimizer step on the slowest rank:

    step = compute + bubble + TP + exposed(EP + PP) + exposed(DP)

* compute = micro-batches x t_mb, t_mb the forward+backward time of one micro-batch on one stage
  (matmuls at the FP8 or BF16 peak, attention core at BF16, both x compute efficiency; +1/3 with full
  recomputation; selective recomputation redoes norms, SwiGLU and MLA up-projections, <1% of the FLOPs,
  taken as free). Stages are taken as equal (the embedding and head are left out of FLOPs per token).
* bubble: 1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B + B - 3W) with F = t/3, B = 2t/3, W = t/3 and
  F&B = F+B (DualPipe README).
* TP all-reduces sit between dependent matmuls: never hidden.
* EP all-to-all and PP sends overlap with compute: exposed = max((1-overlap) C, C - compute).
* DP gradient sync can hide only behind the last backward and the bubble.
MFU = model FLOPs (no recomputation) per second / (GPUs x dense BF16 peak), the usual convention; FP8
runs can therefore pass 50%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import network as net
from .catalog import Hardware
from .layout import Layout, TrainSettings, micro_batches
from .memory import Memory, memory_per_rank, stage_layers, stage_params
from .models import ModelShape


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    tp_comm: float
    ep_comm: float  # total EP all-to-all time per step (before overlap)
    pp_comm: float
    dp_comm: float
    exposed_ep_pp: float
    exposed_dp: float
    total: float
    tokens_per_s: float
    mfu: float
    flops_per_token: float
    memory: Memory
    algorithms: dict = field(default_factory=dict)

    def parts(self) -> dict[str, float]:
        """Where the time goes; sums to `total`. Exposed EP/PP time is split by their shares."""
        ep_pp = self.ep_comm + self.pp_comm
        ep_share = self.ep_comm / ep_pp if ep_pp else 0.0
        return {"compute": self.compute, "pipeline bubble": self.bubble, "TP all-reduce": self.tp_comm,
                "EP all-to-all (exposed)": self.exposed_ep_pp * ep_share,
                "PP send/recv (exposed)": self.exposed_ep_pp * (1 - ep_share),
                "DP gradient sync (exposed)": self.exposed_dp}

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.to_json()
        d["parts"] = self.parts()
        return d


def microbatch_compute(model: ModelShape, hw: Hardware, layout: Layout, settings: TrainSettings) -> float:
    """Forward + backward seconds of one micro-batch on one stage of one rank."""
    tokens = layout.micro_batch * settings.seq_len
    total = model.train_flops_per_token(settings.seq_len)
    attn = model.attention_core_flops_per_token(settings.seq_len)
    per_token = (total - attn) / hw.matmul_flops(settings.precision) + attn / hw.matmul_flops("bf16")
    t = tokens * per_token / (layout.tp * layout.pp * settings.efficiency)
    return t * (4 / 3 if layout.recompute == "full" else 1.0)


def bubble_time(layout: Layout, t_mb: float) -> float:
    pp = layout.pp
    if pp <= 1:
        return 0.0
    if layout.schedule == "dualpipe":
        base = t_mb * (3 / 4 if layout.recompute == "full" else 1.0)  # F+B without the recompute
        f, b, w = base / 3, 2 * base / 3, base / 3
        return (pp / 2 - 1) * ((f + b) + b - 3 * w)
    return (pp - 1) * t_mb


def step_time(model: ModelShape, hw: Hardware, topo: net.Topology, layout: Layout,
              settings: TrainSettings) -> StepTime:
    s, lo, D = settings, layout, model.hidden_size
    m = micro_batches(lo, s)
    tokens_mb = lo.micro_batch * s.seq_len
    t_mb = microbatch_compute(model, hw, lo, s)
    compute = m * t_mb
    bubble = bubble_time(lo, t_mb)
    layers = max(len(r) for r in stage_layers(model.num_layers, lo.pp))
    moe_layers = max(sum(1 for i in r if i >= model.dense_layers) for r in stage_layers(model.num_layers, lo.pp))
    passes = 3 if lo.recompute == "full" else 2  # forward (+ recomputed forward) and backward
    algos = {}

    # TP: two all-reduces per layer per pass of the micro-batch's activations
    tp = net.all_reduce(topo, tokens_mb * D * s.act_bytes, lo.tp, stride=1)
    tp_comm = m * layers * 2 * passes * tp.time
    algos["tp"] = tp.algorithm

    # EP: dispatch + combine per MoE layer per pass; forward dispatch in FP8, everything else BF16
    ep_comm = 0.0
    if lo.ep > 1 and moe_layers:
        def a2a(nbytes):
            return net.moe_all_to_all(topo, tokens_mb / lo.tp, D, model.experts_per_token, lo.ep, nbytes,
                                      stride=1, node_limit=s.node_limit)
        fwd = a2a(s.dispatch_bytes).time + a2a(s.combine_bytes).time
        bwd = 2 * a2a(s.combine_bytes).time
        ep_comm = m * moe_layers * (fwd * (passes - 1) + bwd)
        algos["ep"] = a2a(s.dispatch_bytes).algorithm

    # PP: activations forward, their gradients backward, between neighbouring stages
    pp_comm = 0.0
    if lo.pp > 1:
        send = net.p2p(topo, tokens_mb * D * s.act_bytes / lo.tp, stride=lo.dp * lo.tp)
        pp_comm = m * 2 * send.time
        algos["pp"] = "p2p"

    # DP: gradient all-reduce (ZeRO-1/2: reduce-scatter + all-gather, the same volume); ZeRO-3 also
    # all-gathers the weights for every forward and backward
    dense_p, expert_p = stage_params(model, lo, 0)
    if lo.schedule == "dualpipe":
        d2, e2 = stage_params(model, lo, lo.pp - 1)
        dense_p, expert_p = dense_p + d2, expert_p + e2
    dp = net.all_reduce(topo, dense_p * s.grad_comm_bytes, lo.dp, stride=lo.tp)
    edp = net.all_reduce(topo, expert_p * s.grad_comm_bytes, lo.edp, stride=lo.ep)
    dp_comm = dp.time + edp.time
    algos["dp"], algos["edp"] = dp.algorithm, edp.algorithm
    if lo.zero == 3:
        ag = net.all_gather(topo, dense_p * s.weight_bytes, lo.dp, stride=lo.tp).time
        eag = net.all_gather(topo, expert_p * s.weight_bytes, lo.edp, stride=lo.ep).time
        dp_comm += m * 2 * (ag + eag)

    c = ep_comm + pp_comm
    exposed_ep_pp = max((1 - s.overlap) * c, c - compute)
    window = bubble + t_mb * 2 / 3 if lo.zero < 3 else compute
    exposed_dp = max((1 - s.overlap) * dp_comm, dp_comm - window)
    total = compute + bubble + tp_comm + exposed_ep_pp + exposed_dp

    flops = model.train_flops_per_token(s.seq_len)
    tokens = s.global_batch * s.seq_len
    mfu = flops * tokens / total / (lo.gpus * hw.peak_flops)
    return StepTime(compute, bubble, tp_comm, ep_comm, pp_comm, dp_comm, exposed_ep_pp, exposed_dp, total,
                    tokens / total, mfu, flops, memory_per_rank(model, lo, s), algos)
