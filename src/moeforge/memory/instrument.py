"""Replacing a candidate's callable on its module instance, and undoing it.

Both the profiler (timing a region, noting its inputs) and activation checkpointing wrap candidates this
way; wrappers stack, and `Patch.remove` restores exactly what was there before.
"""

from __future__ import annotations

from typing import Callable

from .candidates import Candidate

_MISSING = object()


class Patch:
    """`make(current_callable) -> replacement`, installed on the candidate's owner instance."""

    def __init__(self, candidate: Candidate, make: Callable[[Callable], Callable]):
        self.candidate = candidate
        owner, attr = candidate.owner, candidate.attr
        self._before = owner.__dict__.get(attr, _MISSING)
        object.__setattr__(owner, attr, make(getattr(owner, attr)))

    def remove(self) -> None:
        owner, attr = self.candidate.owner, self.candidate.attr
        if self._before is _MISSING:
            owner.__dict__.pop(attr, None)
        else:
            object.__setattr__(owner, attr, self._before)


def remove_all(patches: list[Patch]) -> None:
    for p in reversed(patches):
        p.remove()
    patches.clear()
