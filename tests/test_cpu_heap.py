"""The trainer's CPU heap setting (cpu_heap.py): freed memory stays mapped, so a repeated allocation of the
same size stops page-faulting; and the planner's kernel timings skip calls that did fault."""

import mmap
import os
import subprocess
import sys

import pytest
import torch

from moeforge.cpu_heap import keep_freed_memory
from moeforge.plan.device import _median_time
from moeforge.step_clock import minor_faults

needs_fault_counts = pytest.mark.skipif(minor_faults() is None, reason="no per-thread fault counts here")


STEPS_SCRIPT = """
import sys, tempfile, torch
from rich.console import Console
from moeforge.config import resolve_run_config
from moeforge.step_clock import minor_faults
from moeforge.train import Trainer
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    run = resolve_run_config({}, dict(preset="debug", batch_size=8, seq_len=128, device="cpu", precision="fp32",
                                      max_corpus_mb=0.2, run_dir=tmp))
    trainer = Trainer(run, run_dir=tmp, console=Console(quiet=True))
    for _ in range(8):
        f0 = minor_faults()
        trainer.train_step()
        trainer.step += 1
        print(minor_faults() - f0)
"""


@needs_fault_counts
def test_a_cpu_trainers_steps_stop_page_faulting():
    """In a fresh process (a heap of its own), the trainer's first step faults its activations in; once
    freed memory is kept, later steps reuse those pages (glibc as it comes: thousands of faults a step)."""
    if not keep_freed_memory():
        pytest.skip("malloc is not glibc's")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOEFORGE_KEEP_FREED_MEMORY", None)
    out = subprocess.run([sys.executable, "-c", STEPS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = [int(line) for line in out.stdout.split()]
    assert len(faults) == 8 and faults[0] > 1000, faults
    assert sum(faults[-4:]) / 4 < faults[0] / 10, faults  # a few hundred stray faults at most


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
