"""Predicted vs measured step time of local runs: the planner's validation table (issue 17, item 2).

    python benchmarks/planner_validation.py [--runs DIR] [--only NAME,...] [--steps N]

Trains each run of RUNS below that DIR does not hold yet (`moeforge train`, gloo processes on this
machine), then prints `moeforge plan --against` for each: predicted and measured median step time,
the error, and the mean absolute error over the table. Runs are short (a few optimizer steps); the
median skips the first two steps (warm-up). On a shared machine, rerun and compare side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import resource
import time
from pathlib import Path

# name -> moeforge train flags (besides the common ones below)
RUNS = {
    "debug-1": ["--preset", "debug"],
    "debug-dp2": ["--preset", "debug", "--nproc", "2"],
    "debug-ep2": ["--preset", "debug", "--nproc", "2", "--ep", "2"],
    "debug-tp2": ["--preset", "debug", "--nproc", "2", "--tp", "2"],
    "debug-zero3": ["--preset", "debug", "--nproc", "2", "--zero", "3"],
    "debug-pp2": ["--preset", "debug", "--nproc", "2", "--pp", "2"],
    "debug-ep4": ["--preset", "debug", "--nproc", "4", "--ep", "4"],
    "debug-pp2dp2": ["--preset", "debug", "--nproc", "4", "--pp", "2"],
    "tiny-1": ["--preset", "tiny"],
    "tiny-ep2": ["--preset", "tiny", "--nproc", "2", "--ep", "2"],
    "tiny-tp2": ["--preset", "tiny", "--nproc", "2", "--tp", "2"],
    "tiny-zero3": ["--preset", "tiny", "--nproc", "2", "--zero", "3"],
    "tiny-ep4": ["--preset", "tiny", "--nproc", "4", "--ep", "4"],
}
COMMON = ["--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0", "--max-corpus-mb", "1",
          "--device", "cpu", "--precision", "fp32"]


def make_run(name: str, out: Path, steps: int) -> None:
    """Train the run and record the CPU share its processes got (their CPU seconds, from rusage, over
    wall seconds x ranks): the machine is shared, and the wall time of a step is its CPU time over that
    share. Kept in DIR/shares.json; the prediction itself is in CPU seconds (docs/planner.md)."""
    run_dir = out / name
    if (run_dir / "summary.json").exists():
        return
    ranks = int(RUNS[name][RUNS[name].index("--nproc") + 1]) if "--nproc" in RUNS[name] else 1
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    _train(name, run_dir, steps)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    path = out / "shares.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table[name] = min(1.0, cpu / (wall * ranks))
    path.write_text(json.dumps(table, indent=1))


def _train(name: str, run_dir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "moeforge", "train", *RUNS[name], *COMMON, "--steps", str(steps),
           "--run-dir", str(run_dir)]
    print("$", " ".join(cmd[1:]), flush=True)
    # One thread per process: the machine is shared, and OpenMP teams spin-waiting on oversubscribed cores
    # make multi-threaded steps erratic (measured 9-28 s for a 1 s step). --nproc runs get 1 thread each anyway.
    for attempt in (1, 2):  # a shared machine: a run can fail for reasons of its own (retry once)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode == 0:
            return
        print(f"  {name}: exit {done.returncode} (attempt {attempt})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/planner-validation", help="folder of the runs (made if missing)")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--make-only", action="store_true", help="train the missing runs, print nothing else")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    out = Path(args.runs)
    for name in names:
        make_run(name, out, args.steps)
    if args.make_only:
        return 0
    from moeforge.plan.against import validation_table

    shares = json.loads((out / "shares.json").read_text()) if (out / "shares.json").exists() else {}
    print(validation_table([out / n for n in names if (out / n / "summary.json").exists()], threads=1, shares=shares))
    return 0


if __name__ == "__main__":
    sys.exit(main())
