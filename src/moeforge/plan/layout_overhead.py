"""The host work a distributed layout adds that no other component prices, measured where the arithmetic
is negligible: the run's own layout trained for a few steps at one sequence of `host_cost.SEQ` tokens per
micro-batch.

Why: the wrappers' cost (wrapper_cost.py) is measured module by module, but a distributed step does more
on its training thread than its wrappers: the pipeline schedule's actions (torch.distributed.pipelining
runs each micro-batch's forward, input-gradient and weight-gradient backward as separate actions under
DualPipeV, with their sends and receives), TP's real collectives over two ranks (the TP probe runs on
one), EP's exchanges beside FSDP2's. At 8 tokens the run's rank 0 spent 68 ms a step under DualPipeV, where
the planner priced 47 (2026-12-07; 1F1B: 26 against 16; one process: 21 against 20). So the run's layout
is trained as `moeforge train` trains it (same processes, degrees, schedule, micro-batch count and
gradient accumulation; `REPS` steps after `WARMUP`), rank 0's CPU seconds per step are read from its step
clock, and `plan --against` prices that small run with every other component: what is left (at least 0)
is this component, added to the run's own prediction. Nothing is measured at the run's size and nothing is
fitted to it: the same number is added whatever the tokens (the step's alpha, as in host_cost.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from .host_cost import SEQ, at_alpha

WARMUP, REPS = 2, 6
TIMEOUT_S = 300


def small_layout_run(run, dp: int, micro_batches: int):
    """The run at `SEQ` tokens, one sequence per micro-batch of each of its `dp` data-parallel ranks (the
    same number of pipeline micro-batches and accumulation steps), every step logged, no evaluation,
    samples or mid-run checkpoints, the default corpus slice."""
    pp_mb = {"pp_microbatches": micro_batches} if run.train.pp > 1 else {}
    return at_alpha(run, batch_size=dp * max(1, micro_batches), steps=WARMUP + REPS, eval_every=0, eval_batches=1,
                    sample_tokens=0, save_every=0, log_every=1, run_dir=None, tensorboard=False, wandb=False, **pp_mb)


def train_small(run, processes: int, dp: int, micro_batches: int, folder: Path, threads: int = 1) -> Path:
    """Train `small_layout_run` on `processes` gloo processes of `threads` threads with `moeforge train`;
    returns its run folder. A failure is one line naming the layout (ConfigError)."""
    small = small_layout_run(run, dp, micro_batches)
    cfg = folder / "small.toml"
    cfg.write_text(small.to_toml())
    run_dir = folder / "run"
    cmd = [sys.executable, "-m", "moeforge", "train", "--config", str(cfg), "--nproc", str(processes),
           "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"the layout's host work was not measured: its {SEQ}-token run took over {TIMEOUT_S} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"the layout's host work was not measured: its {SEQ}-token run failed: {last}")
    return run_dir
