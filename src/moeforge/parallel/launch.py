"""Starting distributed runs: `moeforge train --nproc N` runs itself in N ranks under torch's elastic
agent (torchrun's); each rank joins the process group with a timeout, and a failed collective becomes
one error naming the rank, the collective, what the trainer was doing and which peers are gone, instead
of a hang or a deep gloo/NCCL traceback.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, TrainingError

# Functions whose frames in a traceback identify the collective that failed (torch.distributed and the
# functional collectives FSDP2 and the EP exchange call).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all_single", "all_to_all", "broadcast", "barrier", "send", "recv", "_all_gather_base",
               "_reduce_scatter_base", "all_to_all_single_autograd", "foreach_all_gather", "foreach_reduce",
               "all_gather_object", "broadcast_object_list", "gather_object")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def launch_local_ranks(nproc: int, argv: list[str]) -> int:
    """Run `moeforge <argv>` in nproc processes on this machine under torch's elastic agent, as
    `torchrun --standalone --nproc-per-node N -m moeforge ARGV` does (docs/distributed.md has the
    multi-node form); its exit code.

    Ranks of one thread each are forked from this process, so they start with its imports (torch,
    torch._dynamo, moeforge: ~6 CPU-seconds a rank in a fresh interpreter, most of a short run's start on a
    small machine). Ranks of more threads, or a launcher that has touched CUDA or holds a process group,
    start fresh: a forked child running OpenMP on more than one thread after its parent used OpenMP
    deadlocks (seen with torch 2.13's libgomp), and CUDA cannot be re-initialised in a fork.
    """
    import gc
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env = dict(os.environ)
    # Share this machine's cores between the ranks (torchrun would pick 1 thread each, with a banner).
    threads = max(1, int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))))
    fork = threads == 1 and not torch.cuda.is_initialized() and not (dist.is_available() and dist.is_initialized())
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method="fork" if fork else "spawn")
    if fork:
        gc.collect()  # what this process discarded is finalised here, not in a rank (see run_rank)
    # The agent logs each failed rank with the traceback of its own wait; the ranks print their errors and
    # describe_child_failure sums them up in one line.
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=run_rank)(argv, threads)
    except Exception as e:  # ChildFailedError, after each rank printed its error
        print(f"moeforge train: error: {describe_child_failure(e)}", file=sys.stderr)
        return 1
    finally:
        agent_log.setLevel(level)
        os.environ.clear()
        os.environ.update(env)
    return 0


def run_rank(argv: list[str], threads: int) -> None:
    """One launched rank: `moeforge <argv>` in the environment the agent set (RANK, WORLD_SIZE, ...)."""
    import gc

    # A forked rank leaves what it inherited to its parent: a discarded gloo group finalised here, where
    # none of its threads exist, deadlocks.
    gc.freeze()
    torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when torch started, maybe in the launcher
    from ..cli import main

    try:
        code = main(argv)
    except Exception:  # a bug: its traceback on stderr, as a rank started by torchrun prints it
        traceback.print_exc()
        sys.exit(1)
    if code:
        sys.exit(code)


def describe_child_failure(exc: BaseException) -> str:
    """torchrun's ChildFailedError as one line naming the first rank that failed and how. (When a rank dies,
    torchrun stops the others at once, usually before they can report the collective that broke.)"""
    failures = getattr(exc, "failures", None)
    if not failures:
        return f"{type(exc).__name__}: the distributed run failed (see the rank errors above)"
    rank, failure = exc.get_first_failure()
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    others = sorted(set(failures) - {rank})
    also = f"; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too" if others else ""
    return (f"rank {rank} (pid {failure.pid}) {how}{also}: the distributed run failed"
            + (" (see the rank errors above)" if failure.exitcode > 0 else ""))


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without --nproc N / --nproc=N (the launched ranks must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def init_distributed(backend: str, timeout_s: float) -> tuple[int, int]:
    """Join the torchrun job (env:// rendezvous), or a 1-process group when not launched by torchrun
    (so a distributed checkpoint can be resumed by a plain `moeforge train --resume`). -> (rank, world)."""
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if under_torchrun():
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def failed_collective(exc: BaseException) -> str | None:
    """The innermost collective in the exception's traceback (and its causes), if any; else, when it came
    out of autograd (collectives issued by C++ backward functions leave no Python frame), "a collective of
    the backward pass"."""
    found, backward = None, False
    while exc is not None:
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.name in COLLECTIVES:
                found = frame.name
            backward = backward or frame.name in ("_engine_run_backward", "backward")
        if found:
            return found
        exc = exc.__cause__ or exc.__context__
    return "a collective of the backward pass" if backward else None


def is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (failed_collective(exc) is not None or "gloo" in text
                                              or "NCCL" in text or "Connection closed by peer" in text)


@contextmanager
def collective_errors(what: str, timeout_s: float):
    """Turn a failed or timed-out collective inside the block into a one-line TrainingError naming this
    rank, the collective, `what` (e.g. "step 12") and the peers that are gone (see `missing_peers`). Other
    exceptions pass through unchanged."""
    try:
        yield
    except Exception as e:
        if not dist.is_initialized() or not is_comm_failure(e):
            raise
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = lines[0] if lines else type(e).__name__
        name = failed_collective(e) or "a collective"
        wait_s = min(timeout_s, CHECK_IN_S)
        gone = missing_peers(wait_s)
        if gone is None:
            who = "a peer process died, or did not join within the collective timeout"
        else:
            exited, silent = gone
            who = "; ".join(([f"{_ranks(exited)} exited"] if exited else []) +
                            ([f"{_ranks(silent)} did not answer within {wait_s:g} s (dead or stuck)"] if silent else [])
                            ) or "every rank is still alive (a collective mismatch or a network error?)"
        raise TrainingError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {name} failed during {what}: "
                            f"{who} ({first[:300]}; collective timeout {timeout_s:g} s)") from e


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


