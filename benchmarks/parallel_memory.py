"""Memory per rank and step-time overhead of data parallelism at 2 ranks: DDP, FSDP2 ZeRO-2, ZeRO-3.

Every layout trains the same model on the same global batch (each of the 2 ranks takes half); the
baseline is one process on the whole batch. Each layout runs in fresh processes (gloo; 1 thread per rank,
so 2 ranks use the 2 cores the baseline's 1 thread would leave half idle: the ideal 2-rank step is half
the baseline's). Per rank, measured:

  state     bytes of the tensors a rank keeps across steps: its parameters, gradients and AdamW states
            (the local shards under FSDP), counted from the tensors themselves;
  held      bytes of activations autograd holds between forward and backward (saved tensors, distinct
            storages, parameters excluded, measured at the end of forward: a ZeRO-3 rank has freed its
            gathered weights by then, a ZeRO-2 rank still holds them);
  peak      state + held: the accounting peak (transient workspace not included);
  rss       growth of the process's peak resident set (getrusage) over the first training steps (the
            allocator's and gloo's buffers included; coarse, but not an estimate);
  step      median seconds per optimizer step (forward, backward, communication, AdamW).

  python benchmarks/parallel_memory.py [--preset tiny --batch 8 --seq 128 --steps 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeforge.config import TrainConfig, preset
from moeforge.model import Transformer
from moeforge.train import make_optimizer

LAYOUTS = ("single", "ddp", "zero2", "zero3")


def tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):  # DTensor: this rank's shard
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(tensor_bytes(p) + (tensor_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for st in opt.state.values():
        total += sum(tensor_bytes(v) for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


class HeldActivations:
    """Distinct storages autograd saves during forward, sized when forward ends (parameters excluded)."""

    def __init__(self, model: torch.nn.Module):
        self.exclude = {self._key(p) for p in model.parameters()}
        self.storages: dict[int, torch.UntypedStorage] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        if hasattr(t, "to_local"):
            t = t.to_local()
        return t.untyped_storage().data_ptr()

    def pack(self, t: torch.Tensor):
        if not hasattr(t, "to_local") and t.device.type != "meta":
            key = self._key(t)
            if key not in self.exclude:
                self.storages[key] = t.untyped_storage()
        return t

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def wrap(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    if layout == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if layout in ("zero2", "zero3"):
        from torch.distributed.fsdp import fully_shard

        reshard = layout == "zero3"
        for block in list(model.layers) + [m.block for m in model.mtp]:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    return model


def worker(rank: int, world: int, layout: str, args, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))  # fail, not hang
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = wrap(Transformer(preset(args.preset)), layout)
    opt = make_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, model_config(model).vocab_size, (args.steps + 1, args.batch, args.seq + 1), generator=g)
    per_rank = args.batch // world
    times, held = [], 0
    for step in range(args.steps + 1):
        tokens = data[step, rank * per_rank:(rank + 1) * per_rank]
        t0 = time.perf_counter()
        tracker = HeldActivations(model)
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            loss = model(tokens[:, :-1], shift_labels=tokens[:, 1:]).loss
        held = max(held, tracker.nbytes())
        del tracker
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are part of the peak
        if step:  # step 0 warms up (allocations, gloo connections)
            times.append(time.perf_counter() - t0)
    state = state_bytes(model, opt)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    result = {"state": state, "held": held, "rss": rss, "step": statistics.median(times)}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        result = {k: max(r[k] for r in gathered) for k in result}  # the worst rank
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def model_config(model):
    return (model.module if hasattr(model, "module") else model).config


def run(layout: str, args) -> dict:
    world = 1 if layout == "single" else 2
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.spawn(worker, args=(world, layout, args, os.path.join(d, "init"), out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the ranks")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    n_params = Transformer(cfg).num_parameters()
    print(f"preset {args.preset}: {n_params / 1e6:.1f}M parameters, global batch {args.batch} x {args.seq} tokens, "
          f"fp32, AdamW; 2 ranks (gloo, 1 thread each) vs 1 process (1 thread)")
    results = {}
    for layout in args.layouts.split(","):
        results[layout] = run(layout, args)
    base = results.get("single")
    mb = 2 ** 20
    print(f"\n| layout | state MiB | held MiB | peak MiB | peak vs 1 proc | RSS growth MiB | RSS vs 1 proc "
          f"| step s | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, r in results.items():
        peak = r["state"] + r["held"]
        row = [layout, f"{r['state'] / mb:.1f}", f"{r['held'] / mb:.1f}", f"{peak / mb:.1f}"]
        if base:
            world = 1 if layout == "single" else 2
            base_peak = base["state"] + base["held"]
            # efficiency: ideal 2-rank step time (baseline / 2) over the measured one
            row += [f"{peak / base_peak:.2f}x ({(1 - peak / base_peak) * 100:.0f}% less)",
                    f"{r['rss'] / mb:.0f}", f"{r['rss'] / base['rss']:.2f}x", f"{r['step']:.3f}",
                    f"{base['step'] / world / r['step'] * 100:.0f}%"]
        else:
            row += ["", f"{r['rss'] / mb:.0f}", "", f"{r['step']:.3f}", ""]
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
