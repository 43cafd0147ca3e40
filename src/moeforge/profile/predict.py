"""The planner's prediction for the run being profiled, through its public entry point (`moeforge.plan.plan`
with one given layout), and the measured-vs-predicted rows.

The planner models a step as compute + bubble + TP + exposed EP/PP + exposed DP on the slowest rank; the
measured side is the slowest rank's mean step, with its exposed communication summed by dimension and its
idle time (waiting for other ranks, pipeline bubbles) set against the bubble.
"""

from __future__ import annotations

from ..errors import MoeforgeError

SCHEDULES = {"dualpipev": "dualpipev"}  # modelled as themselves by the planner; the others as 1F1B
RECOMPUTE = {"none": "none", "full": "full", "selective": "selective", "auto": "selective"}


def default_hardware(device: str) -> str:
    """`cpu` (this machine, measured) for CPU runs; for a GPU, its catalogue name if there is one, else h100."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    from ..plan.catalog import CATALOG

    name = torch.cuda.get_device_name().lower()
    return next((key for key in CATALOG if key in name.replace(" ", "")), "h100")


def predict(run, layout: dict, world: int, hardware: str) -> dict:
    """The planner's breakdown (seconds) of this run's step: {hardware, layout, parts_s, total_s} or {error}."""
    from dataclasses import replace

    from ..plan import Layout, TrainSettings, get_hardware, plan
    from ..plan.models import from_moe

    cfg = run.train
    precision = cfg.precision if cfg.precision in ("fp32", "bf16") else "fp8" if cfg.precision.startswith("fp8") \
        else "bf16"
    width = 4.0 if precision == "fp32" else 2.0
    try:
        settings = TrainSettings(seq_len=cfg.seq_len, global_batch=cfg.batch_size * cfg.grad_accum,
                                 precision=precision, node_limit=None, act_bytes=width, weight_bytes=width,
                                 grad_comm_bytes=width, combine_bytes=width,
                                 dispatch_bytes=width if cfg.ep_dispatch == "compute" else 1.0)
        lo = Layout(dp=layout["dp"], tp=layout["tp"], pp=layout["pp"], ep=layout["ep"],
                    zero=layout["zero"] if layout["dp"] > 1 else 0,
                    schedule=SCHEDULES.get(cfg.pp_schedule, "1f1b"),
                    micro_batch=layout["micro_batch"],
                    recompute=RECOMPUTE.get(cfg.activation_checkpointing, "none"))
        hw = get_hardware(hardware)
        if hardware == "cpu":  # the run's processes share this one machine: one node of `world` ranks
            hw = replace(hw, gpus_per_node=max(hw.gpus_per_node, world))
        result = plan(from_moe(run.model, cfg.preset), hw, world, settings, layout=lo, top=1)
    except (MoeforgeError, KeyError, TypeError, ValueError) as e:  # the planner cannot model this run
        return {"hardware": hardware, "error": f"{type(e).__name__}: {e}"}
    step = result.best.step
    return {"hardware": hardware, "layout": lo.short(), "assumed_overlap": settings.overlap,
            "parts_s": dict(step.parts()), "total_s": step.total}


def comparison(measured: dict, prediction: dict) -> list[dict]:
    """Rows {component, measured_s, predicted_s}: `measured` is one rank's mean step (analyze)."""
    dims = measured["comm_by_dimension"]
    exposed = lambda *names: sum(dims.get(n, {}).get("exposed_s", 0.0) for n in names)  # noqa: E731
    ep = exposed("ep_dispatch", "ep_combine", "ep_backward", "ep")
    tp, pp, dp = exposed("tp"), exposed("pp"), exposed("dp")
    parts = prediction.get("parts_s", {})
    rows = [("compute", measured["compute_s"], parts.get("compute")),
            ("EP all-to-all (exposed)", ep, parts.get("EP all-to-all (exposed)")),
            ("TP all-reduce (exposed)", tp, parts.get("TP all-reduce")),
            ("PP send/recv (exposed)", pp, parts.get("PP send/recv (exposed)")),
            ("DP gradient sync (exposed)", dp, parts.get("DP gradient sync (exposed)")),
            ("other exposed communication", max(0.0, measured["exposed_comm_s"] - ep - tp - pp - dp), None),
            ("idle / waiting (vs pipeline bubble)", measured["idle_s"], parts.get("pipeline bubble")),
            ("step", measured["step_s"], prediction.get("total_s"))]
    return [{"component": c, "measured_s": m, "predicted_s": p} for c, m, p in rows]
