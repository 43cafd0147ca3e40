"""Context parallelism (parallel/context.py): bytes exchanged per attention layer, and activation memory per rank.

1. From shapes, per attention layer and rank, one forward: the compressed-KV all-gather receives
   (C-1) x B x T/C x (kv_lora_rank + rope_dim) numbers; a ring of full per-head K and V would pass
   (C-1) x B x T/C x H x (N + R + V). (Backward moves as much again in both schemes: a reduce-scatter here,
   dK/dV around the ring there.) Printed for the tiny, v2-lite and v3 presets.
2. Measured (gloo, 1 thread per rank, fp32): C ranks train one forward+backward of one sequence of --seq
   tokens of --preset; per rank the bytes the all-gathers received (counted in the autograd function,
   checked against the formula), the activations autograd holds at the end of forward (distinct saved
   storages, parameters excluded) and the peak heap growth over forward+backward (glibc mallinfo2, includes
   the gradient buffers, the same at every C).
3. --budget MIB: the longest sequence one rank trains (forward + backward of one sequence) with its peak
   heap growth within MIB, for each C: lengths double from --start until one does not fit, then bisect to
   --step tokens. Every rank measures; the largest rank's peak counts. (The model's max_position_embeddings
   is raised to the lengths tried; plain RoPE: memory does not depend on the frequencies.)

  python benchmarks/context_parallel.py [--preset tiny --seq 1024 --cps 1 2 4]
  python benchmarks/context_parallel.py --budget 256 [--start 512 --step 256 --cps 1 2 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeforge.config import preset
from moeforge.memory.heap import PeakHeap
from moeforge.model import Transformer
from moeforge.parallel.context import apply_context_parallel


def per_layer_bytes(config, seq: int, cp: int, batch: int = 1, dtype_bytes: int = 2) -> tuple[int, int]:
    """(compressed all-gather, ring of full K/V) bytes one rank receives per attention layer and forward."""
    tokens = batch * seq // cp * (cp - 1)
    H = config.num_attention_heads
    compressed = tokens * (config.kv_lora_rank + config.qk_rope_head_dim)
    full = tokens * H * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return compressed * dtype_bytes, full * dtype_bytes


def shape_table(seq: int, cps) -> None:
    print(f"\nper attention layer, per rank, one forward, bf16, 1 sequence of {seq} tokens")
    print("| preset | C | compressed KV all-gather | ring of full K/V | ratio |")
    print("|---|---|---|---|---|")
    for name in ("tiny", "v2-lite", "v3"):
        config = preset(name)
        for cp in cps:
            if cp == 1:
                continue
            c, f = per_layer_bytes(config, seq, cp)
            print(f"| {name} | {cp} | {c / 2**20:.2f} MiB | {f / 2**20:.2f} MiB | 1/{f / c:.0f} |")


def held_bytes(model, fn) -> tuple[object, int]:
    """fn()'s output and the bytes of distinct storages autograd saved for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def worker(rank, world, args, init_file, path):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset))
    cp = apply_context_parallel(model, dist.group.WORLD) if world > 1 else None
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with PeakHeap() as heap:
        out, held = held_bytes(model, lambda: model(x, shift_labels=y))
        out.loss.backward()
    gathered = cp.pop_gathered_bytes() if cp else 0
    loss = out.loss.detach().clone()
    if world > 1:  # each rank's loss is its share: their mean is the sequence's loss
        dist.all_reduce(loss)
        loss /= world
    if rank == 0:
        torch.save({"held": held, "peak": heap.peak, "gathered": gathered, "loss": loss.item()}, path)
    if world > 1:
        dist.destroy_process_group()


