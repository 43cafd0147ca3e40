"""Training step time for a layout: the priced operations of one step, the pipeline bubble, and the
communication the schedule cannot hide.

    step = micro-batches x (forward + backward of one micro-batch) + optimizer + bubble
           + TP all-reduces + exposed EP / PP traffic + exposed DP gradient sync + CP KV all-gathers
           + waiting for peers at collectives (a device that measured it: this CPU, sync_skew.py)

* Each operation of `ops.step_ops` (GEMMs by shape, attention, memory-bound ops, launches) is priced by a
  device model (`device.GPUDevice` from component benchmarks, `device.CPUDevice` measured here).
* bubble: 1F1B (PP-1)(F+B); interleaved 1F1B (PP-1)(F+B)/v with v virtual stages (Narayanan et al. 2021);
  DualPipe (PP/2-1)(F&B + B - 3W) with F = t/3, B = 2t/3, W = t/3 and F&B = F+B (DualPipe README).
* TP all-reduces sit between dependent matmuls: never hidden.
* What the schedule hides (`overlap=None`, the default): DualPipe overlaps one micro-batch's EP/PP
  traffic with another's compute, so only traffic beyond the compute is exposed; 1F1B hides pipeline
  sends (asynchronous) but not the EP all-to-all, which sits between the router and the experts, except
  the dispatch overlapped with the shared experts' compute. DP gradient sync hides behind the last
  micro-batch's backward (bucketed) and the bubble; ZeRO-3 gathers are prefetched behind compute. On a
  device that cannot compute while communicating (this CPU: gloo and the kernels share the cores)
  nothing hides. `overlap=x` instead hides a fraction x of EP/PP/DP traffic, bounded by the compute.
* Hidden is not free: the EP all-to-all kernels run on SMs (`TrainSettings.ep_comm_sms` of
  `Hardware.sm_count`: 20 of 132 in DeepSeek-V3), so the computation they overlap runs on the rest.
  Work W overlapped by traffic C takes C + (W - C(1 - f)) = W + fC with f the SM fraction: `comm_sm`.
MFU = model FLOPs (no recomputation) per second / (GPUs x dense BF16 peak), the usual convention; FP8
runs can therefore pass 50%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import network as net
from .catalog import Hardware
from .layout import DUAL, Layout, TrainSettings, micro_batches
from .memory import Memory, memory_per_rank, n_pieces, piece_rank, rank_pieces, stage_layers
from .models import ModelShape
from .ops import Op, rank_layers, step_blocks


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
    optimizer: float = 0.0  # clipping + AdamW, part of compute
    by_kind: dict = field(default_factory=dict)  # compute seconds per step by op kind (gemm, attention, memory)
    t_microbatch: float = 0.0  # forward + backward of one micro-batch on the fullest stage
    cp_comm: float = 0.0  # context parallelism's compressed-KV all-gathers (and backward reduce-scatters)
    comm_sm: float = 0.0  # compute slowed while the hidden EP all-to-all holds its SMs (module docstring)
    sync_wait: float = 0.0  # ranks waiting for each other at collectives (a device with a measurement of it)

    def parts(self) -> dict[str, float]:
        """Where the time goes; sums to `total`. Exposed EP/PP time is split by their shares."""
        ep_pp = self.ep_comm + self.pp_comm
        ep_share = self.ep_comm / ep_pp if ep_pp else 0.0
        return {"compute": self.compute, "pipeline bubble": self.bubble, "TP all-reduce": self.tp_comm,
                "EP all-to-all (exposed)": self.exposed_ep_pp * ep_share,
                "PP send/recv (exposed)": self.exposed_ep_pp * (1 - ep_share),
                "DP gradient sync (exposed)": self.exposed_dp,
                **({"CP KV all-gather": self.cp_comm} if self.cp_comm else {}),
                **({"EP kernels' SMs (hidden all-to-all)": self.comm_sm} if self.comm_sm else {}),
                **({"waiting for peers at collectives": self.sync_wait} if self.sync_wait else {})}

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.to_json()
        d["parts"] = self.parts()
        return d


def bubble_time(layout: Layout, t_mb: float) -> float:
    pp = layout.pp
    if pp <= 1:
        return 0.0
    if layout.schedule in DUAL:
        # The DualPipe README: (PP/2 - 1)(F&B + B - 3W), PP the pieces the layers are cut into and F, B, W
        # one piece's. A DualPipe rank runs one of its two stages per micro-batch (t_mb is one stage's
        # F+B); a DualPipeV rank runs both of its pieces (2 PP of them), so a piece is half of t_mb.
        piece_fb = t_mb if layout.schedule == "dualpipe" else t_mb / 2
        base = piece_fb * (3 / 4 if layout.recompute == "full" else 1.0)  # F+B without the recompute
        f, b, w = base / 3, 2 * base / 3, base / 3
        return (n_pieces(layout) / 2 - 1) * ((f + b) + b - 3 * w)
    if layout.schedule == "interleaved-1f1b":
        return (pp - 1) * t_mb / layout.virtual_stages
    return (pp - 1) * t_mb


STRIDES = {"tp": lambda lo: (lo.tp, 1), "ep": lambda lo: (lo.ep, 1), "dp": lambda lo: (lo.dense_replicas, lo.tp),
           "edp": lambda lo: (lo.edp, lo.ep), "pp": lambda lo: (lo.pp, lo.dp * lo.cp * lo.tp),
           "cp": lambda lo: (lo.cp, lo.tp), "world": lambda lo: (lo.gpus, 1)}


def collective_time(op: Op, topo: net.Topology, lo: Layout, settings: TrainSettings) -> tuple[float, str]:
    """Alpha-beta time of one collective op over its group (network.py), and the algorithm chosen."""
    p, stride = STRIDES[op.group](lo)
    if op.collective == "p2p":
        return net.p2p(topo, op.bytes, stride).time, "p2p"
    if p <= 1:
        return 0.0, "none"
    if op.collective == "moe_a2a":
        c = net.moe_all_to_all(topo, op.m, op.n, op.k, p, op.bytes / (op.m * op.n), stride=stride,
                               node_limit=settings.node_limit)
    else:
        c = {"all_reduce": net.all_reduce, "all_gather": net.all_gather, "reduce_scatter": net.reduce_scatter,
             "all_to_all": net.all_to_all}[op.collective](topo, op.bytes, p, stride)
    return c.time, c.algorithm


def local_collective_time(device, op: Op, lo: Layout) -> tuple[float, str] | None:
    """A collective priced by the device's own measurement of it (this CPU's gloo, gloo_link.py), or None
    where the device has none (GPUs: the alpha-beta network model; pipeline sends)."""
    measure = getattr(device, "collective_seconds", None)
    if measure is None or getattr(device, "ranks", 1) <= 1 or op.collective == "p2p":
        return None  # no local run of several processes to measure for
    p, _ = STRIDES[op.group](lo)
    if op.collective == "moe_a2a":  # each token's row to each of its k experts (network.moe_all_to_all)
        t = measure("all_to_all", op.bytes * op.k, p)
    else:
        t = measure(op.collective, op.bytes, p)
    return None if t is None else (t, "gloo (measured)")


_PRICED: dict = {}


def price_block(device, block: tuple[Op, ...]):
    """(forward, backward, per-step, shared-expert forward seconds, {kind: (per micro-batch, per step)},
    the block's collectives) for a block of `ops.step_blocks`; kept per (device, block) object, since
    the planner meets the same blocks in thousands of layouts."""
    key = (id(device), id(block))
    hit = _PRICED.get(key)
    if hit is not None and hit[0] is device and hit[1] is block:
        return hit[2]
    fwd = bwd = step = shared = 0.0
    kinds: dict[str, list[float]] = {}
    collectives = []
    for op in block:
        if op.kind == "collective":
            collectives.append(op)
            continue
        t = device.op_time(op) * op.count
        slot = kinds.setdefault(op.kind, [0.0, 0.0])
        if op.phase == "step":
            step += t
            slot[1] += t
            continue
        slot[0] += t
        if op.phase == "fwd":
            fwd += t
            shared += t if ".shared." in op.name else 0.0
        else:
            bwd += t
    out = (fwd, bwd, step, shared, {k: tuple(v) for k, v in kinds.items()}, tuple(collectives))
    if len(_PRICED) > 50000:
        _PRICED.clear()
    _PRICED[key] = (device, block, out)
    return out


def _hidden(comm: float, window: float, overlap: float | None, schedule_hides: bool) -> float:
    """Exposed part of `comm` seconds that may run under `window` seconds of compute."""
    if overlap is not None:
        return max((1 - overlap) * comm, comm - window)
    return max(0.0, comm - window) if schedule_hides else comm


def candidate_stages(model: ModelShape, lo: Layout) -> list[int]:
    """Pipeline positions that can be the slowest: those holding the first piece (embedding) and the last
    (head, loss, MTP), and the first with the most layers and with the most MoE layers (the pipeline runs
    at its slowest rank)."""
    pieces = n_pieces(lo)
    ranges = stage_layers(model.num_layers, pieces)

    def moe_layers(stage: int) -> int:
        return sum(1 for p in rank_pieces(lo, stage)[1] for j in ranges[p] if j >= model.dense_layers)

    most = max(range(lo.pp), key=lambda i: rank_layers(model, lo, i))
    most_moe = max(range(lo.pp), key=lambda i: (moe_layers(i), -i))
    stages = {0, piece_rank(lo, pieces - 1), most, most_moe}
    if lo.schedule == "dualpipe":  # positions s and PP-1-s hold the same two stages
        stages = {min(x, lo.pp - 1 - x) for x in stages}
    return sorted(stages)


def step_time(model: ModelShape, hw: Hardware, topo: net.Topology, layout: Layout,
              settings: TrainSettings, device=None) -> StepTime:
    """The step time of the slowest pipeline stage's rank."""
    from .device import gpu_device

    device = device if device is not None else gpu_device(hw)
    return max((_stage_step_time(model, hw, topo, layout, settings, device, st)
                for st in candidate_stages(model, layout)), key=lambda t: t.total)


def _stage_step_time(model, hw, topo, layout, settings, device, stage: int) -> StepTime:
    s, lo = settings, layout
    m = micro_batches(lo, s)
    fwd = bwd = opt = shared_fwd = 0.0
    tp_mb = ep_mb = pp_mb = zero3_mb = dispatch_mb = dp_comm = cp_mb = 0.0
    kinds: dict[str, float] = {}
    algos: dict[str, str] = {}
    syncs = 0.0  # collectives a step where the group's ranks meet (pipeline sends: the bubble's business)
    for block in step_blocks(model, lo, s, device.impl, stage):
        b_fwd, b_bwd, b_step, b_shared, b_kinds, collectives = price_block(device, block)
        fwd, bwd, opt, shared_fwd = fwd + b_fwd, bwd + b_bwd, opt + b_step, shared_fwd + b_shared
        for kind, (t_mb, t_step) in b_kinds.items():
            kinds[kind] = kinds.get(kind, 0.0) + m * t_mb + t_step
        for op in collectives:
            t, algo = local_collective_time(device, op, lo) or collective_time(op, topo, lo, s)
            t *= op.count * getattr(device, "comm_slowdown", 1.0)
            algos[op.group] = algo
            if op.collective != "p2p" and STRIDES[op.group](lo)[0] > 1:
                syncs += op.count * (1 if op.phase == "step" else m)
            if op.phase == "step":
                dp_comm += t
            elif op.group == "tp":
                tp_mb += t
            elif op.group == "cp":  # sits between kv_a_proj and the attention: not hidden (parallel/context.py)
                cp_mb += t
            elif op.group == "ep":
                ep_mb += t
                if op.name.endswith("dispatch"):
                    dispatch_mb += t
            elif op.group == "pp":
                pp_mb += t
            else:
                zero3_mb += t
    if hasattr(device, "save"):
        device.save()
    t_mb = fwd + bwd
    compute = m * t_mb + opt
    bubble = bubble_time(lo, t_mb)
    tp_comm = m * tp_mb
    ep_comm, pp_comm = m * ep_mb, m * pp_mb
    overlaps = getattr(device, "can_overlap", True)
    hidden_ep = 0.0
    if not overlaps and s.overlap is None:
        exposed_ep_pp = ep_comm + pp_comm
        exposed_dp = dp_comm + m * zero3_mb
    else:
        if lo.schedule in DUAL:  # forward and backward chunks of two micro-batches overlap each other's comm
            exposed_ep_pp = _hidden(ep_comm + pp_comm, m * t_mb, s.overlap, True)
            if ep_comm + pp_comm:
                hidden_ep = (ep_comm + pp_comm - exposed_ep_pp) * ep_comm / (ep_comm + pp_comm)
        else:  # the EP all-to-all is on the critical path except behind the shared experts; PP sends are async
            if s.overlap is None:
                exposed_ep = ep_comm - m * min(dispatch_mb, shared_fwd)
            else:
                exposed_ep = _hidden(ep_comm, m * t_mb, s.overlap, True)
            hidden_ep = ep_comm - exposed_ep
            exposed_ep_pp = exposed_ep + _hidden(pp_comm, m * t_mb, s.overlap, True)
        window = bubble + bwd  # the last micro-batch's backward and the bubble
        exposed_dp = _hidden(dp_comm, window, s.overlap, True) + _hidden(m * zero3_mb, m * t_mb, s.overlap, True)
    sms = hw.sm_count
    comm_sm = hidden_ep * min(s.ep_comm_sms, sms) / sms if sms else 0.0
    cp_comm = m * cp_mb
    measure_wait = getattr(device, "sync_wait", None)
    sync_wait = measure_wait(syncs, compute / getattr(device, "slowdown", 1.0)) if measure_wait else 0.0
    total = compute + bubble + tp_comm + exposed_ep_pp + exposed_dp + cp_comm + comm_sm + sync_wait

    flops = model.train_flops_per_token(s.seq_len)
    tokens = s.global_batch * s.seq_len
    mfu = flops * tokens / total / (lo.gpus * hw.peak_flops)
    return StepTime(compute, bubble, tp_comm, ep_comm, pp_comm, dp_comm + m * zero3_mb, exposed_ep_pp, exposed_dp,
                    total, tokens / total, mfu, flops, memory_per_rank(model, lo, s), algos,
                    optimizer=opt, by_kind=kinds, t_microbatch=t_mb, cp_comm=cp_comm, comm_sm=comm_sm,
                    sync_wait=sync_wait)