CHECK_IN_S = 5.0  # how long the survivors of a failed collective wait for each other to check in
_failures = 0  # failed collectives seen by this process: one check-in round each


def register_process() -> None:
    """Note this rank's host and pid in the group's store (every rank, once), so that after a failure a
    peer on the same host can tell that this rank's process has exited."""
    try:
        dist.distributed_c10d._get_default_store().set(f"moeforge/process/{dist.get_rank()}",
                                                        f"{socket.gethostname()} {os.getpid()}")
    except Exception:  # no store: failures are still reported, without telling exited ranks apart
        pass


def missing_peers(wait_s: float) -> tuple[list[int], list[int]] | None:
    """After a failed collective: (ranks whose process has exited, ranks that did not answer). Every
    surviving rank checks in under a key of the group's store (kept by torchrun's agent, or a file) and
    waits up to wait_s until each rank has checked in or is seen to have exited (registered on this host,
    process gone). None when the store cannot be reached (it lived in the dead rank)."""
    global _failures
    _failures += 1
    try:
        store = dist.distributed_c10d._get_default_store()
        prefix = f"moeforge/alive/{_failures}/"
        store.set(prefix + str(dist.get_rank()), "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(dist.get_world_size()) if not store.check([prefix + str(r)])]
            exited = [r for r in silent if _has_exited(store, r)]
            silent = [r for r in silent if r not in exited]
            if not silent or time.monotonic() > deadline:
                return exited, silent
            time.sleep(0.05)
    except Exception:
        return None


def _has_exited(store, rank: int) -> bool:
    key = f"moeforge/process/{rank}"
    if not store.check([key]):
        return False
    host, pid = store.get(key).decode().split()
    if host != socket.gethostname():
        return False
    try:  # a zombie (exited, not yet reaped by its launcher) has exited too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def run_training(run, run_dir, resume: bool, argv: list[str], profile_memory: bool = False,
                 allow_config_change: str = "") -> int:
    """`moeforge train`: launch torchrun (--nproc > 1, not yet under torchrun), train as one rank of a
    torchrun job, or train in this single process (also resuming a distributed checkpoint here).
    profile_memory: measure a few steps' memory and print the breakdown instead of training (one process)."""
    from ..checkpoint import latest_checkpoint
    from ..train import Trainer

    cfg = run.train
    if cfg.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {cfg.nproc}")
    if cfg.multimodal and (cfg.nproc > 1 or under_torchrun() or max(cfg.dp, cfg.ep, cfg.tp, cfg.pp) > 1):
        raise ConfigError("--multimodal trains in one process; drop --nproc and the dp/ep/tp/pp flags")
    if profile_memory and (cfg.nproc > 1 or under_torchrun()):
        raise ConfigError("--profile-memory measures one process; drop --nproc (or run it outside torchrun)")
    if cfg.nproc > 1 and not under_torchrun():
        # Check the layout here, so a bad one is one line now rather than an error from every rank.
        from .mesh import ParallelLayout

        layout = ParallelLayout.resolve(cfg.nproc, cfg.dp, cfg.ep, cfg.tp, cfg.pp, cfg.zero, cfg.cp)
        layout.check_model(run.model).check_batch(cfg.batch_size).check_trainer().check_pipeline(cfg)
        layout.check_context(cfg)
        return launch_local_ranks(cfg.nproc, strip_launch_flags(argv))
    from .trainer import DistributedTrainer, is_distributed_checkpoint

    if under_torchrun():
        # The launched ranks run without --nproc: record how many processes this machine really runs, so
        # config.toml tells the truth and a plain `--resume` relaunches the same layout.
        cfg.nproc = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.nproc))
    elif cfg.zero == 3 and not resume:
        # ZeRO-3 shards parameters over data-parallel ranks; one process has none to shard over (a resume
        # of a ZeRO-3 run in one process keeps the saved value, which then simply does not apply).
        raise ConfigError("--zero 3 shards parameters over processes; in one process it has nothing to shard: "
                          "add --nproc N (or drop --zero)")

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and not resume:
        # torchrun --max-restarts started this job again after a rank failed: continue from the last checkpoint.
        if run_dir is None and cfg.run_dir is None:
            raise ConfigError("torchrun restarted the job, but without --run-dir the ranks cannot find the run "
                              "to resume; pass --run-dir")
        run_dir = run_dir or cfg.run_dir
        resume = latest_checkpoint(run_dir) is not None
    layout_flags = cfg.dp > 1 or cfg.ep > 1 or cfg.tp > 1 or cfg.pp > 1 or cfg.cp > 1
    if layout_flags and not under_torchrun():
        cp = f" --cp {cfg.cp}" if cfg.cp > 1 else ""
        raise ConfigError(f"--dp {cfg.dp} --ep {cfg.ep} --tp {cfg.tp} --pp {cfg.pp}{cp} needs several processes: add "
                          "--nproc N or launch with torchrun (to resume in one process, pass --ep 1 ...)")
    dcp_resume = resume and run_dir is not None and is_distributed_checkpoint(latest_checkpoint(run_dir))
    if cfg.multimodal:
        from ..multimodal.train import MultimodalTrainer as Trainer  # noqa: N806
    if not (under_torchrun() or dcp_resume):
        trainer = Trainer(run, run_dir=run_dir, resume=resume, allow_config_change=allow_config_change)
        if profile_memory:
            from ..memory.report import profile_trainer

            profile_trainer(trainer)
        else:
            trainer.fit()
        return 0
    try:
        DistributedTrainer(run, run_dir=run_dir, resume=resume, allow_config_change=allow_config_change).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
