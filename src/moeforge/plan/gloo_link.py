"""gloo on this machine as an alpha-beta link: measured with two real gloo processes over loopback TCP.

Why: moeforge's multi-process CPU runs talk through gloo, and gloo is not a raw socket. A socket pair
in one process measured 4 us latency here; a gloo send/recv between two processes costs ~80-100 us
(its TCP pairs, the tensor's (un)packing, two process wake-ups). The step-time model needs gloo's
own alpha and beta, so they are measured as a component: half a send/recv round trip for a few sizes,
the fastest of a dozen repetitions (the uncontended cost; contention with other jobs is accounted
separately, as the CPU share the run got), alpha = the 8-byte time, beta = the median over the larger
sizes of bytes / (time - alpha) (on a busy machine one size's dozen repetitions can all be slow).
An all-reduce at two ranks is timed alongside, to check the ring formula the planner applies to it
(`benchmarks/planner_validation.py --gloo` prints both). That check failed: gloo's collectives cost 3-10x
what the ring formula gives from its send/recv (16 MB at two ranks: all-reduce 21.8 ms against 4.8,
reduce-scatter 25.8 against 2.4, all-gather 18.4 against 2.4; they reduce and copy on the CPU). So the
collectives are measured as components of their own too (`_time_collectives`, an alpha-beta per
collective), and the planner prices a local run's collectives with them (`CPUDevice.collective_seconds`).
Cached with the GEMM timings (device.py).
"""

from __future__ import annotations

import socket
import time

from ..cpu_heap import keep_freed_memory

SIZES = (8, 65536, 1 << 20, 4 << 20)
REPEATS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    keep_freed_memory()  # the trainer's heap regime (cpu_heap.py)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    try:
        for nbytes in SIZES:
            t = torch.zeros(max(1, nbytes // 4))
            p2p, ar = [], []
            for _ in range(REPEATS):
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(t, 1)
                    dist.recv(t, 1)
                else:
                    dist.recv(t, 0)
                    dist.send(t, 0)
                p2p.append((time.perf_counter() - t0) / 2)
            for _ in range(REPEATS):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                ar.append(time.perf_counter() - t0)
            out[nbytes] = (min(p2p), min(ar))
        out["collectives"] = _time_collectives(dist)
    finally:
        if rank == 0:
            queue.put(out)
        dist.destroy_process_group()


COLLECTIVE_SIZES = (8, 1 << 20, 4 << 20, 16 << 20)
COLLECTIVE_REPEATS = 8


def _time_collectives(dist) -> dict:
    """{collective: {bytes: median seconds}} at two ranks: bytes = the all-reduce's tensor, the
    reduce-scatter's input, the all-gather's output, the all-to-all's per-rank payload (as the planner's
    ops count them). The median, not the fastest: on this VM a gloo collective's repetitions spread
    1.5x even on a quiet machine, and a step pays the typical one."""
    import torch

    # torch 2.13 renamed these (*_single); older torch has only the *_tensor names
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out: dict = {}
    for nbytes in COLLECTIVE_SIZES:
        n = max(2, nbytes // 4) // 2 * 2
        full, half, other = torch.zeros(n), torch.zeros(n // 2), torch.zeros(n)
        calls = {"all_reduce": lambda: dist.all_reduce(full),
                 "reduce_scatter": lambda: reduce_scatter(half, full),
                 "all_gather": lambda: all_gather(full, half),
                 "all_to_all": lambda: dist.all_to_all_single(other, full)}
        for name, call in calls.items():
            call()
            times = []
            for _ in range(COLLECTIVE_REPEATS):
                dist.barrier()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            times.sort()
            out.setdefault(name, {})[str(nbytes)] = times[len(times) // 2]
    return out


def collective_fit(times: dict) -> dict:
    """{bytes: s} of one collective -> {'alpha': the smallest time (the 8-byte one), 'beta': median of
    bytes / (t - alpha) over the sizes whose time exceeds alpha}.

    The smallest time, not the 8-byte one as such: a larger message cannot cost less than the latency.
    Seen 2026-12-07: an all-to-all's 8-byte median came out at 3.7 ms against 0.7 ms at 1 MB (a stall of
    that probe), and alpha = 3.7 ms left no size above it, a bandwidth of 1e15 B/s and an EP 4 step
    priced 0.29 s of exposed all-to-all (0.05 s from the neighbouring prints)."""
    sizes = sorted(int(k) for k in times)
    alpha = min(times.values())
    rates = sorted(n / (times[str(n)] - alpha) for n in sizes[1:] if times[str(n)] > alpha)
    if not rates:  # every size took the same time: nothing to tell the bandwidth by
        raise ValueError(f"gloo collective times do not grow with the message size: {times}")
    return {"alpha": alpha, "beta": rates[len(rates) // 2]}


def run_ranks(target, world: int, args: tuple = (), replies: int = 1, timeout: float = 180.0) -> list:
    """Spawn `world` processes running target(rank, world, port, queue, *args) (each its own gloo rank on
    a free local port); the first `replies` items they put on the queue. Spawned, so the caller's process
    stays free of a process group; stragglers are terminated."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue, *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return [queue.get(timeout=timeout) for _ in range(replies)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def measure_gloo(timeout: float = 180.0) -> dict:
    """{'gloo_latency_s', 'gloo_bw', 'p2p': {bytes: s}, 'all_reduce2': {bytes: s}, 'collectives': {name:
    {'times': {bytes: s}, 'alpha', 'beta'}}} from two gloo processes."""
    (res,) = run_ranks(_worker, 2, timeout=timeout)
    collectives = res.pop("collectives")
    small = res[SIZES[0]][0]
    rates = sorted(n / max(res[n][0] - small, 1e-9) for n in SIZES[1:])
    bw = rates[len(rates) // 2]  # the median size's: one slow repetition set on a busy machine moves it least
    return {"gloo_latency_s": small, "gloo_bw": bw, "p2p": {str(k): v[0] for k, v in res.items()},
            "all_reduce2": {str(k): v[1] for k, v in res.items()},
            "collectives": {name: {"times": t, **collective_fit(t)} for name, t in collectives.items()}}