def train_once(model, seq: int, world: int) -> tuple[int, int, float]:
    """(peak heap growth, held activations) over one forward + backward of one sequence of `seq` tokens, the
    largest over the ranks; and the loss."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq + 1), generator=g)
    with PeakHeap() as heap:
        out, held = held_bytes(model, lambda: model(tokens[:, :-1], shift_labels=tokens[:, 1:]))
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    stats = torch.tensor([heap.peak, held], dtype=torch.float64)
    loss = out.loss.detach().clone()
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        dist.all_reduce(loss)
        loss /= world
    return int(stats[0]), int(stats[1]), loss.item()


def budget_worker(rank, world, args, init_file, path):
    """Search the longest sequence whose peak fits args.budget MiB (every rank runs the same search)."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = dataclasses.replace(preset(args.preset), max_position_embeddings=1 << 20)
    model = Transformer(config)
    if world > 1:
        apply_context_parallel(model, dist.group.WORLD)
    budget = args.budget * 2**20
    tried: dict[int, tuple[int, int, float]] = {}

    def fits(seq: int) -> bool:
        tried[seq] = train_once(model, seq, world)
        return tried[seq][0] <= budget

    lo, hi = 0, args.start
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > args.step:
        mid = (lo + hi) // 2 // args.step * args.step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if rank == 0:
        torch.save({"longest": lo, "tried": tried}, path)
    if world > 1:
        dist.destroy_process_group()



def run_at_each_cp(fn, args) -> list[tuple[int, dict]]:
    """(C, fn's saved result) for each C in args.cps: C = 1 in this process, else C spawned gloo ranks."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cps:
            out = os.path.join(tmp, f"cp{cp}.pt")
            if cp == 1:
                fn(0, 1, args, None, out)
            else:
                mp.spawn(fn, args=(cp, args, os.path.join(tmp, f"init{cp}"), out), nprocs=cp, join=True)
            rows.append((cp, torch.load(out)))
    return rows

def budget_table(args) -> None:
    rows = run_at_each_cp(budget_worker, args)
    print(f"longest sequence under {args.budget} MiB peak heap growth per rank: {args.preset}, fp32, 1 sequence, "
          f"forward + backward, 1 thread per rank (lengths tried: from {args.start}, doubling, then bisection to "
          f"{args.step})")
    print("| C | longest sequence | vs C=1 | its peak / rank | its held activations / rank | first length over | its peak |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][1]["longest"]
    for cp, r in rows:
        n, tried = r["longest"], r["tried"]
        over = min(t for t, v in tried.items() if v[0] > args.budget * 2**20)
        peak, held, _ = tried[n] if n else (0, 0, 0.0)
        print(f"| {cp} | {n} | {n / base:.2f} | {peak / 2**20:.1f} MiB | {held / 2**20:.1f} MiB | {over} "
              f"| {tried[over][0] / 2**20:.1f} MiB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shape-seq", type=int, default=131072, help="sequence length of the shape table")
    parser.add_argument("--budget", type=float, help="MiB per rank: find the longest sequence that trains in it")
    parser.add_argument("--start", type=int, default=512, help="--budget: first length tried (doubled)")
    parser.add_argument("--step", type=int, default=256, help="--budget: bisection resolution (a multiple of 2C)")
    args = parser.parse_args()
    if args.budget is not None:
        budget_table(args)
        return 0
    config = preset(args.preset)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    rows = run_at_each_cp(worker, args)
    print(f"measured: {args.preset}, 1 sequence of {args.seq} tokens, fp32, rank 0 of C, forward + backward")
    print("| C | loss | held activations | vs C=1 | peak heap growth | vs C=1 | all-gather bytes / layer (measured) "
          "| formula | ring of full K/V |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0][1]
    for cp, r in rows:
        formula, ring = per_layer_bytes(config, args.seq, cp, dtype_bytes=4)
        measured = r["gathered"] // layers
        assert measured == formula, (measured, formula)
        print(f"| {cp} | {r['loss']:.6f} | {r['held'] / 2**20:.1f} MiB | {r['held'] / base['held']:.2f} "
              f"| {r['peak'] / 2**20:.1f} MiB | {r['peak'] / base['peak']:.2f} | {measured / 2**10:.0f} KiB "
              f"| {formula / 2**10:.0f} KiB | {ring / 2**10:.0f} KiB |")
    shape_table(args.shape_seq, [2, 4, 8])
    return 0


if __name__ == "__main__":
    sys.exit(main())
