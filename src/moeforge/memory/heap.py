"""Live heap bytes on CPU (glibc `mallinfo2`) and their peak over a stretch of tensor operations.

CPU tensors come from malloc, so malloc's own count of bytes in use is the CPU counterpart of
torch.cuda.memory_allocated: `uordblks` (in use in the heap arenas) + `hblkhd` (large blocks served by
mmap). Unlike process RSS it does not include memory malloc holds but has not handed out (arena
fragmentation, see docs/memory.md). `PeakHeap` samples it after every ATen operation (a
TorchDispatchMode; forward and CPU backward both run through it), so the peak it reports is exact to
within one operation's temporaries. Not available off glibc: `live_heap_bytes()` returns None.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def live_heap_bytes() -> int | None:
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap(TorchDispatchMode):
    """`with PeakHeap() as p: ...` -> p.peak: the most live heap bytes above the level at entry."""

    def __init__(self):
        super().__init__()
        self.base = self.peak = 0

    def __enter__(self):
        self.base = live_heap_bytes() or 0
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        live = live_heap_bytes()
        if live is not None:
            self.peak = max(self.peak, live - self.base)
        return out
