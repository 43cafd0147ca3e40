"""Where a step's wall time went on a shared CPU: on a core, waiting for one, or blocked.

Why: on a machine shared with other jobs, a step's wall time is its CPU time, plus the time it was
runnable but had no core (the scheduler's run-queue delay, /proc/self/task/*/schedstat field 2), plus
the time it was blocked (a gloo collective waiting for a peer, a pipeline bubble). The first is what a
step-time model predicts, the second is a property of the load, the third is the layout's own waiting.
Recording the first two per step lets `moeforge plan --against` separate them (docs/planner.md).
"""

from __future__ import annotations

import os
import time

_TASKS = "/proc/self/task"


def run_queue_delay_s() -> float | None:
    """Seconds this process's threads have spent runnable but not running (Linux schedstat), or None."""
    try:
        total = 0
        for tid in os.listdir(_TASKS):
            try:
                with open(f"{_TASKS}/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
        return total / 1e9
    except OSError:
        return None


class StepClock:
    """CPU seconds and run-queue delay between `start()` and `stop()` (the process, all its threads)."""

    def start(self) -> None:
        self.cpu0, self.wait0 = time.process_time(), run_queue_delay_s()

    def stop(self) -> dict:
        out = {"cpu_s": round(time.process_time() - self.cpu0, 4)}
        wait = run_queue_delay_s()
        if wait is not None and self.wait0 is not None:
            out["runq_s"] = round(wait - self.wait0, 4)
        return out
