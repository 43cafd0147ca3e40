"""The host cost of FSDP2 on this machine, per parameter tensor per step, measured as a component.

Why: a distributed step's CPU time measured here exceeds the op list's by 0.1-0.2 s for the debug
preset (docs/planner.md). Part of that is not the model's arithmetic but the wrapper's: FSDP2's
pre-forward and post-backward hooks, its all-gather / reduce-scatter copies into flat buffers, and
DTensor dispatch in clipping and the optimizer, once per parameter tensor. That is measured here with
nothing fitted to a run: the same model built twice in a one-rank gloo group (in a spawned process, so
the caller's process stays free of a process group), plain and fully_shard-ed per block as moeforge
does it, the same steps timed side by side (CPU seconds, alternating, median), the difference divided
by the parameter tensors. One rank: collectives copy but send nothing (their bytes are priced by the
gloo link).
"""

from __future__ import annotations

import os
import time

STEPS = 6


def _worker(queue, preset: str, seq: int, batch: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from torch.distributed.fsdp import fully_shard

        from ..config import TrainConfig
        from ..config import preset as model_preset
        from ..model import Transformer
        from ..train import make_optimizer

        def build(shard: bool):
            torch.manual_seed(0)
            m = Transformer(model_preset(preset))
            if shard:
                for b in list(m.layers) + [x.block for x in m.mtp]:
                    fully_shard(b, reshard_after_forward=False)
                fully_shard(m, reshard_after_forward=False)
            return m, make_optimizer(m, TrainConfig())

        x = torch.randint(0, m_vocab(preset), (batch, seq + 1))
        models = {False: build(False), True: build(True)}
        times = {False: [], True: []}
        for i in range(STEPS + 1):
            for shard, (m, opt) in models.items():
                c0 = time.process_time()
                m(x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step builds lazy state
                    times[shard].append(time.process_time() - c0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        tensors = sum(1 for _ in models[False][0].parameters())
        queue.put({"per_tensor_s": max(0.0, med[True] - med[False]) / tensors, "tensors": tensors,
                   "plain_s": med[False], "sharded_s": med[True]})
    finally:
        dist.destroy_process_group()


def m_vocab(preset: str) -> int:
    from ..config import preset as model_preset

    return model_preset(preset).vocab_size


def measure_wrapper_cost(preset: str = "debug", seq: int = 64, batch: int = 4, timeout: float = 300.0) -> dict:
    """{'per_tensor_s', 'tensors', 'plain_s', 'sharded_s'}: FSDP2's CPU seconds per parameter tensor per step."""
    import torch.multiprocessing as mp

    from .gloo_link import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, preset, seq, batch, _free_port()), daemon=True)
    proc.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
