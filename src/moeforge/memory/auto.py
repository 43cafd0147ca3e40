"""`auto` activation checkpointing: the least recompute that fits a memory budget.

Inputs, all measured on one forward of a real-shaped batch without checkpointing (ActivationProfile):
  held(P)        activation bytes kept at the end of the forward if the set P of candidates is
                 checkpointed (exact for that forward: saved tensors outside P plus the inputs P's
                 outermost regions keep);
  rebuilt(c, S)  bytes region c's recompute rebuilds in the backward when the regions S nested in it are
                 checkpointed too;
  seconds(c)     forward time of region c = the cost of recomputing it once.

Peak. Regions are rebuilt one at a time in the backward, on top of what is held, so the activation peak
is bounded by held(P) + transient(P), transient(P) = max over outermost regions R in P of
rebuilt(R, inner) + transient(inner) (recursively: an inner region is rebuilt while its parent's
rebuilt tensors are alive). Conservative: by then later layers' activations are already freed.
Constraint: held(P) + transient(P) <= budget.

Algorithm (a multiple-choice knapsack, solved by dynamic programming):
1. Each Block is one group. Its options are the subsets of its sub-block candidates that save memory
   (attention, q/kv projections, attention core, moe, routed and shared experts, dense MLP, and
   weight_casts -- the bf16 weight copies recast in the backward, priced at one cast per weight, which
   also acts inside every checkpointed region of its block; nested pairs allowed), each alone or inside a checkpointed whole block (which keeps only the block input;
   the nested regions shrink what its recompute rebuilds at once -- the way to go below the budget a
   plain full checkpoint reaches). Each option's saving (held(nothing) - held(option)) and transient
   are computed exactly from the profile; its cost is the summed forward time of its regions (a region
   nested in a checkpointed block runs once more in the block's recompute). Dominated options (no
   cheaper than another that saves at least as much with no larger transient) are dropped.
2. For a cap T on the transient (a few dozen values spanning the options' transients), options above T
   are excluded, and the rest is: save >= need = held(nothing) - (budget - T) bytes at least total cost.
   Savings are rounded *down* to units of need/2000 and dp[w] = least cost to save >= w units is filled
   group by group: dp'[w] = min(dp[w], min over options o of dp[max(0, w - units(o))] + cost(o)).
   O(groups x options x 2000) per cap, vectorised over w.
3. The cheapest plan over all caps wins after an exact check of held + transient (a block's output
   feeds the next block, so savings are not perfectly additive across blocks); if the check misses,
   `need` grows by the shortfall and step 2 repeats for that cap.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .candidates import BLOCK, CONTAINER, RECAST, Candidate
from .profiler import ActivationProfile

UNITS = 2000
MAX_CAPS = 32


def contains(outer: Candidate, inner: Candidate) -> bool:
    if outer is inner or outer.layer != inner.layer:
        return False
    if inner.kind == RECAST:  # a Block's recasting also runs inside each of its checkpointed regions
        return outer.kind != RECAST
    return outer.kind == BLOCK or CONTAINER.get(inner.kind) == outer.kind


def transient(profile: ActivationProfile, names, candidates: list[Candidate]) -> int:
    """Largest activation bytes rebuilt at once in the backward under plan `names` (see module docstring)."""
    chosen = [c for c in candidates if c.name in set(names)]

    def peak(region: Candidate) -> int:
        inner = [c for c in chosen if contains(region, c)]
        direct = [c for c in inner if not any(contains(o, c) for o in inner)]
        return profile.rebuilt(region.name, [c.name for c in inner]) + max((peak(c) for c in direct), default=0)

    outer = [c for c in chosen if not any(contains(o, c) for o in chosen)]
    return max((peak(c) for c in outer), default=0)


@dataclass
class Option:
    names: tuple[str, ...]
    saving: int
    cost: float
    transient: int


def block_options(profile: ActivationProfile, candidates: list[Candidate], base: int) -> list[Option]:
    """The non-dominated options of one block (its candidates), 'nothing' excluded."""
    block = [c for c in candidates if c.kind == BLOCK]
    floor = 1e-3 * base / max(1, len(candidates))  # norms alone save a few bytes (their 1/rms): not worth it
    useful = [c for c in candidates if c.kind != BLOCK and base - profile.held([c.name]) > floor]
    subsets = [()] + [combo for r in range(1, len(useful) + 1) for combo in itertools.combinations(useful, r)]
    options = []
    for outer in ([], block):
        for combo in subsets:
            chosen = [*outer, *combo]
            if not chosen:
                continue
            names = tuple(c.name for c in chosen)
            options.append(Option(names, base - profile.held(names), sum(profile.seconds.get(n, 0.0) for n in names),
                                  transient(profile, names, chosen)))
    options = [o for o in options if o.saving > 0]
    options.sort(key=lambda o: (o.cost, -o.saving, o.transient))
    kept: list[Option] = []
    for o in options:  # by increasing cost: keep an option only if no cheaper one is at least as good
        if not any(k.saving >= o.saving and k.transient <= o.transient for k in kept):
            kept.append(o)
    return kept


@dataclass
class AutoPlan:
    names: list[str]
    held: int  # bytes kept at the end of the forward (exact, from the profile)
    transient: int  # largest activation bytes rebuilt at once in the backward
    recompute_s: float  # summed forward time of the checkpointed regions
    baseline: int  # held bytes with no checkpointing
    budget: int

    @property
    def peak(self) -> int:
        return self.held + self.transient


def plan_auto(profile: ActivationProfile, candidates: list[Candidate], budget: float) -> AutoPlan:
    """The cheapest set of candidates whose held + transient activation bytes fit `budget` bytes."""
    base = profile.saved_bytes
    if base <= budget:
        return AutoPlan([], base, 0, 0.0, base, int(budget))
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.layer, []).append(c)
    options = [block_options(profile, cs, base) for cs in groups.values()]
    values = sorted({o.transient for opts in options for o in opts})
    caps = sorted({values[round(i * (len(values) - 1) / (MAX_CAPS - 1))] for i in range(MAX_CAPS)}) if values else []
    best: AutoPlan | None = None
    for cap in caps:
        allowed = [[o for o in opts if o.transient <= cap] for opts in options]
        need = base - (budget - cap)
        for _ in range(5):  # grow `need` if cross-block effects make the exact check miss
            chosen = _knapsack(allowed, need)
            if chosen is None:
                break
            names = [n for o in chosen for n in o.names]
            held, peak_t = profile.held(names), transient(profile, names, candidates)
            if held + peak_t <= budget:
                plan = AutoPlan(names, held, peak_t, sum(o.cost for o in chosen), base, int(budget))
                if best is None or plan.recompute_s < best.recompute_s:
                    best = plan
                break
            need += held + peak_t - budget
    if best is None:
        blocks = {c.name for c in candidates if c.kind == BLOCK}
        # every block checkpointed, each with its smallest-transient nesting
        nested = [min((o for o in opts if o.names[0] in blocks), key=lambda o: o.transient, default=None)
                  for opts in options]
        names = [n for o in nested if o is not None for n in o.names]
        low = profile.held(names) + transient(profile, names, candidates)
        raise ConfigError(f"memory budget {budget / 2**20:.2f} MiB is below the least activation memory "
                          f"checkpointing reaches here (about {low / 2**20:.2f} MiB kept and rebuilt, of "
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
            cand = dp[np.maximum(steps - units(o), 0)] + o.cost
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
