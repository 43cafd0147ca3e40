"""Predicted vs measured step time of local runs: the planner's validation table (issue 17, item 2).

    python benchmarks/planner_validation.py [--runs DIR] [--only NAME,...] [--steps N]
    python benchmarks/planner_validation.py --cpu-time    # in-process CPU seconds, debug and tiny

Trains each run of RUNS below that DIR does not hold yet (`moeforge train`, gloo processes on this
machine) and predicts it right after (`moeforge plan --against`, every component of the machine measured
then: its speed drifts over hours), then prints the table: predicted and measured median step time,
the error, and the mean absolute error over the table (`--repredict`: price every run again now).
Runs are short (a few optimizer steps); the median skips the first two steps (warm-up). On a shared
machine, rerun and compare side by side.
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
    "debug-dualpipev": ["--preset", "debug", "--nproc", "2", "--pp", "2", "--pp-schedule", "dualpipev"],
    "tiny-1": ["--preset", "tiny"],
    "tiny-ep2": ["--preset", "tiny", "--nproc", "2", "--ep", "2"],
    "tiny-tp2": ["--preset", "tiny", "--nproc", "2", "--tp", "2"],
    "tiny-zero3": ["--preset", "tiny", "--nproc", "2", "--zero", "3"],
    "tiny-ep4": ["--preset", "tiny", "--nproc", "4", "--ep", "4"],
}
COMMON = ["--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0", "--max-corpus-mb", "1",
          "--device", "cpu", "--precision", "fp32"]


def make_run(name: str, out: Path, steps: int) -> bool:
    """Train the run and record the CPU share its processes got (their CPU seconds, from rusage, over
    wall seconds x ranks): the machine is shared, and the wall time of a step is its CPU time over that
    share. Kept in DIR/shares.json; the prediction itself is in CPU seconds (docs/planner.md)."""
    run_dir = out / name
    if (run_dir / "summary.json").exists():
        return False
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
    return True


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


def cpu_time_check(preset: str, steps: int = 3) -> str:
    """In-process, one thread: the CPU seconds of real trainer steps (process_time, after two warm-up
    steps) next to the planner's predicted CPU seconds (share 1): the op model without the load noise."""
    import tempfile

    import torch
    from rich.console import Console

    from moeforge.config import resolve_run_config
    from moeforge.plan import network as net
    from moeforge.plan.against import local_cpu_hardware, run_layout
    from moeforge.plan.device import CPUDevice
    from moeforge.plan.models import from_moe
    from moeforge.plan.steptime import step_time
    from moeforge.train import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = resolve_run_config({}, dict(preset=preset, batch_size=16, seq_len=256, device="cpu", precision="fp32",
                                          max_corpus_mb=0.5, run_dir=tmp))
        trainer = Trainer(run, run_dir=tmp, console=Console(quiet=True))
        cpu, wall = [], []
        for i in range(steps + 2):
            c0, w0 = time.process_time(), time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            if i >= 2:
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
    lo, s = run_layout(run, 1)
    dev = CPUDevice(threads=1, ranks=1, run_share=1.0)
    link = net.Link(dev.rates["socket_bw"], dev.rates["socket_latency_s"])
    st = step_time(from_moe(run.model, preset), local_cpu_hardware(dev), net.Topology("nvswitch", 1, 1, link, link),
                   lo, s, device=dev)
    measured = statistics.median(cpu)
    return (f"{preset} 16 x 256 fp32, 1 thread: predicted {st.total:.3f} CPU s/step, measured {measured:.3f} "
            f"(steps {', '.join(f'{c:.3f}' for c in cpu)}; wall {statistics.median(wall):.3f} s) -> "
            f"{100 * (st.total / measured - 1):+.0f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/planner-validation", help="folder of the runs (made if missing)")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--make-only", action="store_true", help="train the missing runs, print nothing else")
    ap.add_argument("--shared-cache", action="store_true",
                    help="price with the GEMM timings in ~/.cache/moeforge (default: measured beside each run)")
    ap.add_argument("--repredict", action="store_true",
                    help="price every run again now (default: the prediction made right after its training)")
    ap.add_argument("--gloo", action="store_true", help="instead: gloo's measured alpha-beta (two processes)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="instead: predicted vs measured CPU seconds of in-process debug and tiny steps")
    args = ap.parse_args()
    if args.gloo:
        from moeforge.plan.gloo_link import measure_gloo

        g = measure_gloo()
        print(f"gloo send/recv: alpha {g['gloo_latency_s'] * 1e6:.0f} us, beta {g['gloo_bw'] / 1e9:.2f} GB/s")
        for size, t in g["p2p"].items():
            ring = 2 * g["gloo_latency_s"] + int(size) / g["gloo_bw"]  # ring all-reduce at p = 2
            print(f"  {int(size):>8} B: send/recv {t * 1e6:.0f} us; all-reduce 2 ranks measured "
                  f"{g['all_reduce2'][size] * 1e6:.0f} us, ring formula {ring * 1e6:.0f} us")
        print("collectives at 2 ranks (median), what the planner prices local runs with:")
        for name, fit in g["collectives"].items():
            times = ", ".join(f"{int(n) >> 20} MB {t * 1e3:.2f} ms" if int(n) >= 2 ** 20 else f"{n} B {t * 1e3:.2f} ms"
                              for n, t in fit["times"].items())
            print(f"  {name:15s} alpha {fit['alpha'] * 1e6:.0f} us, beta {fit['beta'] / 1e9:.2f} GB/s ({times})")
        return 0
    if args.cpu_time:
        for preset in ("debug", "tiny"):
            print(cpu_time_check(preset), flush=True)
        return 0
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    out = Path(args.runs)
    predicted = {}
    for name in names:
        trained = make_run(name, out, args.steps)
        if trained and not args.make_only and (out / name / "summary.json").exists():
            predicted[name] = predict_now(out / name, args.shared_cache)
        elif (out / name / PREDICTION).is_file() and not args.repredict:
            predicted[name] = json.loads((out / name / PREDICTION).read_text())
    if args.make_only:
        return 0
    from moeforge.plan.against import validation_table

    if not args.shared_cache:  # runs priced now (--repredict, or predicted before this benchmark kept them)
        os.environ["XDG_CACHE_HOME"] = str(out / ".cache")
    # Each run's CPU share comes from its own step clock (cpu_s, runq_s in metrics.jsonl); shares.json
    # (rusage over wall x ranks, which counts blocked time as denied CPU) is kept for comparison only.
    print(validation_table([out / n for n in names if (out / n / "summary.json").exists()], threads=1,
                           predicted=predicted))
    return 0


PREDICTION = "prediction.json"


def predict_now(run_dir: Path, shared_cache: bool) -> dict:
    """`plan --against` for a run just trained, with every component of this machine measured now (GEMMs at
    its shapes in a cache of its own, bandwidth, co-run bandwidth, the wait at a collective): this VM's
    speed drifts by up to 1.8x over hours (the same debug step took 0.37 and 0.67 CPU seconds, 7 hours
    apart), so a run is predicted from components measured minutes after it, not in another session.
    Kept in RUN_DIR/prediction.json; `--repredict` prices all runs again now."""
    from moeforge.plan import device
    from moeforge.plan.against import compare

    for cached in (device.measured_rates, device.corun_bandwidth, device.sync_skew):
        cached.cache_clear()
    if not shared_cache:
        os.environ["XDG_CACHE_HOME"] = str(run_dir / ".cache")
    r = compare(run_dir, threads=1)
    (run_dir / PREDICTION).write_text(json.dumps(r, default=str))
    print(f"  {run_dir.name}: predicted {r['predicted_s']:.3f} s, measured {r['measured_s']:.3f} s "
          f"({100 * r['error']:+.0f}%)", flush=True)
    return r


if __name__ == "__main__":
    sys.exit(main())
