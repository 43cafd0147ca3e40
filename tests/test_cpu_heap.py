"""The trainer's CPU heap setting (cpu_heap.py): freed memory stays mapped, so a repeated allocation of the
same size stops page-faulting; and the planner's kernel timings skip calls that did fault."""

import mmap

import pytest
import torch

from moeforge.cpu_heap import keep_freed_memory
from moeforge.plan.device import _median_time
from moeforge.step_clock import minor_faults

needs_fault_counts = pytest.mark.skipif(minor_faults() is None, reason="no per-thread fault counts here")


@needs_fault_counts
def test_a_repeated_large_allocation_stops_faulting_once_freed_memory_is_kept():
    if not keep_freed_memory():
        pytest.skip("malloc is not glibc's")
    x = torch.ones(1 << 22)  # 16 MiB: above glibc's default mmap threshold
    faults = []
    for _ in range(8):
        f0 = minor_faults()
        y = x * 2  # a fresh 16 MiB output, freed at once
        del y
        faults.append(minor_faults() - f0)
    assert faults[-3:] == [0, 0, 0], faults  # 4096 faults a call where the pages went back to the kernel


@needs_fault_counts
def test_kernel_timings_skip_calls_that_page_fault():
    calls = []

    def sometimes_faulting():  # every other call maps and touches 8 MiB of fresh pages
        calls.append(1)
        if len(calls) % 2:
            with mmap.mmap(-1, 8 << 20) as m:
                for i in range(0, 8 << 20, 4096):
                    m[i] = 1

    faulting = _median_time(lambda: [sometimes_faulting(), sometimes_faulting()], 3)  # every call faults
    assert _median_time(sometimes_faulting, 5) < 0.25 * faulting
