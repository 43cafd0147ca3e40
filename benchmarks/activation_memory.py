"""Activation memory vs step time for each activation-checkpointing mode, side by side in one process.

For the `tiny` preset and a deeper variant of it (same widths, more layers): none, full, selective and
auto at 25%, 50% and 75% of the no-checkpointing activation memory. For each mode:
  kept      activation bytes autograd keeps at the end of the forward, measured on the checkpointed
            model (saved tensors + inputs the checkpoints hold; moeforge.memory.ActivationRecorder);
  bound     kept + the largest region rebuilt at once in the backward (the planner's peak bound);
  heap fwd  measured: live heap bytes (glibc mallinfo2) after the forward minus before it: what the
            forward really left allocated (activations, checkpoint inputs, the loss);
  heap peak measured: the most live heap bytes during forward + backward above the level before it
            (sampled after every op; includes parameter gradients and backward temporaries);
  planned   the planner's recompute cost (summed forward time of the regions) / that of `full`, from one
            shared profile;
  step      fastest forward + backward over interleaved rounds (all modes take turns, so a busy
            machine slows them alike; the fastest is the least disturbed); the optimizer is the same for
            every mode and left out;
  overhead  step / step(none) - 1, the price of recomputation.
Goal (issue 7): auto at 50% costs at most half the overhead of full, and every auto plan fits.

    python benchmarks/activation_memory.py                      # tiny and tiny with 12 layers, batch 8 x 256
    python benchmarks/activation_memory.py --layers 8 --rounds 3 --batch-size 4
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from moeforge import hardware
from moeforge.config import preset
from moeforge.errors import ConfigError
from moeforge.memory import ActivationCheckpointing, ActivationRecorder, build_plan, profile_forward
from moeforge.memory.heap import PeakHeap, live_heap_bytes
from moeforge.memory.setup import sample_batch
from moeforge.model import Transformer

MiB = 2**20
MODES = [("none", None), ("full", None), ("selective", None), ("auto", 0.25), ("auto", 0.5), ("auto", 0.75)]


def label(mode, budget):
    return mode if budget is None else f"auto@{budget:.0%}"


def run_config(name, cfg, args, caps, dtype):
    torch.manual_seed(0)
    model = hardware.configure(Transformer(cfg), caps, seq_len=args.seq_len)
    batch = sample_batch(cfg.vocab_size, args.batch_size, args.seq_len, caps.device)

    def autocast():
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def step():
        with autocast():
            out = model(batch[0], shift_labels=batch[1])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    plans, rows = {}, {}
    profile = profile_forward(model, *batch, candidates=True, repeats=args.profile_repeats, autocast=autocast())
    for mode, budget in MODES:
        try:
            plans[label(mode, budget)] = build_plan(model, mode, budget, batch, profile=profile)
        except ConfigError as e:
            print(f"{name} {label(mode, budget)}: {e}")
    for key, plan in plans.items():
        ac = ActivationCheckpointing(model, plan.names)
        with ActivationRecorder(model) as rec, autocast():
            out = model(batch[0], shift_labels=batch[1])
        kept = rec.profile().total_bytes
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        del out
        heap, after_fwd = [], []
        for _ in range(2):  # the first pass also warms the allocator up
            with PeakHeap() as ph:
                with autocast():
                    out = model(batch[0], shift_labels=batch[1])
                after_fwd.append(live_heap_bytes() - ph.base)
                out.loss.backward()
                del out
            model.zero_grad(set_to_none=True)
            heap.append(ph.peak)
        ac.remove()
        rows[key] = {"kept": kept, "peak": kept + plan.transient_bytes, "heap": min(heap), "fwd": min(after_fwd),
                     "times": [], "plan": plan}
    for r in range(args.rounds + 1):  # round 0 warms up
        for key, row in rows.items():
            ac = ActivationCheckpointing(model, row["plan"].names)
            t0 = time.perf_counter()
            step()
            if r:
                row["times"].append(time.perf_counter() - t0)
            ac.remove()
    base = rows["none"]
    t_none = min(base["times"])
    print(f"\n{name}: {cfg.num_hidden_layers} layers (+{cfg.num_nextn_predict_layers} MTP), batch {args.batch_size} x "
          f"{args.seq_len}, {'bf16 autocast' if dtype else 'fp32'}, {args.rounds} rounds")
    print(f"{'mode':<12}{'regions':>8}{'kept MiB':>10}{'bound MiB':>10}{'bound/none':>11}{'budget MiB':>11}{'fits':>6}"
          f"{'heap fwd':>9}{'heap peak':>10}{'/none':>7}{'planned':>8}{'step s':>8}{'overhead':>10}")
    overhead = {}
    for key, row in rows.items():
        plan = row["plan"]
        t = min(row["times"])
        overhead[key] = t / t_none - 1
        budget = plan.budget_bytes
        fits = "" if budget is None else ("yes" if row["peak"] <= budget else "NO")
        print(f"{key:<12}{len(plan.names):>8}{row['kept'] / MiB:>10.1f}{row['peak'] / MiB:>10.1f}"
              f"{row['peak'] / base['peak']:>11.2f}{(budget or 0) / MiB:>11.1f}{fits:>6}{row['fwd'] / MiB:>9.1f}{row['heap'] / MiB:>10.1f}"
              f"{row['heap'] / base['heap']:>7.2f}{plan.recompute_s / rows['full']['plan'].recompute_s:>8.2f}"
              f"{t:>8.3f}{overhead[key]:>+10.1%}")
    if "auto@50%" in overhead and overhead["full"] > 0:
        print(f"auto@50% overhead / full overhead = {overhead['auto@50%'] / overhead['full']:.2f} (goal <= 0.5)")
    for key in ("auto@25%", "auto@50%", "auto@75%"):
        if key in rows:
            print(f"  {key}: {', '.join(rows[key]['plan'].names)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12, help="layers of the deeper config")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile-repeats", type=int, default=3, help="forwards timed per plan (fastest kept)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--only", choices=["tiny", "deep"], default=None)
    args = ap.parse_args()
    caps = hardware.probe("cpu")
    dtype = hardware.autocast_dtype(args.precision, caps)
    tiny = preset("tiny")
    configs = {"tiny": tiny, "deep": dataclasses.replace(tiny, num_hidden_layers=args.layers)}
    for name, cfg in configs.items():
        if args.only in (None, name):
            run_config(name if name == "tiny" else f"tiny x {args.layers} layers", cfg, args, caps, dtype)


if __name__ == "__main__":
    main()
