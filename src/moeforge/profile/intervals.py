"""Sets of time intervals as sorted, disjoint [(start, end), ...] lists: what the step breakdown is made of."""

from __future__ import annotations

Intervals = list[tuple[float, float]]


def union(spans) -> Intervals:
    out: Intervals = []
    for s, e in sorted((s, e) for s, e in spans if e > s):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """a and b disjoint and sorted (as `union` returns)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """a minus b (both disjoint and sorted)."""
    out = []
    for s, e in a:
        cur = s
        for bs, be in b:
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out


def clip(a: Intervals, start: float, end: float) -> Intervals:
    return intersect(a, [(start, end)])


def length(a: Intervals) -> float:
    return sum(e - s for s, e in a)
