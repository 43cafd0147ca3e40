"""The host cost of moeforge's distributed wrappers on this machine (FSDP2, expert parallelism, the TP
plan's DTensors), per parameter tensor per step, measured as a component.

Why: a distributed step's CPU time measured here exceeds the op list's by 0.1-0.2 s for the debug
preset (docs/planner.md). Part of that is not the model's arithmetic but the wrapper's: FSDP2's
pre-forward and post-backward hooks, its all-gather / reduce-scatter copies into flat buffers, DTensor
dispatch in clipping and the optimizer, once per parameter tensor, and EP's exchange of split sizes,
permutations and all-to-all calls. That is measured here with nothing fitted to a run: the same model
built twice on each of `world` spawned gloo ranks, plain and wrapped as the trainer wraps it
(`parallel.parallelize` with the run's dp, ep and ZeRO stage: the same FSDP2 units, EP's expert shards),
the same steps timed side by side (the training thread's CPU seconds, alternating, median), rank 0's
difference divided by the parameter tensors. Each run is priced with its own wrapper (`MODES`): FSDP2
keeping the gathered weights (ZeRO-2) or resharding them after forward (ZeRO-3: gathered again in
backward), over the run's dp ranks with the routed experts split over its ep ranks (the reduce-scatters,
gathers and EP's exchanges run through gloo; their blocked time is priced by the gloo link, not here), or
moeforge's TP plan (`parallel.tensor.apply_tensor_parallel`) over a one-rank mesh, whose DTensor dispatch
and hooks cost the same host work as over two (a real split would change the arithmetic). Measured
2026-12-07 (debug, two ranks): FSDP2 41-44 ms a step, with EP 2 52-56 ms, the same at 4 x 64 and at
8 x 256 tokens (the wrappers' cost does not grow with the tokens).
"""

from __future__ import annotations

import os
import time

from ..cpu_heap import keep_freed_memory

STEPS = 6
MODES = ("fsdp2", "zero3", "tp")  # FSDP2 keeping / resharding weights after forward; the TP plan


def wrapped_layout(mode: str, world: int, ep: int = 1):
    """The `parallel.ParallelLayout` FSDP2's modes wrap the model in over `world` data-parallel ranks, as
    `moeforge train` does; `ep` of them split the routed experts (expert parallelism)."""
    from ..parallel import ParallelLayout

    return ParallelLayout(dp=world, ep=ep, zero=3 if mode == "zero3" else 2)


def _worker(rank: int, world: int, port: int, queue, preset: str, seq: int, batch: int, mode: str,
            ep: int = 1) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    keep_freed_memory()  # the trainer's heap regime (cpu_heap.py)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from ..config import TrainConfig
        from ..config import preset as model_preset
        from ..model import Transformer
        from ..parallel import build_mesh, clip_grad_norm, parallelize
        from ..parallel.tensor import split_param_groups
        from ..train import make_optimizer

        def build(shard: bool):
            torch.manual_seed(0)
            m = Transformer(model_preset(preset))
            if shard and mode == "tp":  # moeforge's TP plan over a one-rank mesh: DTensor's dispatch
                from torch.distributed.device_mesh import init_device_mesh

                from ..parallel.tensor import apply_tensor_parallel

                apply_tensor_parallel(m, init_device_mesh("cpu", (1,)))
                opt = make_optimizer(m, TrainConfig())  # DTensor and plain parameters apart, as the trainer
                return m, type(opt)(split_param_groups(opt.param_groups)), clip_grad_norm
            if shard:  # the trainer's own wrapping (parallel.parallelize): FSDP2 units, EP's expert shards
                layout = wrapped_layout(mode, world, ep)
                parallelize(m, layout, build_mesh(layout))
                return m, make_optimizer(m, TrainConfig()), clip_grad_norm  # the distributed trainer's clip
            return m, make_optimizer(m, TrainConfig()), torch.nn.utils.clip_grad_norm_

        x = torch.randint(0, m_vocab(preset), (batch, seq + 1))
        models = {False: build(False), True: build(True)}
        times = {False: [], True: []}
        for i in range(STEPS + 1):
            for shard, (m, opt, clip) in models.items():
                c0 = time.thread_time()  # the training thread's CPU, as the trainer's cpu_s (not gloo's threads)
                m(x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
                clip(list(m.parameters()), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step builds lazy state
                    times[shard].append(time.thread_time() - c0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        tensors = sum(1 for _ in models[False][0].parameters())
        if rank == 0:
            queue.put({"per_tensor_s": max(0.0, med[True] - med[False]) / tensors, "tensors": tensors,
                       "plain_s": med[False], "sharded_s": med[True], "world": world})
    finally:
        dist.destroy_process_group()


def m_vocab(preset: str) -> int:
    from ..config import preset as model_preset

    return model_preset(preset).vocab_size


def measure_wrapper_cost(preset: str = "debug", seq: int = 64, batch: int = 4, timeout: float = 300.0,
                         mode: str = "fsdp2", world: int = 1, ep: int = 1) -> dict:
    """{'per_tensor_s', 'tensors', 'plain_s', 'sharded_s', 'world'}: the wrapper's CPU seconds (the
    training thread's) per parameter tensor per step on rank 0 of `world` gloo processes; `mode` (MODES):
    FSDP2 as ZeRO-2 or ZeRO-3 with the routed experts split over `ep` of the ranks (expert parallelism;
    over `world` ranks: the reduce-scatters, gathers and EP's exchanges run through gloo as in the run),
    or moeforge's TP plan (one rank: a real split would change the arithmetic)."""
    if mode not in MODES:
        raise ValueError(f"wrapper mode {mode!r} is not one of {', '.join(MODES)}")
    from .gloo_link import run_ranks

    world = 1 if mode == "tp" else max(1, world)
    ep = 1 if mode == "tp" else ep
    if world % ep:
        raise ValueError(f"ep={ep} does not divide the {world} ranks")
    (result,) = run_ranks(_worker, world, (preset, seq, batch, mode, ep), timeout=timeout)
    return result
