"""What a hot expert costs on real expert-parallel ranks, and what redundant experts win back.

Two gloo processes (EP 2) run `DistributedTrainer` steps for each routing (`--routing balanced`, `hot:2`,
`hot:4`), with static placement (plain EP: expert e on rank e // (E / 2)) and with redundant experts
(`--redundant-experts R --rebalance-every K`, re-placed from the measured loads). All six runs share one
process group and alternate in rounds, so they see the same machine load. Per rank and step we record the
wall time and the CPU time of the rank's process (`time.process_time`, one intra-op thread): a rank waiting
for its peers inside gloo sleeps, so CPU time is its compute and wall - CPU its wait. (On an oversubscribed
machine, time spent waiting for a free core also counts as wait.) Steps before the first re-placement are
warm-up and not timed.

  python benchmarks/ep_skew.py [--preset tiny --seq-len 128 --batch-size 8 --redundant 4 --rebalance-every 2
                                --warmup 3 --steps 4 --rounds 2 -m moe_intermediate_size=512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROUTINGS = ("balanced", "hot:2", "hot:4")
# 8 experts top-2 (with 16 over 2 ranks one hot expert barely moves a rank's load: hot:2 is 1.07x the mean
# rank load there), wide enough to dominate a step as in a real MoE; no MTP block, so the rows per rank
# below (main MoE layers) are all the routed rows a rank computes.
DEFAULT_MODEL = ["n_routed_experts=8", "num_experts_per_tok=2", "n_group=1", "topk_group=1",
                 "moe_intermediate_size=512", "num_nextn_predict_layers=0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences), split over the 2 ranks")
    p.add_argument("--redundant", type=int, default=4, help="R: extra expert slots per MoE layer")
    p.add_argument("--rebalance-every", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (>= rebalance-every: placed by then)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-m", dest="model", action="append", default=[], metavar="FIELD=VALUE",
                   help="model overrides (e.g. moe_intermediate_size=512 to make experts dominate)")
    args = p.parse_args(argv)
    args.model = args.model or DEFAULT_MODEL
    if args.warmup < args.rebalance_every:
        p.error("--warmup must be >= --rebalance-every, so the timed steps run on a re-placed layout")
    return args


def run_config(args, routing: str, redundant: int, run_dir: Path):
    from moeforge.cli import parse_overrides
    from moeforge.config import resolve_run_config

    train = dict(preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size, ep=2, routing=routing,
                 steps=args.warmup + args.steps, eval_every=0, sample_tokens=0, precision="fp32", device="cpu",
                 log_expert_counts=True, run_dir=str(run_dir), warmup_steps=1)
    if redundant:
        train.update(redundant_experts=redundant, rebalance_every=args.rebalance_every)
    return resolve_run_config({}, train, parse_overrides(args.model))


def measure(args, routing: str, redundant: int, run_dir: Path) -> dict:
    """Timed steps of one run on this rank: {'wall': [...], 'cpu': [...], 'rows': [...]}."""
    from rich.console import Console

    from moeforge.parallel.trainer import DistributedTrainer

    trainer = DistributedTrainer(run_config(args, routing, redundant, run_dir), console=Console(quiet=True))
    out = {"wall": [], "cpu": [], "rows": []}
    for i in range(args.warmup + args.steps):
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        trainer.step += 1
        if i >= args.warmup:
            out["wall"].append(wall)
            out["cpu"].append(cpu)
            out["rows"].append(m.get("ep_rank_rows") or static_rows(m["expert_counts"]))
    return out


def static_rows(counts: list[list[int]], ep: int = 2) -> list[int]:
    """Rows each rank computes under static placement: its E / ep experts' tokens (global counts)."""
    per = len(counts[0]) // ep
    return [sum(sum(layer[r * per:(r + 1) * per]) for layer in counts) for r in range(ep)]


def worker(rank, args, init_file, tmp, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    mine = {}
    for rnd in range(args.rounds):
        for routing in ROUTINGS:
            for redundant in (0, args.redundant):
                key = (routing, redundant)
                got = measure(args, routing, redundant, Path(tmp) / f"{routing.replace(':', '')}-{redundant}-{rnd}")
                for k, v in got.items():
                    mine.setdefault(key, {}).setdefault(k, []).extend(v)
    everyone = [None, None]
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        results.update({"ranks": everyone})
    dist.destroy_process_group()


def summarise(ranks: list[dict], args) -> list[dict]:
    rows = []
    for routing in ROUTINGS:
        for redundant in (0, args.redundant):
            key = (routing, redundant)
            per = [r[key] for r in ranks]
            step = statistics.median(max(w) for w in zip(*(p["wall"] for p in per)))
            cpu = [statistics.median(p["cpu"]) for p in per]
            wait = [statistics.median(w - c for w, c in zip(p["wall"], p["cpu"])) for p in per]
            rows.append({"routing": routing, "redundant": redundant, "step_s": step, "cpu": cpu, "wait": wait,
                         "rows": per[0]["rows"][-1]})
    return rows


def print_table(rows: list[dict], args) -> None:
    base = next(r["step_s"] for r in rows if r["routing"] == "balanced" and r["redundant"] == 0)
    static = {r["routing"]: r["step_s"] for r in rows if r["redundant"] == 0}
    print(f"EP 2 on gloo, preset {args.preset} {' '.join(args.model)}, global batch {args.batch_size} x "
          f"{args.seq_len}, median of {args.steps * args.rounds} timed steps; R = {args.redundant} "
          f"(re-placed every {args.rebalance_every} steps)\n")
    print("| routing | placement | step (s) | vs balanced static | static / this | compute r0 / r1 (s) | "
          "wait r0 / r1 (s) | routed rows per EP rank, last step (busiest / mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        placement = f"redundant R={r['redundant']}" if r["redundant"] else "static"
        rows_text = "/".join(map(str, r["rows"])) + f" ({max(r['rows']) * len(r['rows']) / sum(r['rows']):.2f}x mean)"
        print(f"| {r['routing']} | {placement} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | "
              f"{static[r['routing']] / r['step_s']:.2f}x | {r['cpu'][0]:.3f} / {r['cpu'][1]:.3f} | "
              f"{r['wait'][0]:.3f} / {r['wait'][1]:.3f} | {rows_text} |")


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, str(Path(tmp) / "init"), tmp, results), nprocs=2, join=True)
        rows = summarise(results["ranks"], args)
    print_table(rows, args)


if __name__ == "__main__":
    main()
