"""`moeforge profile`: build the trainer a `moeforge train` with the same flags would build, profile N steps
on every rank, and (rank 0) gather the ranks' breakdowns into DIR/profile.json, DIR/timeline.png and the
planner's prediction beside them."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

LAYOUT_FIELDS = ("dp", "ep", "tp", "pp", "zero")


def profile_run(run, out: Path, steps: int, warmup: int, hardware: str | None = None,
                command: str = "") -> dict | None:
    """Profile `steps` training steps of `run` (this process, or this rank of a torchrun job) after `warmup`;
    rank 0 writes and returns the profile (other ranks return None)."""
    import torch.distributed as dist

    from ..parallel.launch import under_torchrun
    from ..train import Trainer
    from .analyze import analyze, extract
    from .collect import profile_steps, read_trace
    from .predict import comparison, default_hardware, predict
    from .render import timeline

    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    out = Path(out)
    distributed = under_torchrun()
    owns_group = not dist.is_initialized()  # the trainer joins the torchrun job; a caller's group is left alone
    if distributed:
        from ..parallel.trainer import DistributedTrainer

        trainer = DistributedTrainer(run, run_dir=out / "run")
        rank, world = dist.get_rank(), dist.get_world_size()
        layout = {k: getattr(trainer.layout, k) for k in LAYOUT_FIELDS}
        rows = run.train.batch_size * run.train.grad_accum // layout["dp"]  # sequences per dp rank and step
        micro = trainer.pipeline.n_microbatches if trainer.pipeline is not None else run.train.grad_accum
        layout["micro_batch"] = max(1, rows // micro)
        layout_text = trainer.layout.describe()
    else:
        trainer = Trainer(run, run_dir=out / "run")
        rank, world = 0, 1
        layout = {"dp": 1, "ep": 1, "tp": 1, "pp": 1, "zero": 0, "micro_batch": run.train.batch_size}
        layout_text = "one process"
    try:
        trace_path = out / "trace" / f"rank{rank}.json"
        clock, counts = profile_steps(trainer, steps, warmup, trace_path, distributed)
        ep_rank = trainer.mesh["ep"].get_local_rank() if distributed else 0
        edp = trainer.layout.edp if distributed else 1
        mine = (extract(read_trace(trace_path), rank), clock, expert_rows(counts, ep_rank, layout["ep"], edp))
        gathered = [None] * world if rank == 0 else None
        if distributed:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
    finally:
        if distributed and owns_group:
            dist.destroy_process_group()
    if rank != 0:
        return None
    result = analyze([g[0] for g in gathered], [g[1] for g in gathered])
    lanes = result.pop("_lanes")
    for r in result["ranks"]:
        r["expert_rows_per_step"] = gathered[r["rank"]][2]
    # The planner models the slowest rank: the straggler (the ranks' step times are equal, they wait for it).
    by_rank = {r["rank"]: r for r in result["ranks"]}
    slowest = by_rank[result["straggler"]["rank"]] if result["straggler"] else \
        max(result["ranks"], key=lambda r: r["mean"]["step_s"])
    hardware = hardware or default_hardware(trainer.device.type)
    prediction = predict(trainer.run, layout, world, hardware)
    profile = {"command": command, "steps": steps, "warmup": warmup, "world": world, "device": str(trainer.device),
               "precision": trainer.cfg.precision, "routing": trainer.cfg.routing,
               "ep_overlap_shared": trainer.cfg.ep_overlap_shared, "layout": layout, "layout_text": layout_text,
               **result, "slowest_rank": slowest["rank"], "prediction": prediction,
               "comparison": comparison(slowest["mean"], prediction),
               "traces": [f"trace/rank{r}.json" for r in range(world)]}
    (out / "profile.json").write_text(json.dumps(profile, indent=1) + "\n")
    timeline(lanes, out / "timeline.png", title=f"{layout_text}, routing {trainer.cfg.routing}, "
                                                f"{steps} steps")
    return profile


def expert_rows(counts, ep_rank: int, ep: int, edp: int) -> float | None:
    """Routed (token, expert) rows a rank's experts computed per step: the step's global counts of the
    experts its EP shard holds, shared by its `edp` expert-data-parallel replicas. Not a timing: it says
    why a rank is the straggler (routing imbalance) independently of the machine's noise."""
    if counts is None:
        return None
    per = counts.shape[1] // ep
    return float(counts[:, ep_rank * per:(ep_rank + 1) * per].sum()) / edp
