"""Run training steps of the real trainer under torch.profiler and write each rank's Chrome trace.

The trainer is used as is (`Trainer` in one process, `DistributedTrainer` on each torchrun rank): a few
warm-up steps, then N steps, each inside a `moeforge.profile.step` range and timed by a clock too. While
profiling, every `torch.distributed` collective call, and every functional collective (what DTensor's
redistributes run: tensor parallelism's all-reduces and all-gathers, in forward and backward), is wrapped
in a `moeforge.comm.<dim>.<collective>` range (`comm_ranges`), the dimension read from the process group
(one of the trainer's mesh groups, else its mesh name), so the trace shows which parallel dimension each
collective serves without the callers knowing about profiling; `Work.wait()`
(an async collective's completion, e.g. FSDP's and the pipeline's) runs inside a `moeforge.wait` range. Before each
profiled step the ranks meet at a barrier (outside the step ranges), so the steps start together and a
rank's waiting inside a step is caused by that step.
"""

from __future__ import annotations

import inspect
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.profiler import ProfilerActivity, profile, record_function

from .analyze import COMM_PREFIX, STEP_RANGE, SYNC_RANGE

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
           "all_to_all", "all_to_all_single", "broadcast", "barrier", "send", "recv", "batch_isend_irecv", "gather",
           "scatter", "reduce", "all_gather_object", "broadcast_object_list", "gather_object")
# (isend / irecv stay as they are: P2POp checks its op *is* one of them; batch_isend_irecv covers the pipeline.)
FUNCOL_WRAPPED = ("broadcast", "all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_tensor",
                  "reduce_scatter_tensor", "all_reduce_coalesced", "all_gather_into_tensor_coalesced",
                  "reduce_scatter_tensor_coalesced", "all_to_all_single", "all_gather_tensor_autograd",
                  "reduce_scatter_tensor_autograd", "permute_tensor")
# (functional collectives as DTensor calls them, `funcol.<name>(..., group=(mesh, dim))`; code that imported
# a function by name, as parallel/expert.py does, keeps the original: its EP ranges label it already.)
WAIT_RANGE = "moeforge.wait"  # around Work.wait(): an async collective's completion waited for
MESH_DIMS = {"mesh_ep": "ep", "mesh_tp": "tp", "mesh_pp": "pp", "mesh_dp": "dp", "mesh_edp": "dp"}
DIM_PRIORITY = ("pp", "tp", "dp", "edp", "ep")  # a group that is several dims (all ranks): the first one


def mesh_groups(trainer) -> list[tuple[object, str]]:
    """(process group, dimension) of the trainer's mesh dims of size > 1, in DIM_PRIORITY order. (A dim
    spanning every rank is the default group itself: its name would say "default_pg".)"""
    mesh = getattr(trainer, "mesh", None)
    if mesh is None:
        return []
    out = []
    for dim in DIM_PRIORITY:
        sub = mesh[dim]
        if sub.size() > 1:
            out.append((sub.get_group(), "dp" if dim == "edp" else dim))
    return out


def group_dimension(group, groups: list[tuple[object, str]] = ()) -> str:
    """The mesh dimension a collective's process group stands for: "world" for the default group (passed as
    None), else looked up among the trainer's mesh groups, else from the group's name. `group`: a
    ProcessGroup, or any group form functional collectives take ((mesh, dim), a mesh, a group name)."""
    if group is None:  # the default group: the trainer's own bookkeeping over all ranks
        return "world"
    for g, dim in groups:
        if g is group:
            return dim
    name = _group_name(group)
    if name is not None:
        for g, dim in groups:
            if g.group_name == name:
                return dim
        try:
            group = dist.distributed_c10d._resolve_process_group(name)
        except (ValueError, RuntimeError, KeyError):
            return "other"
    desc = getattr(group, "group_desc", "") or ""
    return MESH_DIMS.get(desc, "world" if desc in ("", "default_pg") else "other")


def _group_name(group) -> str | None:
    """The c10d name of a group in any form functional collectives accept, None if it has none."""
    if isinstance(group, dist.ProcessGroup):
        return group.group_name
    try:
        return str(funcol._resolve_group_name(group))
    except (ValueError, TypeError, AttributeError, RuntimeError, KeyError):
        return None


def _wrap(name: str, fn, groups, prefix: str = ""):
    try:
        position = list(inspect.signature(fn).parameters).index("group")
    except (ValueError, TypeError):
        position = None

    def wrapped(*args, **kwargs):
        group = kwargs.get("group")
        if group is None and position is not None and len(args) > position:
            group = args[position]
        if name == "batch_isend_irecv" and args and args[0]:
            group = args[0][0].group
        with record_function(f"{COMM_PREFIX}{group_dimension(group, groups)}.{prefix}{name}"):
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


@contextmanager
def comm_ranges(groups: list[tuple[object, str]] = ()):
    """Wrap the torch.distributed and functional collectives in record_function ranges (restored on exit);
    `groups`: (process group, dimension) pairs to name them by (`mesh_groups`)."""
    originals = {name: getattr(dist, name) for name in WRAPPED if hasattr(dist, name)}
    functional = {name: getattr(funcol, name) for name in FUNCOL_WRAPPED if hasattr(funcol, name)}
    wait = dist.Work.wait

    def timed_wait(work, *args, **kwargs):
        with record_function(WAIT_RANGE):
            return wait(work, *args, **kwargs)

    try:
        for name, fn in originals.items():
            setattr(dist, name, _wrap(name, fn, list(groups)))
        for name, fn in functional.items():
            setattr(funcol, name, _wrap(name, fn, list(groups), prefix="functional."))
        dist.Work.wait = timed_wait
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for name, fn in functional.items():
            setattr(funcol, name, fn)
        dist.Work.wait = wait


def profile_steps(trainer, steps: int, warmup: int, trace_path: Path, distributed: bool):
    """Warm up, then run `steps` training steps under the profiler; write the Chrome trace. -> (the clock's
    wall seconds of each profiled step, the mean [MoE layers, experts] routed-token counts of those steps
    or None when the metrics carry no `expert_counts`)."""
    cuda = trainer.device.type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
        trainer.step += 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    clock, counts = [], []
    with comm_ranges(mesh_groups(trainer)), profile(activities=activities) as prof:
        if distributed:
            with record_function(SYNC_RANGE):
                dist.barrier()
        for _ in range(steps):
            if distributed:
                dist.barrier()
            t0 = time.perf_counter()
            with record_function(STEP_RANGE):
                metrics = trainer.train_step()
                if cuda:
                    torch.cuda.synchronize()
            clock.append(time.perf_counter() - t0)
            if "expert_counts" in metrics:
                counts.append(torch.tensor(metrics["expert_counts"], dtype=torch.float64))
            trainer.step += 1
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    return clock, (torch.stack(counts).mean(0) if len(counts) == steps else None)


def read_trace(path: Path) -> dict:
    return json.loads(Path(path).read_text())
