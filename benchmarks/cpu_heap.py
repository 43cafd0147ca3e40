"""A CPU training step with glibc malloc as it comes against malloc keeping freed memory (cpu_heap.py).

Two child processes, each holding one `Trainer` (same preset, seed and batches), one with
MOEFORGE_KEEP_FREED_MEMORY=0 and one without; they take turns, one step at a time, so that a shared,
noisy machine slows both alike and they never run at once. Per variant: the training thread's CPU
seconds and minor page faults per step (median over the timed steps) and RSS; then the ratio.

    python benchmarks/cpu_heap.py                          # debug preset, 8 x 256 tokens, 12 steps each
    python benchmarks/cpu_heap.py --preset tiny --batch 16 --steps 8

Results: docs/training.md ("Page faults").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time

VARIANTS = {"glibc default": "0", "keep freed memory": "1"}


def _child(conn, preset: str, batch: int, seq: int) -> None:
    import torch
    from rich.console import Console

    from moeforge.config import resolve_run_config
    from moeforge.step_clock import minor_faults
    from moeforge.train import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = resolve_run_config({}, dict(preset=preset, batch_size=batch, seq_len=seq, device="cpu",
                                          precision="fp32", max_corpus_mb=0.5, run_dir=tmp))
        trainer = Trainer(run, run_dir=tmp, console=Console(quiet=True))
        conn.send("ready")
        while conn.recv() == "step":
            f0, c0 = minor_faults(), time.thread_time()
            trainer.train_step()
            trainer.step += 1
            conn.send((time.thread_time() - c0, minor_faults() - f0,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 3 warm-up steps)")
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1:
        ap.error("--steps and --batch must be at least 1")
    ctx = mp.get_context("spawn")
    children = {}
    for name, keep in VARIANTS.items():
        os.environ["MOEFORGE_KEEP_FREED_MEMORY"] = keep  # read by the child's Trainer
        os.environ["OMP_NUM_THREADS"] = "1"
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, args.preset, args.batch, args.seq), daemon=True)
        proc.start()
        children[name] = (proc, parent)
    for _, conn in children.values():
        assert conn.recv() == "ready"
    samples = {name: [] for name in VARIANTS}
    for i in range(3 + args.steps):
        for name, (_, conn) in children.items():  # one step each, in turn
            conn.send("step")
            got = conn.recv()
            if i >= 3:
                samples[name].append(got)
        if sys.stderr.isatty():
            print(f"\rstep {i + 1}/{3 + args.steps}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for proc, conn in children.values():
        conn.send("stop")
        proc.join(30)
    print(f"{args.preset}, {args.batch} x {args.seq} tokens, fp32, one thread, {args.steps} steps each, interleaved")
    cpu = {}
    for name, rows in samples.items():
        cpu[name] = statistics.median(r[0] for r in rows)
        faults = statistics.median(r[1] for r in rows)
        spread = max(r[0] for r in rows) / min(r[0] for r in rows)
        print(f"  {name:18s} CPU {cpu[name]:.3f} s/step (max/min {spread:.2f}), {faults:,.0f} minor faults/step, "
              f"max RSS {rows[-1][2]:.0f} MiB")
    base, keep = cpu["glibc default"], cpu["keep freed memory"]
    print(f"keep freed memory / glibc default: {keep / base:.2f}x CPU seconds per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
