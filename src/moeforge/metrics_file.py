"""metrics.jsonl, a run's log: one JSON object per step, appended as the run goes.

A power loss or a full disk can leave the last line half-written. Readers (a resume, `moeforge report`)
drop such a torn last line with a warning and keep the rest; a bad line anywhere else is corruption, not
an interrupted append, and is an error naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .errors import DataError


def _parse(raw: bytes):
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) and "step" in row else None


def read_lines(path: Path, warn: Callable[[str], None]) -> list[tuple[bytes, dict]]:
    """(line, parsed row) for each non-blank line of `path`; a torn last line is dropped via `warn`."""
    lines = [(no, raw) for no, raw in enumerate(Path(path).read_bytes().splitlines(), start=1) if raw.strip()]
    out = []
    for i, (no, raw) in enumerate(lines):
        row = _parse(raw)
        if row is not None:
            out.append((raw, row))
        elif i == len(lines) - 1:
            warn(f"{path}:{no}: dropped a torn last line (the run stopped while writing it)")
        else:
            raise DataError(f"{path}:{no}: not a valid metrics line (JSON with a 'step')")
    return out


def read_metrics(path: Path, warn: Callable[[str], None]) -> list[dict]:
    return [row for _, row in read_lines(path, warn)]


def trim_metrics(path: Path, step: int, warn: Callable[[str], None]) -> None:
    """Keep the lines of steps <= `step` (a resume drops what was logged after its checkpoint, so the
    file reads as one uninterrupted run), rewritten without a torn last line."""
    path = Path(path)
    kept = [raw for raw, row in read_lines(path, warn) if row["step"] <= step] if path.exists() else []
    path.write_bytes(b"".join(raw + b"\n" for raw in kept))
