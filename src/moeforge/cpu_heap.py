"""Keep the memory a CPU training step frees inside the process, so the next step reuses its pages.

Why: an eager step allocates and frees the same activations every step. glibc's malloc hands large
blocks back to the kernel (munmap above its mmap threshold, a heap trim above its trim threshold, both
moving with what was freed last), so the next step pays a page fault, the kernel zeroing and mapping
4 KB, for every page again. Measured on the development VM (December 2026): a debug rank at 8 x 256
tokens took 18-20K minor faults a step, a 16 MB element-wise product took 10-11 ms when its output
faulted against 2 ms when it did not, and whether it faulted changed from call to call. That is noise
in every CPU step and in every kernel the planner times. With the thresholds raised, the pages stay
mapped and a step's faults fall to about zero after the first steps.

Cost: the process keeps its peak heap (RSS does not fall between steps); `malloc_trim` still returns
it on demand (memory/report.py). Not glibc (macOS, musl): nothing to do. `MOEFORGE_KEEP_FREED_MEMORY=0`
leaves malloc as it is (benchmarks/cpu_heap.py compares the two).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 2 ** 31 - 1  # mallopt takes an int: never trim the heap's top
MMAP_ABOVE = (1 << 30, 32 << 20)  # blocks served by mmap: above 1 GiB where glibc accepts it, else its 32 MiB cap


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once); False where malloc is not glibc's
    or MOEFORGE_KEEP_FREED_MEMORY=0."""
    if os.environ.get("MOEFORGE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # another malloc (musl, macOS): its own thresholds
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_TRIM_THRESHOLD, KEEP_BYTES):
        return False
    return any(mallopt(M_MMAP_THRESHOLD, limit) for limit in MMAP_ABOVE)
