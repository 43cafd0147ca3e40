"""Pricing one operation on one device: GEMMs by shape, attention, memory-bound ops, kernel launches.

Why by shape: a GEMM's achieved rate depends on its smallest dimension (tile occupancy, operand reuse):
DeepGEMM's FP8 GEMMs on H800 run at 14% of peak with 64 rows and 61% with 4096 (table below), and a
routed expert of DeepSeek-V3 on EP64 sees ~1-2K rows. Memory-bound ops move bytes at the achievable
(not nominal) bandwidth, and no kernel is shorter than its launch.

Two kinds of device:
  GPU (`GPUDevice`)      from the catalogue's vendor peaks and the published *component* benchmarks below
                         (GEMM TFLOP/s by shape, flash attention, sustained HBM copy); none is fitted to
                         an end-to-end training throughput.
  this CPU (`CPUDevice`) measured here: each GEMM shape timed (cached on disk), element-wise bandwidth,
                         per-operation dispatch cost, loopback socket bandwidth for gloo.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .catalog import Hardware
from .ops import EAGER, FUSED, Impl, Op

# --- GPU component figures ---------------------------------------------------------------------------
# Achieved / peak of the FP8 peak by the GEMM's smallest dimension (rows per group for grouped GEMMs),
# from DeepGEMM's README tables (deepseek-ai/DeepGEMM, Feb 2025 version; H800, FP8 E4M3 with 1x128 /
# 128x128 scales, peak 1979 TFLOPS): dense M=64 rows 206-336 TFLOPS (mean 272 -> 0.14), M=128 352-645
# (mean 489 -> 0.25), M=4096 775-1520 (mean 1202 -> 0.61); masked grouped GEMMs M=256 932/815 (0.44),
# M=512 1040/916 (0.49), M=1024 1233/925 (0.55); contiguous grouped M=4096 1288/1093 and M=8192
# 1297/1099 (0.60). Below 64 rows the kernel is weight-read bound: scaled down linearly.
GEMM_CURVE_FP8 = ((64, 0.14), (128, 0.25), (256, 0.44), (512, 0.49), (1024, 0.55), (4096, 0.61), (8192, 0.61))
# BF16 tensor-core GEMMs: no published by-shape table was found for this model; we take the same curve
# relative to the BF16 peak, capped at 0.70 for large shapes (an assumption, stated in docs/planner.md:
# FlashAttention-3 reaches 0.75 of the BF16 peak in its GEMM-dominated kernel, an upper bound).
BF16_LARGE_CAP = 0.70
# Flash attention, achieved / BF16 peak: FlashAttention-3 forward on H100, head dim 128, seq 4096: 590
# TFLOPS (pytorch/benchmark PR #2391, FA3 paper setup) -> 0.60; backward ~1.5-1.75x FA2 (Shah et al. 2024,
# arXiv 2407.08608, Fig. 6), ~450 TFLOPS -> 0.45 of the conventional 2x-forward FLOPs.
FLASH_FWD, FLASH_BWD = 0.60, 0.45
# Sustained HBM bandwidth / nominal: coalesced loads on H100 SXM 2.8 of 3.35 TB/s (Nsight Compute
# measurement, mikamirai.com "GPU memory bandwidth", 2026) -> 0.84.
HBM_EFFICIENCY = 0.84
# Per-kernel floor: a CUDA kernel launch costs ~4 us of host time; when kernels are shorter the GPU waits
# (NVIDIA developer blog "Getting Started with CUDA Graphs", 2019: ~3.8 us per short kernel without graphs).
KERNEL_LAUNCH_S = 4e-6


def _interp_log(curve, x: float) -> float:
    """Piecewise-linear in log2(x) through (x, y) points; linear to 0 below the first point."""
    xs = [p[0] for p in curve]
    if x <= xs[0]:
        return curve[0][1] * max(x, 1) / xs[0]
    if x >= xs[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
    return y0 + t * (y1 - y0)


@dataclass(frozen=True)
class GPUDevice:
    """A catalogue accelerator priced from component benchmarks (see the constants above)."""

    hw: Hardware
    impl: Impl = FUSED
    name: str = "gpu"

    def gemm_efficiency(self, op: Op) -> float:
        smallest = min(op.m, op.n, op.k)
        eff = _interp_log(GEMM_CURVE_FP8, smallest)
        if op.precision in ("bf16", "fp32"):
            eff = min(eff, BF16_LARGE_CAP)
        return eff

    def op_time(self, op: Op) -> float:
        return _gpu_op_time(self, op)

    def _op_time(self, op: Op) -> float:
        hw = self.hw
        if op.kind == "gemm":
            t = op.flops / (hw.matmul_flops(op.precision) * self.gemm_efficiency(op))
            return max(t, KERNEL_LAUNCH_S)
        if op.kind == "attention":  # one fused kernel per direction (its FLOPs split over the list's GEMMs)
            eff = FLASH_BWD if op.name.endswith(".bwd") else FLASH_FWD
            return op.flops / (hw.matmul_flops("bf16") * eff)
        if op.kind == "memory":
            return max(op.bytes / (hw.hbm_bw * HBM_EFFICIENCY), op.kernels * KERNEL_LAUNCH_S)
        if op.kind == "host":  # a GPU's host runs ahead of its kernels: the launch floor is what shows
            return 0.0
        raise ValueError(op.kind)


@lru_cache(maxsize=65536)
def _gpu_op_time(device: GPUDevice, op: Op) -> float:  # the planner prices the same ops for many layouts
    return device._op_time(op)


# --- this CPU, measured ----------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    """Median CPU seconds (per intra-op thread) per call (after a warm-up call: oneDNN picks and JITs kernels).

    CPU time, not wall time: on a machine shared with other jobs the wall time of a call depends on what
    else runs; its CPU time does not. The wall clock comes back through `measure_share`.

    Calls that page-faulted are timed again (up to 4x `repeats` calls in all): the trainer keeps freed
    memory (cpu_heap.py), so in its steady state a step takes no faults, while a probe's fresh output can
    fault on one call and not the next: a 16 MB bmm took 12-17 ms faulting and 4-6 ms not, which made
    the same shape's median 2x apart from one measurement to the next."""
    import torch

    from ..step_clock import minor_faults

    fn()
    threads = torch.get_num_threads()  # intra-op threads share the work: CPU seconds / threads
    clean, faulted = [], []
    for _ in range(4 * repeats):
        f0 = minor_faults()
        t0 = time.process_time()
        fn()
        t = (time.process_time() - t0) / threads
        (clean if f0 is None or minor_faults() == f0 else faulted).append(t)
        if len(clean) >= repeats:
            break
    times = sorted(clean if len(clean) >= max(1, repeats // 2) else clean + faulted)
    return times[len(times) // 2]


def measure_share(seconds: float = 0.25, rounds: int = 3) -> float:
    """The fraction of one core this process gets now (thread CPU time / wall time over a busy loop):
    1 on an idle machine, ~0.2 when five other jobs compete for each core."""
    import torch

    a = torch.randn(256, 256)
    shares = []
    with _threads(1):
        for _ in range(rounds):
            w0, c0 = time.perf_counter(), time.thread_time()
            while time.perf_counter() - w0 < seconds:
                a.mul_(1.0)
            shares.append((time.thread_time() - c0) / (time.perf_counter() - w0))
    shares.sort()
    return max(1e-3, min(1.0, shares[len(shares) // 2]))


def _cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeforge"
    return root / "plan-cpu.json"


class _ShapeCache:
    """GEMM timings of this machine by (op, shape, dtype, threads), kept on disk: measuring a shape takes
    milliseconds, a step has a few dozen distinct ones, and the table is reused by every --against."""

    def __init__(self, path: Path):
        self.path = path
        self.key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        self.data = data if isinstance(data, dict) else {}
        self.table = self.data.setdefault(self.key, {})
        self.dirty = False

    def get(self, key: str, measure) -> float:
        if key not in self.table:
            self.table[key] = measure()
            self.dirty = True
        return self.table[key]

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)
            self.dirty = False
        except OSError:
            pass


def _threads(n: int):
    import torch

    class _Ctx:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Ctx()


def measure_gemm(m: int, n: int, k: int, groups: int, dtype: str, threads: int, repeats: int = 5) -> float:
    """Seconds of one (grouped) GEMM [m, k] @ [k, n] on fresh tensors: torch.mm, or for groups > 1
    torch._grouped_mm over equal groups (how moeforge runs its routed experts) with bmm as fallback."""
    import torch

    dt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, "float32"))
    with _threads(threads), torch.no_grad():
        if groups == 1:
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            return _median_time(lambda: torch.mm(a, b), repeats)
        a, b = torch.randn(groups * m, k, dtype=dt), torch.randn(groups, k, n, dtype=dt)
        offs = torch.arange(1, groups + 1, dtype=torch.int32) * m
        try:
            torch._grouped_mm(a, b, offs=offs)
            return _median_time(lambda: torch._grouped_mm(a, b, offs=offs), repeats)
        except (RuntimeError, AttributeError):
            a3 = a.view(groups, m, k)
            return _median_time(lambda: torch.bmm(a3, b), repeats)


def measure_memory(threads: int, mb: float = 8.0, repeats: int = 15) -> dict:
    """Element-wise bandwidth (bytes moved per second by x * y, then + x, at activation-sized tensors) and
    the cost of dispatching one tiny operation.

    Into outputs allocated once: a trainer's eager ops allocate theirs, but in its steady state malloc
    hands back memory freed by the previous step. A fresh process allocating and freeing the same two
    tensors instead grows and trims the top of its heap on every call, and pays page faults: measured here
    (8 MB, one thread, in six fresh processes) 4.5-15.5 GB/s that way, bimodal from one process to the
    next, against 12-19 GB/s into preallocated outputs. The old measurement's slow mode alone put a tiny
    step's predicted memory-bound time at 1.8 s instead of about 0.3 s."""
    import torch

    step, nbytes = _stream_pass(mb)
    with _threads(threads):
        t = _median_time(step, repeats)
        tiny = torch.ones(8)
        overhead = _median_time(lambda: [tiny + 1 for _ in range(200)], repeats) / 200
    return {"elementwise_bw": nbytes / max(t - 2 * overhead, 1e-9), "dispatch_s": overhead}


def _stream_pass(mb: float):
    """(x * y, then + x, into outputs allocated once, over mb-MB tensors; the bytes it moves: 3 + 3 passes)."""
    import torch

    n = int(mb * 2 ** 20 / 4)
    a, b, ab, out = torch.randn(n), torch.randn(n), torch.empty(n), torch.empty(n)
    return (lambda: torch.add(torch.mul(a, b, out=ab), a, out=out)), 6 * n * 4


def _stream_peer(mb: float, go, stop) -> None:
    """A forked peer that streams the same element-wise pass as `measure_memory` while `go` is set
    (one thread: a fork after the parent ran OpenMP deadlocks with more)."""
    import torch

    torch.set_num_threads(1)
    step, _ = _stream_pass(mb)
    while not stop.is_set():
        if go.wait(0.01):
            step()


def measure_corun_bandwidth(threads: int, peers: int, mb: float = 8.0, rounds: int = 8) -> float:
    """Element-wise bandwidth of one rank while `peers` other processes stream too, as the ranks of a run
    on this machine do: cores share the memory bus, so a rank's memory-bound ops slow when its peers run
    theirs. Alone and beside the peers in alternating rounds, so that a change in the machine's speed
    between rounds hits both; returns alone bandwidth / median(beside / alone time).

    Measured here (2026-12-01, one peer, 8 MB): 1.43-1.55x longer beside a streaming peer, steady from
    round to round; a GEMM of the tiny model's shape was 1.01x at the median (0.63-1.68x, this VM's
    noise), so only the bandwidth gets a co-run term (docs/planner.md)."""
    import multiprocessing as mp
    import statistics

    step, nbytes = _stream_pass(mb)
    ctx = mp.get_context("fork")
    go, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_stream_peer, args=(mb, go, stop), daemon=True) for _ in range(peers)]
    for p in procs:
        p.start()
    ratios, alone_times = [], []
    try:
        with _threads(threads):
            for _ in range(rounds):
                go.clear()
                time.sleep(0.02)
                alone = _median_time(step, 7)
                go.set()
                time.sleep(0.02)
                ratios.append(_median_time(step, 7) / alone)
                alone_times.append(alone)
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
    return nbytes / statistics.median(alone_times) / max(1.0, statistics.median(ratios))


def measure_socket(mb: float = 32.0) -> dict:
    """Loopback TCP bandwidth and round-trip latency: gloo's transport between processes here."""
    a, b = socket.socketpair()
    payload = b"x" * (1 << 20)
    total = int(mb) * len(payload)

    def sink():
        got = 0
        while got < total:
            got += len(b.recv(1 << 20))
    th = threading.Thread(target=sink)
    th.start()
    t0 = time.perf_counter()
    for _ in range(int(mb)):
        a.sendall(payload)
    th.join()
    bw = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(200):
        a.sendall(b"p")
        b.recv(1)
    lat = (time.perf_counter() - t0) / 200
    a.close()
    b.close()
    return {"socket_bw": bw, "socket_latency_s": lat}


@lru_cache(maxsize=None)
def measured_rates(threads: int) -> tuple:
    """This machine's element-wise bandwidth, dispatch cost, loopback sockets and CPU share, measured once
    per process (so the rows of one validation table share one measurement)."""
    return tuple({**measure_memory(threads), **measure_socket(), "share": measure_share()}.items())


@lru_cache(maxsize=None)
def corun_bandwidth(threads: int, peers: int) -> float:
    """`measure_corun_bandwidth`, once per process per (threads, peers)."""
    return measure_corun_bandwidth(threads, peers)


@lru_cache(maxsize=None)
def sync_skew(ranks: int) -> dict:
    """`sync_skew.measure_sync_skew`, once per process per rank count (it depends on the load now)."""
    from .sync_skew import measure_sync_skew

    return measure_sync_skew(ranks)


@dataclass
class CPUDevice:
    """This machine, as `ranks` processes of `threads` threads each sharing its cores (gloo runs)."""

    threads: int = 1
    ranks: int = 1
    impl: Impl = EAGER
    name: str = "cpu"
    can_overlap: bool = False  # gloo and the kernels share the cores: communication does not hide
    run_share: float | None = None  # CPU share the run's processes got (rusage; benchmarks record it)
    rates: dict = field(default_factory=dict)
    cache: _ShapeCache | None = None
    host: dict | None = None  # host_cost.measure_host_cost of the run's model (None: host work unpriced)
    skew: dict | None = None  # sync_skew.measure_sync_skew at `ranks` (measured when first needed)

    def __post_init__(self):
        from ..cpu_heap import keep_freed_memory

        keep_freed_memory()  # time kernels in the heap regime the trainer runs in (cpu_heap.py)
        if self.cache is None:
            self.cache = _ShapeCache(_cache_path())
        if not self.rates:
            self.rates = dict(measured_rates(self.threads))
            if self.corun_peers:  # a rank of a run streams beside its peers: the bandwidth it gets then
                self.rates["elementwise_bw_alone"] = self.rates["elementwise_bw"]
                self.rates["elementwise_bw"] = corun_bandwidth(self.threads, self.corun_peers)

    @property
    def corun_peers(self) -> int:
        """Other ranks of the run on a core at the same time as this one (the cores run at most
        cores // threads ranks at once)."""
        cores = os.cpu_count() or 1
        return max(0, min(self.ranks, max(1, cores // self.threads)) - 1)

    @property
    def slowdown(self) -> float:
        """Wall seconds per CPU second of one rank while the run's `ranks` x `threads` share the cores with
        the load measured now: the runnable jobs besides this probe are cores / share - 1 (share =
        `measure_share`); the run adds its own ranks to them."""
        cores = os.cpu_count() or 1
        if self.run_share is not None:  # the CPU share the run's own processes got (measured)
            return 1.0 / self.run_share
        others = max(0.0, cores / self.rates["share"] - 1)
        return max(1.0, (others + self.ranks * self.threads) / cores)

    @property
    def comm_slowdown(self) -> float:
        """gloo's collectives run on the same shared cores (packing, socket copies, wake-ups): they stretch
        by the same factor as the kernels."""
        return self.slowdown

    def gemm(self, op: Op, dtype: str) -> float:
        m, n, k, g = op.m, op.n, op.k, op.groups
        if op.kind == "attention":  # eager attention: batched matmuls over B*H (bmm)
            key = f"cpu-s|bmm|{g}|{m}|{n}|{k}|{dtype}|{self.threads}"
            return self.cache.get(key, lambda: _measure_bmm(g, m, n, k, dtype, self.threads))
        key = f"cpu-s|mm|{g}|{m}|{n}|{k}|{dtype}|{self.threads}"
        return self.cache.get(key, lambda: measure_gemm(m, n, k, g, dtype, self.threads))

    def op_time(self, op: Op) -> float:
        r = self.rates
        dtype = "fp32" if op.precision in ("fp32", "fp8", "mxfp8") else op.precision
        if op.kind in ("gemm", "attention"):
            t = self.gemm(op, dtype)
        elif op.kind == "memory" and op.timed:
            t = self.timed_elementwise(op)
        elif op.kind == "memory":
            t = op.bytes / r["elementwise_bw"] + op.kernels * r["dispatch_s"]
        elif op.kind == "host":  # measured for the run's model (host_cost.py); unknown: unpriced
            phase = op.work_phase
            t = (self.host or {}).get(op.timed if phase == "step" else f"{op.timed}.{phase}", 0.0)
        else:
            raise ValueError(op.kind)
        return t * self.slowdown

    def timed_elementwise(self, op: Op) -> float:
        """An element-wise op timed at its own shape (`Op.timed`), like the GEMMs: the ops whose cost is
        their exp, not their bytes. Eager attention's softmax over [B*H, T, T] costs ~2.7x what its bytes
        at the streaming bandwidth give; SwiGLU's silu(gate) * up over [rows, F] 3-6x (profiled steps,
        docs/planner.md). A recomputed forward (in backward) is timed as the forward it repeats."""
        phase = op.work_phase
        dtype = "bf16" if op.precision == "bf16" else "fp32"
        key = f"cpu-s|{op.timed}|{phase}|{op.groups}|{op.m}|{op.n}|{self.threads}"
        if op.timed == "swiglu":
            key += f"|{dtype}"
            t = self.cache.get(key, lambda: measure_swiglu(op.m, op.n, phase, dtype, self.threads))
        else:
            t = self.cache.get(key, lambda: measure_softmax(op.groups, op.m, op.n, phase, self.threads))
        alone = self.rates.get("elementwise_bw_alone", self.rates["elementwise_bw"])
        return t * alone / self.rates["elementwise_bw"]  # beside peers: slowed as the co-run bandwidth is

    def gloo(self) -> dict:
        """gloo's measured alpha-beta between two processes here (gloo_link.py), cached on disk."""
        from .gloo_link import measure_gloo

        return self.cache.get("gloo|2|collectives", measure_gloo)

    def collective_seconds(self, collective: str, nbytes: float, p: int) -> float | None:
        """One gloo collective over `p` local ranks from its own measured alpha-beta at two ranks; the
        bandwidth term scaled from 2 to p ranks as a ring's share of the bytes ((p-1)/p, 2(p-1)/p for an
        all-reduce), alpha once per ring step (p - 1). None for what was not measured (p2p)."""
        fit = self.gloo().get("collectives", {}).get(collective)
        if fit is None:
            return None
        if p <= 1:
            return 0.0
        share = (lambda q: 2 * (q - 1) / q) if collective == "all_reduce" else (lambda q: (q - 1) / q)
        return fit["alpha"] * (p - 1) + nbytes * share(p) / share(2) / fit["beta"]

    def sync_wait(self, syncs: float, compute_cpu_s: float) -> float:
        """Wall seconds a rank waits per step for its peers at `syncs` collectives with `compute_cpu_s`
        CPU seconds of work spread between them: the measured wait per collective (sync_skew.py) at the
        run's rank count and its mean segment length."""
        if self.ranks <= 1 or syncs <= 0:
            return 0.0
        if self.skew is None:
            self.skew = sync_skew(self.ranks)
        from .sync_skew import wait_per_sync

        return syncs * wait_per_sync(self.skew, compute_cpu_s / syncs)

    def wrapper(self, preset: str, mode: str = "fsdp2", world: int = 1, ep: int = 1) -> dict:
        """A wrapper's host seconds per parameter tensor per step for a preset (wrapper_cost.py: FSDP2 as
        ZeRO-2 or ZeRO-3 over `world` gloo ranks with the experts split over `ep` of them, or the TP plan's
        DTensors), cached on disk."""
        from .wrapper_cost import measure_wrapper_cost

        world, ep = (1, 1) if mode == "tp" else (world, ep)
        key = f"wrapper|{mode}|{world}|ep{ep}|{preset}|{self.threads}"
        return self.cache.get(key, lambda: measure_wrapper_cost(preset, mode=mode, world=world, ep=ep))

    def save(self) -> None:
        self.cache.save()


def measure_softmax(g: int, m: int, n: int, phase: str, threads: int) -> float:
    """CPU seconds of a row softmax over [g, m, n] fp32 (forward), or of its backward (autograd.grad, as
    baddbmm's backward consumes it: no accumulation into a leaf)."""
    import torch

    with _threads(threads):
        x = torch.randn(g, m, n, requires_grad=True)
        grad = torch.randn(g, m, n)
        if phase == "fwd":
            with torch.no_grad():
                return _median_time(lambda: x.softmax(-1), 3)
        y = x.softmax(-1)
        t = _median_time(lambda: torch.autograd.grad(y, x, grad, retain_graph=True), 3)
        return max(0.0, t - _grad_call_s(threads))


def measure_swiglu(m: int, n: int, phase: str, dtype: str, threads: int) -> float:
    """CPU seconds of moeforge's SwiGLU activation, silu(gate) * up over [m, n] (`model.norm.silu_mul`,
    which the dense MLP, the shared and the routed experts run), forward as in training (autograd
    recording) or its backward."""
    import torch

    from ..model.norm import silu_mul

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    with _threads(threads):
        gate = torch.randn(m, n, dtype=dt, requires_grad=True)
        up = torch.randn(m, n, dtype=dt, requires_grad=True)
        if phase == "fwd":
            return _median_time(lambda: silu_mul(gate, up), 3)
        y, grad = silu_mul(gate, up), torch.randn(m, n, dtype=dt)
        t = _median_time(lambda: torch.autograd.grad(y, (gate, up), grad, retain_graph=True), 3)
        return max(0.0, t - _grad_call_s(threads))


@lru_cache(maxsize=None)
def _grad_call_s(threads: int) -> float:
    """The fixed cost of one `torch.autograd.grad` call (starting the engine: ~0.1 ms), which a timed
    backward pays once per call but a training step once per backward, not once per op."""
    import torch

    with _threads(threads):
        x = torch.ones(1, requires_grad=True)
        y = x * 1.0
        one = torch.ones(1)
        return _median_time(lambda: torch.autograd.grad(y, x, one, retain_graph=True), 9)


def _measure_bmm(g: int, m: int, n: int, k: int, dtype: str, threads: int) -> float:
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    with _threads(threads), torch.no_grad():
        a, b = torch.randn(g, m, k, dtype=dt), torch.randn(g, k, n, dtype=dt)
        return _median_time(lambda: torch.bmm(a, b), 3)


_LOCAL: dict = {}


def gpu_device(hw: Hardware):
    """The device model for a catalogue entry; `cpu` is this machine, measured (one process using all
    cores, eager PyTorch), as `--hardware cpu` plans it."""
    if hw.name == "cpu":
        if "cpu" not in _LOCAL:
            _LOCAL["cpu"] = CPUDevice(threads=os.cpu_count() or 1, ranks=1)
        return _LOCAL["cpu"]
    return _gpu_device(hw)


@lru_cache(maxsize=None)
def _gpu_device(hw: Hardware) -> GPUDevice:
    return GPUDevice(hw, FUSED)
