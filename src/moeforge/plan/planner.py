"""The planner: enumerate valid layouts, drop those that do not fit in memory, rank the rest by
predicted step time, and say where the winner's time goes.

Enumeration: TP over divisors of the heads (and KV heads) within a node; PP over divisors of the GPU
count up to the layer count; EP over divisors of the routed experts that divide DP x TP; ZeRO 0-3;
1F1B and DualPipe; recompute none/selective/full; micro-batches of 1, 2 or 4 sequences. A few thousand
analytic evaluations, well under a second for DeepSeek-V3 on 2048 GPUs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import ConfigError
from . import network as net
from .catalog import Hardware
from .decode import Decode, decode_estimate
from .layout import RECOMPUTE, SCHEDULES, Layout, TrainSettings, check_layout, divisors
from .models import ModelShape
from .steptime import StepTime, step_time


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    step: StepTime
    fits: bool


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    hardware: Hardware
    topology: net.Topology
    settings: TrainSettings
    gpus: int
    ranked: list[Candidate]  # fitting layouts, fastest first
    considered: int  # valid layouts evaluated
    rejected_memory: int  # valid layouts that did not fit
    decode: Decode

    @property
    def best(self) -> Candidate:
        return self.ranked[0]


def enumerate_layouts(model: ModelShape, gpus: int, settings: TrainSettings, gpus_per_node: int,
                      micro_batches=(1, 2, 4), zero_stages=(0, 1, 2, 3)):
    """Every layout that passes `check_layout` (memory is checked later)."""
    tps = [t for t in divisors(model.num_heads) if model.num_kv_heads % t == 0 and t <= gpus_per_node
           and gpus % t == 0]
    for tp, pp in itertools.product(tps, [p for p in divisors(gpus // 1) if p <= model.num_layers]):
        if gpus % (tp * pp):
            continue
        for cp in context_degrees(gpus // (tp * pp), settings.seq_len):
            dp = gpus // (tp * pp * cp)
            eps = [e for e in divisors(model.n_routed_experts) if (dp * tp) % e == 0] if model.moe_layers else [1]
            for ep, zero, sched, rc, mb in itertools.product(eps, zero_stages, SCHEDULES, RECOMPUTE, micro_batches):
                lo = Layout(dp=dp, tp=tp, pp=pp, ep=ep, zero=zero, schedule=sched, micro_batch=mb, recompute=rc,
                            cp=cp)
                try:
                    check_layout(model, lo, gpus, settings, gpus_per_node)
                except ConfigError:
                    continue
                yield lo


# Context parallelism is searched only where each rank keeps a chunk at least this long: it exists for
# sequences too long for one rank's memory (DeepSeek-V3 pre-trained at 4K, Llama 3 at 8K, and Llama 3's
# long-context stage kept 8K per rank: 128K over CP16), and it keeps the default search's size.
MIN_CP_CHUNK = 4096


def context_degrees(ranks: int, seq_len: int) -> list[int]:
    """cp degrees the search tries for `ranks` = dp x cp ranks: 1, and every divisor whose chunk pair
    (2 x cp chunks per sequence) divides the sequence and leaves each rank at least MIN_CP_CHUNK tokens."""
    return [1] + [c for c in divisors(ranks) if c > 1 and seq_len % (2 * c) == 0 and seq_len // c >= MIN_CP_CHUNK]


def plan(model: ModelShape, hw: Hardware, gpus: int, settings: TrainSettings, topology: str | None = None,
         layout: Layout | None = None, top: int = 10, progress=None) -> Plan:
    """Rank the layouts that fit (or evaluate just `layout`, which must be valid; it is kept even if it
    does not fit, flagged, so the user sees why). `progress(considered, fitting)` is called as the search
    goes (a large cluster's search prices tens of thousands of layouts)."""
    settings.validate()
    topo = net.topology_for(hw, gpus, topology)
    limit = hw.hbm_bytes * settings.memory_headroom
    if layout is not None:
        check_layout(model, layout, gpus, settings, hw.gpus_per_node)
        st = step_time(model, hw, topo, layout, settings)
        cands = [Candidate(layout, st, st.memory.total <= limit)]
        return Plan(model, hw, topo, settings, gpus, cands, 1, int(not cands[0].fits),
                    decode_estimate(model, hw, gpus))
    fitting, considered, rejected = [], 0, 0
    for lo in enumerate_layouts(model, gpus, settings, hw.gpus_per_node):
        considered += 1
        if progress is not None and considered % 250 == 0:
            progress(considered, len(fitting))
        st = step_time(model, hw, topo, lo, settings)
        if st.memory.total > limit:
            rejected += 1
            continue
        fitting.append(Candidate(lo, st, True))
    if considered == 0:
        raise ConfigError(f"no valid layout of {model.name} on {gpus} GPUs with global batch "
                          f"{settings.global_batch}: make the global batch a multiple of the DP degree "
                          f"(e.g. a multiple of {gpus}) or change --gpus")
    if not fitting:
        raise ConfigError(f"none of {considered} layouts of {model.name} fits in {hw.hbm_gb:g} GB "
                          f"x {settings.memory_headroom:g} on {gpus} {hw.name} GPUs; use more GPUs or a larger-memory "
                          "device")
    fitting.sort(key=lambda c: (c.step.total, c.step.memory.total))
    return Plan(model, hw, topo, settings, gpus, fitting[:top], considered, rejected,
                decode_estimate(model, hw, gpus))


def explain(p: Plan) -> list[str]:
    """Plain sentences about the winner: the layout, where the time goes, memory, and the runner-up."""
    best = p.best
    st, lo = best.step, best.layout
    lines = [f"Best layout: {lo.short()} ({st.total:.3g} s/step, {st.tokens_per_s:,.0f} tokens/s, "
             f"MFU {100 * st.mfu:.1f}% of BF16 peak)."]
    parts = sorted(((v, k) for k, v in st.parts().items() if v > 0), reverse=True)
    lines.append("Time: " + ", ".join(f"{k} {100 * v / st.total:.0f}%" for v, k in parts) + ".")
    if st.ep_comm:
        hidden = 1 - (st.exposed_ep_pp / (st.ep_comm + st.pp_comm) if st.ep_comm + st.pp_comm else 0)
        lines.append(f"EP all-to-all takes {st.ep_comm:.3g} s per step, {100 * hidden:.0f}% hidden behind compute.")
    mem = st.memory
    lines.append(f"Memory on the fullest rank (stage {mem.stage}): {mem.total / 1e9:.1f} GB of "
                 f"{p.hardware.hbm_gb:g} GB (weights {mem.weights / 1e9:.1f}, gradients {mem.gradients / 1e9:.1f}, "
                 f"optimizer {mem.optimizer / 1e9:.1f}, activations {mem.activations / 1e9:.1f}).")
    if len(p.ranked) > 1:
        nxt = p.ranked[1]
        lines.append(f"Runner-up {nxt.layout.short()} is {100 * (nxt.step.total / st.total - 1):.1f}% slower.")
    lines.append(f"{p.considered} valid layouts considered, {p.rejected_memory} did not fit in memory.")
    return lines
