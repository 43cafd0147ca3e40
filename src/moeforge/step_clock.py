"""Where a step's wall time went on a shared CPU: on a core, waiting for one, or blocked.

Why: on a machine shared with other jobs, a step's wall time is its CPU time, plus the time it was
runnable but had no core (the scheduler's run-queue delay, /proc/thread-self/schedstat field 2), plus
the time it was blocked (a gloo collective waiting for a peer, a pipeline bubble). The first is what a
step-time model predicts, the second is a property of the load, the third is the layout's own waiting.
Recording the first two per step lets `moeforge plan --against` separate them (docs/planner.md).

Both are of the thread that runs the step (the training loop's): wall = its CPU + its run-queue delay +
its blocked time, exactly. Summing over the process's threads would not add up: gloo's I/O threads are
runnable at the same time as the main thread and their delays overlap it (measured: CPU + delay summed
over threads exceeded the wall time of 2-rank steps by up to 2x).
"""

from __future__ import annotations

import resource
import threading
import time

def run_queue_delay_s() -> float | None:
    """Seconds the calling thread has spent runnable but not running (Linux schedstat), or None."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def minor_faults() -> int | None:
    """Minor page faults of the calling thread so far (Linux RUSAGE_THREAD), or None where not counted.
    Each is a fresh page the kernel zeroes and maps: memory malloc returned to the OS and took back."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return None if who is None else resource.getrusage(who).ru_minflt


class StepClock:
    """CPU seconds and run-queue delay of the calling thread between `start()` and `stop()`."""

    def start(self) -> None:
        self.cpu0, self.wait0, self.faults0 = time.thread_time(), run_queue_delay_s(), minor_faults()

    def stop(self) -> dict:
        out = {"cpu_s": round(time.thread_time() - self.cpu0, 4)}
        wait = run_queue_delay_s()
        if wait is not None and self.wait0 is not None:
            out["runq_s"] = round(wait - self.wait0, 4)
        faults = minor_faults()
        if faults is not None and self.faults0 is not None:
            out["minflt"] = faults - self.faults0
        return out
