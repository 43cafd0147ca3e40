"""Parsing a memory budget: bytes (`2e9`, `1.5GiB`, `800MB`) or a fraction (`0.5`) of a baseline."""

from __future__ import annotations

import re

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_budget(text: str | float, baseline: float) -> float:
    """Budget in bytes. A plain number <= 1 is a fraction of `baseline` (the activation bytes without
    checkpointing); larger numbers, or numbers with a unit, are bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"memory_budget must be bytes (e.g. 2e9, 1.5GiB) or a fraction like 0.5, got {text!r}")
    value = float(m.group(1))
    if value <= 0:
        raise ConfigError(f"memory_budget must be positive, got {text!r}")
    if not m.group(2) and value <= 1:
        return value * baseline
    return value * _UNITS[m.group(2)]
