"""`auto` activation checkpointing: the least recompute that fits a memory budget.

Inputs, all measured on one forward of a real-shaped batch without checkpointing (ActivationProfile):
  held(P)     activation bytes kept at the end of the forward if the set P of candidates is checkpointed
              (exact for that forward: saved tensors outside P plus the inputs P's regions keep);
  inside(c)   bytes a region rebuilds when it is recomputed in the backward (the transient);
  seconds(c)  forward time of the region = its recompute cost.

Constraint: held(P) + max_{c in P} inside(c) <= budget. The second term is the recompute transient: one
region is rebuilt at a time, on top of what is held, so the sum bounds the backward's activation peak
(conservatively: by the time a region is rebuilt, later layers' activations are already freed).

Algorithm (a multiple-choice knapsack, solved by dynamic programming):
1. Each Block is one group; its options are: nothing, the whole block, or any subset of its
   non-overlapping sub-block candidates (norms, q/kv projections, attention core, experts, MLP).
   Each option's saving is computed exactly from the profile (held(nothing) - held(option)), so
   interactions inside a block (a tensor two regions both need) are accounted for; its cost is the
   sum of its regions' forward times; options no cheaper-per-byte than another (dominated: saves less
   and costs more) are dropped.
2. For a cap T on the transient (each distinct transient value in turn), options with a region larger
   than T are excluded and the remaining problem is: save at least need = held(nothing) - (budget - T)
   bytes at least total cost. Savings are rounded *down* to units of need/2000, and
   dp[w] = least cost to save >= w units is filled group by group (for every option o of the group,
   dp'[w] = min(dp'[w], dp[max(0, w - units(o))] + cost(o))), O(groups x options x 2000).
3. Of all caps, the cheapest feasible plan wins; it is then checked with the exact held(P) across
   blocks (a block's output feeds the next block, so savings are not perfectly additive); if it
   misses, `need` grows by the shortfall and step 2 repeats.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .candidates import BLOCK, Candidate
from .profiler import ActivationProfile

UNITS = 2000


@dataclass
class Option:
    names: tuple[str, ...]
    saving: int
    cost: float
    transient: int


def block_options(profile: ActivationProfile, candidates: list[Candidate], base: int) -> list[Option]:
    """The non-dominated options of one block (its candidates), 'nothing' excluded."""
    block = [c for c in candidates if c.kind == BLOCK]
    subs = [c for c in candidates if c.kind != BLOCK]
    sets = [tuple(c.name for c in block)] if block else []
    for r in range(1, len(subs) + 1):
        sets += [tuple(c.name for c in combo) for combo in itertools.combinations(subs, r)]
    options = [Option(s, base - profile.held(s), sum(profile.seconds.get(n, 0.0) for n in s),
                      max(profile.inside(n) for n in s)) for s in sets]
    options = [o for o in options if o.saving > 0]
    options.sort(key=lambda o: (o.cost, -o.saving))
    kept, best_saving = [], -1
    for o in options:  # by increasing cost, keep only options that save more than every cheaper one
        if o.saving > best_saving:
            kept.append(o)
            best_saving = o.saving
    return kept


@dataclass
class AutoPlan:
    names: list[str]
    held: int  # bytes kept at the end of the forward (exact, from the profile)
    transient: int  # largest region rebuilt in the backward
    recompute_s: float  # summed forward time of the checkpointed regions
    baseline: int  # held bytes with no checkpointing
    budget: int

    @property
    def peak(self) -> int:
        return self.held + self.transient


def plan_auto(profile: ActivationProfile, candidates: list[Candidate], budget: float) -> AutoPlan:
    """The cheapest set of candidates whose held + transient activation bytes fit `budget` bytes."""
    base = profile.saved_bytes
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.layer, []).append(c)
    options = [block_options(profile, cs, base) for cs in groups.values()]
    if base <= budget:
        return AutoPlan([], base, 0, 0.0, base, int(budget))
    best: AutoPlan | None = None
    for cap in sorted({o.transient for opts in options for o in opts}):
        allowed = [[o for o in opts if o.transient <= cap] for opts in options]
        need = base - (budget - cap)
        for _ in range(5):  # grow `need` if cross-block effects make the exact check miss
            chosen = _knapsack(allowed, need)
            if chosen is None:
                break
            names = [n for o in chosen for n in o.names]
            held = profile.held(names)
            transient = max((o.transient for o in chosen), default=0)
            if held + transient <= budget:
                plan = AutoPlan(names, held, transient, sum(o.cost for o in chosen), base, int(budget))
                if best is None or plan.recompute_s < best.recompute_s:
                    best = plan
                break
            need += held + transient - budget
    if best is None:
        full = [c.name for c in candidates if c.kind == BLOCK]
        low = profile.held(full) + max(profile.inside(n) for n in full)
        raise ConfigError(f"memory budget {budget / 2**20:.2f} MiB is below the least activation memory "
                          f"checkpointing reaches here ({low / 2**20:.2f} MiB kept and rebuilt, of "
                          f"{base / 2**20:.2f} MiB without checkpointing); raise --memory-budget")
    return best


def _knapsack(options: list[list[Option]], need: float) -> list[Option] | None:
    """Least-cost choice of at most one option per group saving >= need bytes (savings rounded down)."""
    if need <= 0:
        return []
    W = UNITS

    def units(o: Option) -> int:  # saving in units of need / W, rounded down (a hair of slack for float error)
        return min(W, int(o.saving * W / need + 1e-9))

    dp = np.full(W + 1, math.inf)
    dp[0] = 0.0
    steps = np.arange(W + 1)
    picks = []
    for opts in options:
        new = dp.copy()
        pick = np.full(W + 1, -1)
        for i, o in enumerate(opts):
            w = units(o)
            cand = dp[np.maximum(steps - w, 0)] + o.cost
            better = cand < new
            new[better] = cand[better]
            pick[better] = i
        picks.append(pick)
        dp = new
    if not math.isfinite(dp[W]):
        return None
    chosen, w = [], W
    for opts, pick in zip(reversed(options), reversed(picks)):
        i = pick[w]
        if i >= 0:
            chosen.append(opts[i])
            w = max(0, w - units(opts[i]))
    return chosen
