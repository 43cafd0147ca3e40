"""The printed table of a profile and its timeline picture (one lane per rank)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"compute": "#4C72B0", "exposed": "#DD8452", "idle": "#BBBBBB", "hidden": "#55A868"}


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def table(profile: dict) -> str:
    """Per-rank means (ms per step), the dimensions' communication, the straggler and measured vs predicted."""
    lines = [f"moeforge profile: {profile['steps']} steps after {profile['warmup']} warm-up, "
             f"{profile['world']} rank(s), {profile['layout_text']}, {profile['device']}",
             "", "per rank, ms per step (mean): compute + exposed comm + idle = step",
             f"{'rank':>4} {'step':>8} {'clock':>8} {'compute':>8} {'exposed':>8} {'idle':>8} {'(wait)':>8} "
             f"{'hidden':>8} {'comm':>8} {'overlap':>8}"]
    for r in profile["ranks"]:
        m = r["mean"]
        overlap = "-" if m["overlap_ratio"] is None else f"{m['overlap_ratio']:.2f}"
        lines.append(f"{r['rank']:>4} {_ms(m['step_s']):>8} {_ms(m.get('clock_step_s')):>8} {_ms(m['compute_s']):>8} "
                     f"{_ms(m['exposed_comm_s']):>8} {_ms(m['idle_s']):>8} {_ms(m['waiting_s']):>8} "
                     f"{_ms(m['hidden_comm_s']):>8} {_ms(m['comm_s']):>8} {overlap:>8}")
    rows = [r.get("expert_rows_per_step") for r in profile["ranks"]]
    if profile["layout"].get("ep", 1) > 1 and all(x is not None for x in rows):
        lines += ["", "routed-expert rows computed per step (tokens x experts of the rank's EP shard): "
                  + ", ".join(f"r{r['rank']}: {x:.0f}" for r, x in zip(profile["ranks"], rows))]
    dims = sorted({d for r in profile["ranks"] for d in r["mean"]["comm_by_dimension"]},
                  key=lambda d: list(profile["ranks"][0]["mean"]["comm_by_dimension"]).index(d)
                  if d in profile["ranks"][0]["mean"]["comm_by_dimension"] else 99)
    if dims:
        lines += ["", "communication by dimension, ms per step (total / exposed), per rank"]
        for d in dims:
            cells = []
            for r in profile["ranks"]:
                v = r["mean"]["comm_by_dimension"].get(d)
                cells.append("-" if v is None else f"{_ms(v['total_s'])} / {_ms(v['exposed_s'])}")
            lines.append(f"  {d:<12} " + "   ".join(f"r{r['rank']}: {c:<14}" for r, c in zip(profile["ranks"], cells)))
    ratio = profile["overlap_ratio"]
    lines += ["", f"overlap ratio (hidden / all communication): {'-' if ratio is None else f'{ratio:.2f}'}"]
    s = profile["straggler"]
    lines.append("straggler: none (no rank waited for another)" if s is None else
                 f"straggler: rank {s['rank']} (the others wait {_ms(s['others_wait_s_per_step'])} ms per step "
                 "for it)")
    pred = profile["prediction"]
    if "error" in pred:
        lines += ["", f"planner: no prediction ({pred['error']})"]
    else:
        lines += ["", f"measured (rank {profile['slowest_rank']}, the slowest) vs planner ({pred['hardware']}, "
                      f"{pred['layout']}, overlap {_overlap(pred['assumed_overlap'])}), ms per step",
                  f"  {'component':<38} {'measured':>9} {'predicted':>9}"]
        for row in profile["comparison"]:
            lines.append(f"  {row['component']:<38} {_ms(row['measured_s']):>9} {_ms(row['predicted_s']):>9}")
    return "\n".join(lines)


def _overlap(assumed: float | None) -> str:
    """The planner's overlap setting: a fixed hidden fraction, or None = derived from the schedule."""
    return "from the schedule" if assumed is None else f"{assumed:g} assumed"


def timeline(lanes: list[dict], path: Path, title: str = "") -> Path:
    """One lane per rank over the profiled steps: compute, exposed communication, idle; hidden communication
    as a thin bar under the compute it overlaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(lane["start"] for lane in lanes)
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(lanes) + 1.4), dpi=90)
    for y, lane in enumerate(lanes):
        for kind in ("compute", "exposed", "idle"):
            spans = [((s - t0) / 1e3, (e - s) / 1e3) for s, e in lane["spans"][kind]]
            ax.broken_barh(spans, (y - 0.35, 0.7), color=COLORS[kind], linewidth=0)
        spans = [((s - t0) / 1e3, (e - s) / 1e3) for s, e in lane["spans"]["hidden"]]
        ax.broken_barh(spans, (y - 0.45, 0.12), color=COLORS["hidden"], linewidth=0)
    ax.set_yticks(range(len(lanes)), [f"rank {lane['rank']}" for lane in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first profiled step began")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=COLORS[k], label=label) for k, label in
                       (("compute", "compute"), ("exposed", "exposed communication"), ("idle", "idle / waiting"),
                        ("hidden", "communication hidden behind compute"))],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(lanes) < 3 else -0.2), ncol=4, fontsize=8,
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
