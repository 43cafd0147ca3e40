"""How long ranks of a local run wait for each other at a collective: measured with real gloo processes.

Why: a synchronous collective ends when its last rank arrives. Ranks doing the same work still arrive
apart: on this VM the same segment of kernels takes a different time on each core (other jobs, the
hypervisor, cache and frequency effects), and with more ranks than cores the scheduler runs them in turns.
Each collective therefore costs the early ranks a wait on top of its own transfer time. Traced runs showed
it: 1-5 ms of blocked time per collective at two ranks, 5-7 ms at four on two cores, against 0.3-1.6 ms for
the collective alone (docs/planner.md). Which rank is slow changes from run to run, so the planner
prices the mean over ranks.

The probe: `ranks` gloo processes of one thread each run identical segments of step-like work (a small
GEMM and an element-wise pass, repeated to a CPU-time length calibrated once and shared by all ranks),
each followed by an 8-byte all-reduce. Per iteration a rank's blocked time is its wall time minus its
CPU time and its run-queue delay (step_clock.py); the wait at a collective is the mean over ranks and
iterations, minus the same loop's with no work (the collective's own cost, priced separately). Measured
for a ladder of segment lengths; `wait_per_sync` interpolates. A component measured on its own: nothing
here is fitted to the runs it helps predict.
"""

from __future__ import annotations

import statistics
import time

from ..cpu_heap import keep_freed_memory

LENGTHS_S = (0.0, 0.002, 0.005, 0.01, 0.02, 0.04)
WORK_PER_LENGTH_S = 0.4  # CPU seconds of segments per length and rank (at least MIN_ITERS iterations)
MIN_ITERS, WARMUP_ITERS = 10, 3


def _segment(reps: int, a, b, x):
    import torch

    for _ in range(reps):
        torch.mm(a, b)
        x = torch.relu(x * 1.0001 + 0.5)
    return x


def _worker(rank: int, world: int, port: int, queue, work_s: float) -> None:
    import torch
    import torch.distributed as dist

    from ..step_clock import run_queue_delay_s

    torch.set_num_threads(1)
    keep_freed_memory()  # the trainer's heap regime (cpu_heap.py)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, b, x = torch.randn(128, 256), torch.randn(256, 256), torch.randn(64 * 1024)
        _segment(20, a, b, x)
        c0 = time.thread_time()
        _segment(200, a, b, x)
        per = torch.tensor([(time.thread_time() - c0) / 200])
        dist.all_reduce(per, op=dist.ReduceOp.MAX)  # every rank runs the same number of repetitions
        flag = torch.zeros(2)
        blocked = {}
        for length in LENGTHS_S:
            reps = int(round(length / float(per)))
            iters = max(MIN_ITERS, int(work_s / max(length, 0.01)))
            waits = []
            for i in range(WARMUP_ITERS + iters):
                w0, c0, q0 = time.perf_counter(), time.thread_time(), run_queue_delay_s()
                _segment(reps, a, b, x)
                dist.all_reduce(flag)
                wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
                q1 = run_queue_delay_s()
                runq = q1 - q0 if q0 is not None and q1 is not None else 0.0
                if i >= WARMUP_ITERS:
                    waits.append(max(0.0, wall - cpu - runq))
            blocked[length] = statistics.mean(waits)
        queue.put((rank, blocked))
    finally:
        dist.destroy_process_group()


def measure_sync_skew(ranks: int, work_s: float = WORK_PER_LENGTH_S, timeout: float = 300.0) -> dict:
    """{'lengths_s': segment CPU seconds, 'wait_s': mean wait per collective beyond the collective's own
    cost at each, 'alone_s': the collective's own blocked time} for `ranks` one-thread gloo processes."""
    from .gloo_link import run_ranks

    results = dict(run_ranks(_worker, ranks, (work_s,), replies=ranks, timeout=timeout))
    mean = {length: statistics.mean(results[r][length] for r in results) for length in LENGTHS_S}
    alone = mean[0.0]
    lengths = [length for length in LENGTHS_S if length > 0]
    return {"lengths_s": lengths, "wait_s": [max(0.0, mean[length] - alone) for length in lengths], "alone_s": alone}


def wait_per_sync(skew: dict, segment_s: float) -> float:
    """The measured wait at one collective after `segment_s` CPU seconds of work: linear between the
    measured lengths, from 0 at no work, held at the longest length's beyond it."""
    xs, ys = [0.0, *skew["lengths_s"]], [0.0, *skew["wait_s"]]
    if segment_s >= xs[-1]:
        return ys[-1]
    x0, x1, y0, y1 = next(seg for seg in zip(xs, xs[1:], ys, ys[1:]) if segment_s <= seg[1])
    return y0 + (y1 - y0) * (segment_s - x0) / (x1 - x0)
