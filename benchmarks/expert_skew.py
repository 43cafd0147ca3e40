"""How much a hot expert slows an expert-parallel MoE layer, and how much balancing wins back.

Simulated EP layout: E routed experts over R ranks (E/R each). Router logits are random per token plus an
offset on expert 0, tuned so that expert 0 receives `skew` x the mean load. For each scenario we derive
per-rank token counts, time the real routed-expert kernel (forward + backward of `GroupedExperts`) on
each rank's tokens in this process, and take the step time as the slowest rank (the straggler every
other rank waits for in the all-to-all). Scenarios:
  balanced   every expert exactly N K / E tokens (the ideal)
  skewed     no balancing
  bias       aux-loss-free bias updates (gamma per step) during a warm-up on fresh tokens, then measured
  replicas   redundant slots (+1 slot per rank) placed by `plan_placement` from the skewed loads

  python benchmarks/expert_skew.py [--experts 16 --ranks 4 --tokens 4096 --top-k 4 --skews 1,2,4 --impl ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from moeforge.balance.placement import plan_placement
from moeforge.model.moe import GroupedExperts


def routed_counts(logits: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    chosen = (logits.sigmoid() + bias).topk(top_k, dim=-1).indices
    return torch.bincount(chosen.flatten(), minlength=logits.shape[1]).float()


def skewed_logits(n: int, E: int, offset: float, g: torch.Generator) -> torch.Tensor:
    logits = torch.randn(n, E, generator=g)
    logits[:, 0] += offset
    return logits


def offset_for(skew: float, E: int, top_k: int, n: int) -> float:
    """Bisection on expert 0's logit offset so that its load is `skew` x the mean."""
    lo, hi = -3.0, 6.0
    for _ in range(40):
        mid = (lo + hi) / 2
        counts = routed_counts(skewed_logits(n, E, mid, torch.Generator().manual_seed(0)), torch.zeros(E), top_k)
        if counts[0] / counts.mean() < skew:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def time_rank(experts: GroupedExperts, counts: list[int], repeats: int) -> float:
    """Median seconds of forward + backward of one rank's experts on its token counts."""
    c = torch.tensor(counts, dtype=torch.long)
    x = torch.randn(int(c.sum()), experts.gate_up_proj.shape[2], requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        experts(x, c).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def step_time(slot_counts: np.ndarray, ranks: int, dim: int, hidden: int, repeats: int,
              impl: str = "bmm") -> tuple[float, list]:
    per_rank = slot_counts.reshape(ranks, -1)
    kernel = GroupedExperts(per_rank.shape[1], dim, hidden, impl=impl)
    torch.nn.init.normal_(kernel.gate_up_proj, std=0.02)
    torch.nn.init.normal_(kernel.down_proj, std=0.02)
    times = [time_rank(kernel, [int(round(v)) for v in row], repeats) for row in per_rank]
    return max(times), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--skews", default="1,2,4")
    p.add_argument("--gamma", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impl", default="grouped_mm", choices=["grouped_mm", "bmm", "loop"],
                   help="routed-expert kernel (bmm pads every expert to the busiest one: skew costs more)")
    args = p.parse_args()
    E, R, N, K = args.experts, args.ranks, args.tokens, args.top_k
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ideal = np.full(E, N * K / E)
    base, _ = step_time(ideal, R, args.dim, args.hidden, args.repeats, args.impl)
    print(f"E={E} experts on R={R} ranks, {N} tokens x top-{K}, kernel {args.impl}; "
          "step = slowest rank's expert fwd+bwd")
    print(f"balanced step {base * 1e3:.1f} ms\n")
    print(f"{'skew':>5} {'scenario':>9} {'hot load/mean':>13} {'max rank load/mean':>18} {'step ms':>8} "
          f"{'vs balanced':>11}")
    for skew in [float(s) for s in args.skews.split(",")]:
        offset = offset_for(skew, E, K, N)
        g = torch.Generator().manual_seed(1)
        skewed = routed_counts(skewed_logits(N, E, offset, g), torch.zeros(E), K)
        bias = torch.zeros(E)
        for _ in range(args.warmup_steps):  # aux-loss-free balancing on fresh tokens
            counts = routed_counts(skewed_logits(N, E, offset, g), bias, K)
            bias += args.gamma * torch.sign(counts.mean() - counts)
        balanced_by_bias = routed_counts(skewed_logits(N, E, offset, g), bias, K)
        placement = plan_placement(skewed.numpy()[None], E + R, n_devices=R)
        replica_counts = (skewed.numpy() / placement.logcnt[0])[placement.phy2log[0]]
        scenarios = [("skewed", skewed.numpy(), None), ("bias", balanced_by_bias.numpy(), None),
                     ("replicas", replica_counts, placement)]
        for name, counts, plc in scenarios:
            t, _ = step_time(counts, R, args.dim, args.hidden, args.repeats, args.impl)
            rank_load = counts.reshape(R, -1).sum(1)
            hot = (counts[0] if plc is None else skewed[0].item()) / (N * K / E)
            print(f"{skew:5.1f} {name:>9} {hot:13.2f} {rank_load.max() / rank_load.mean():18.2f} {t * 1e3:8.1f} "
                  f"{t / base:10.2f}x")


if __name__ == "__main__":
    main()
