"""Where each rank's step time went, from its torch.profiler trace: compute, communication (hidden behind
compute or exposed), and idle time waiting for other ranks.

From a trace (Chrome JSON, as `export_chrome_trace` writes it) `extract` keeps what the breakdown needs:
* the step windows: `moeforge.profile.step` ranges (collect.py puts one around each training step);
* CPU runs (gloo): the main thread is computing except while it is *blocked* in communication: inside
  a `moeforge.comm.*` range (every torch.distributed call, wrapped while profiling), `moeforge.wait`
  (`Work.wait()`), a functional collective's `wait_tensor`, a `c10d::` / `_c10d_functional::` op, or
  FSDP's waits and copy-outs. The collectives themselves run on gloo's worker threads, as
  `gloo:<collective>` events;
* CUDA runs (NCCL; written, not tested on a GPU here): compute is the union of the non-NCCL kernels,
  communication the NCCL kernels (`nccl*`), each linked to its launching CPU op by the External id;
* each collective's parallel dimension: the most recent labelled range that began on the main thread
  before it started (on CUDA: before its launching op): `moeforge.ep.dispatch` / `.combine`
  (parallel/expert.py), `moeforge.comm.<dim>.<op>` (the process group's mesh dimension), FSDP's
  all-gather / reduce ranges (dp), the autograd backward of an all-to-all (ep_backward).

`analyze` lines the ranks up collective by collective (the k-th collective of a kind in a step on every
rank is the same one: the ranks run the same program) and splits each rank's part of it into *waiting*
(from its start until the last rank started it: that rank is the one waited for) and *transfer*. Then,
per rank and step, with C = compute time and NC = the rest of the step window:

    exposed = |transfer ∩ NC|, hidden = |transfer ∩ C|, idle = |NC| - exposed (waiting + gaps)
    compute + exposed + idle = step time, overlap ratio = hidden / (hidden + exposed)

The straggler is the rank whose late arrivals cost the other ranks the most exposed waiting.
"""

from __future__ import annotations

from collections import defaultdict

from .intervals import clip, intersect, length, subtract, union

STEP_RANGE = "moeforge.profile.step"
SYNC_RANGE = "moeforge.profile.sync"
COMM_PREFIX = "moeforge.comm."  # moeforge.comm.<dim>.<collective>, see collect.comm_ranges
EP_RANGES = {"moeforge.ep.dispatch": "ep_dispatch", "moeforge.ep.combine": "ep_combine"}
DIMENSIONS = ("ep_dispatch", "ep_combine", "ep_backward", "ep", "tp", "pp", "dp", "world", "other")
NCCL_OPS = {"alltoall": "all_to_all", "allreduce": "all_reduce", "allgather": "all_gather",
            "reducescatter": "reduce_scatter", "sendrecv": "send_recv", "broadcast": "broadcast", "send": "send",
            "recv": "recv"}


def range_label(name: str) -> str | None:
    """The parallel dimension a main-thread range stands for, if it stands for one."""
    if name in EP_RANGES:
        return EP_RANGES[name]
    if name.startswith(COMM_PREFIX):
        return name[len(COMM_PREFIX):].split(".")[0]
    if name.startswith("FSDP::") and ("all_gather" in name or "reduce" in name):
        return "dp"  # FSDP's collectives (not its other hooks: a collective begun after those is not theirs)
    if name.startswith("autograd::engine::evaluate_function") and "all_to_all" in name:
        return "ep_backward"  # (the forward's GeneratedBackwardFor... wrapper is not the backward)
    return None


def is_blocking(name: str) -> bool:
    """A main-thread range during which a CPU rank waits for (or hands work to) communication."""
    return (name.startswith(COMM_PREFIX) or name == "moeforge.wait" or name.endswith("wait_tensor")
            or name.startswith("c10d::")
            or name.startswith("_c10d_functional::")
            or (name.startswith("FSDP::") and ("wait" in name or "copy_out" in name)))


def _nccl_op(name: str) -> str:
    low = name.lower().replace("_", "")
    for key, op in NCCL_OPS.items():
        if key in low:
            return op
    return "nccl"


def extract(trace: dict, rank: int) -> dict:
    """The parts of one rank's Chrome trace the breakdown needs (times in µs, the trace's clock)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e.get("name") == STEP_RANGE]
    if not steps:
        raise ValueError(f"rank {rank}: the trace has no {STEP_RANGE} ranges")
    main = (steps[0]["pid"], steps[0]["tid"])
    on_main = [e for e in events if (e.get("pid"), e.get("tid")) == main]
    labelled = sorted((e["ts"], e["ts"] + e["dur"], lab) for e in on_main if (lab := range_label(e["name"])))
    kernels = [e for e in events if e.get("cat") == "kernel"]
    sync = [e["ts"] + e["dur"] for e in on_main if e.get("name") == SYNC_RANGE]
    out = {"rank": rank, "host": trace.get("host_name", ""), "device": "cuda" if kernels else "cpu",
           "steps": [(e["ts"], e["ts"] + e["dur"]) for e in sorted(steps, key=lambda e: e["ts"])],
           "sync": sync[-1] if sync else None, "blocked": [], "compute": [], "comm": []}
    if kernels:  # GPU: kernels are the work; their launching CPU ops (same External id) carry the labels
        launch = {e["args"]["External id"]: e["ts"] for e in on_main if "External id" in e.get("args", {})}
        for k in kernels:
            span = (k["ts"], k["ts"] + k["dur"])
            if "nccl" in k["name"].lower():
                at = launch.get(k.get("args", {}).get("External id"), k["ts"])
                op = _nccl_op(k["name"])
                out["comm"].append((*span, op, _label_at(labelled, at, op)))
            else:
                out["compute"].append(span)
    else:
        out["blocked"] = sorted((e["ts"], e["ts"] + e["dur"], _label_at(labelled, e["ts"], ""))
                                for e in on_main if is_blocking(e["name"]))
        for e in events:
            if e.get("name", "").startswith("gloo:") and (e.get("pid"), e.get("tid")) != main:
                op = e["name"][len("gloo:"):]
                out["comm"].append((e["ts"], e["ts"] + e["dur"], op, _label_at(labelled, e["ts"], op)))
    out["comm"].sort()
    return out


def _label_at(labelled: list, t: float, op: str) -> str:
    """The label of the most recent labelled range begun by time t; an `ep` collective inside an EP
    dispatch/combine range takes that range's name."""
    best = None
    for s, e, lab in labelled:
        if s > t:
            break
        best = (s, e, lab)
    if best is None:
        return "ep_backward" if op.startswith("all_to_all") else "other"
    s, e, lab = best
    for s2, e2, lab2 in labelled:  # a collective of the EP exchange (on whichever group) is part of it
        if lab2 in ("ep_dispatch", "ep_combine") and s2 <= s and e <= e2:
            return lab2
    return lab


def _offsets(ranks: list[dict]) -> list[float]:
    """µs to add to each rank's clock: none on one host (one monotonic clock), else align the ends of the
    barrier all ranks passed before the first profiled step."""
    if len({r["host"] for r in ranks}) <= 1 or any(r["sync"] is None for r in ranks):
        return [0.0] * len(ranks)
    return [ranks[0]["sync"] - r["sync"] for r in ranks]


def analyze(ranks: list[dict], clock_s: list[list[float]] | None = None) -> dict:
    """Per rank and step: compute, hidden/exposed communication (by dimension and collective), idle and
    waiting; the overlap ratio; the straggler. `clock_s[r][k]`: step k's wall time on rank r by a clock
    outside the profiler (reported beside the trace's step time)."""
    offsets = _offsets(ranks)
    n_steps = min(len(r["steps"]) for r in ranks)
    shift = lambda spans, d: [(s + d, e + d, *rest) for s, e, *rest in spans]  # noqa: E731
    ranks = [{**r, "steps": shift(r["steps"], d)[:n_steps], "blocked": shift(r["blocked"], d),
              "compute": shift(r["compute"], d), "comm": shift(r["comm"], d)} for r, d in zip(ranks, offsets)]
    # Per rank and step: compute C, the rest NC, and the collectives begun in the step window.
    state = [[None] * n_steps for _ in ranks]
    for i, r in enumerate(ranks):
        for k, (s, e) in enumerate(r["steps"]):
            win = [(s, e)]
            if r["device"] == "cpu":
                busy = subtract(win, union((b[0], b[1]) for b in r["blocked"]))
            else:
                busy = clip(union(r["compute"]), s, e)
            events = [list(c) for c in r["comm"] if s <= c[0] < e]
            state[i][k] = {"win": win, "C": busy, "NC": subtract(win, busy), "events": events}
    # Line the collectives up over ranks: the k-th collective of a kind in a step is one operation (by kind
    # only: the dimension is read from timing and could differ between ranks).
    credit = [0.0] * len(ranks)  # exposed waiting this rank's late arrivals caused on the others
    matched = unmatched = 0
    for k in range(n_steps):
        kinds = defaultdict(lambda: [[] for _ in ranks])
        for i in range(len(ranks)):
            for ev in state[i][k]["events"]:
                kinds[ev[2]][i].append(ev)
        for lists in kinds.values():
            if len({len(x) for x in lists}) != 1 or len(ranks) == 1:
                unmatched += sum(len(x) for x in lists)
                for x in lists:
                    for ev in x:
                        ev.append(None)  # no wait split: all of it counts as transfer
                continue
            for group in zip(*lists):
                matched += 1
                last_rank = max(range(len(group)), key=lambda i: group[i][0])
                last = group[last_rank][0]
                for i, ev in enumerate(group):
                    wait = (ev[0], min(last, ev[1])) if last > ev[0] else None
                    ev.append(wait)
                    if wait and i != last_rank:
                        credit[last_rank] += length(intersect([wait], state[i][k]["NC"]))
    report_ranks, totals = [], defaultdict(float)
    lanes = []
    for i, r in enumerate(ranks):
        steps, lane = [], {"compute": [], "exposed": [], "hidden": [], "idle": []}
        for k in range(n_steps):
            st = state[i][k]
            win, C, NC = st["win"], st["C"], st["NC"]
            waits = union(ev[4] for ev in st["events"] if ev[4])
            per_label, per_op = defaultdict(list), defaultdict(list)
            for s, e, op, lab, wait in st["events"]:
                span = (max(s, wait[1]) if wait else s, e)
                per_label[lab].append(span)
                per_op[op].append(span)
            for s, e, lab in r["blocked"]:  # CPU: time the main thread spent in communication calls
                if s < win[0][1] and e > win[0][0]:
                    per_label[lab].append((s, e))
            transfer = clip(union(sp for v in per_label.values() for sp in v), *win[0])
            transfer = subtract(transfer, waits)
            exposed, hidden = intersect(transfer, NC), intersect(transfer, C)
            idle = subtract(NC, exposed)
            step_s = length(win) / 1e6
            by_dim = {}
            for lab, spans in per_label.items():
                t = subtract(clip(union(spans), *win[0]), waits)
                by_dim[lab] = {"total_s": length(t) / 1e6, "hidden_s": length(intersect(t, C)) / 1e6,
                               "exposed_s": length(intersect(t, NC)) / 1e6}
            by_op = {op: length(subtract(clip(union(spans), *win[0]), waits)) / 1e6 for op, spans in per_op.items()}
            row = {"step": k, "step_s": step_s, "compute_s": length(C) / 1e6, "comm_s": length(transfer) / 1e6,
                   "hidden_comm_s": length(hidden) / 1e6, "exposed_comm_s": length(exposed) / 1e6,
                   "idle_s": length(idle) / 1e6, "waiting_s": length(intersect(waits, NC)) / 1e6,
                   "comm_by_dimension": by_dim, "comm_by_collective": by_op}
            row["overlap_ratio"] = row["hidden_comm_s"] / row["comm_s"] if row["comm_s"] > 0 else None
            if clock_s is not None:
                row["clock_step_s"] = clock_s[i][k]
            steps.append(row)
            for key in ("compute", "exposed", "hidden", "idle"):
                lane[key] += {"compute": C, "exposed": exposed, "hidden": hidden, "idle": idle}[key]
            totals["hidden"] += row["hidden_comm_s"]
            totals["comm"] += row["comm_s"]
        lanes.append({"rank": r["rank"], "start": ranks[0]["steps"][0][0], "spans": lane})
        report_ranks.append({"rank": r["rank"], "device": r["device"], "steps": steps, "mean": _mean(steps)})
    straggler = None
    if len(ranks) > 1 and max(credit) > 0:
        worst = max(range(len(ranks)), key=lambda i: credit[i])
        straggler = {"rank": ranks[worst]["rank"], "others_wait_s_per_step": credit[worst] / n_steps / 1e6,
                     "wait_caused_s_per_step": {str(r["rank"]): c / n_steps / 1e6 for r, c in zip(ranks, credit)}}
    return {"ranks": report_ranks, "overlap_ratio": totals["hidden"] / totals["comm"] if totals["comm"] else None,
            "straggler": straggler, "collectives_matched": matched, "collectives_unmatched": unmatched,
            "_lanes": lanes}


def _mean(steps: list[dict]) -> dict:
    """Mean over steps of the scalar fields, and of each dimension's and collective's seconds."""
    n = len(steps)
    out = {k: sum(s[k] for s in steps) / n for k in steps[0] if isinstance(steps[0][k], float)
           and k != "overlap_ratio"}
    comm = out.get("comm_s", 0.0)
    out["overlap_ratio"] = out["hidden_comm_s"] / comm if comm > 0 else None
    dims = sorted({d for s in steps for d in s["comm_by_dimension"]}, key=_dim_order)
    out["comm_by_dimension"] = {d: {f: sum(s["comm_by_dimension"].get(d, {}).get(f, 0.0) for s in steps) / n
                                    for f in ("total_s", "hidden_s", "exposed_s")} for d in dims}
    ops = sorted({o for s in steps for o in s["comm_by_collective"]})
    out["comm_by_collective"] = {o: sum(s["comm_by_collective"].get(o, 0.0) for s in steps) / n for o in ops}
    return out


def _dim_order(d: str) -> int:
    return DIMENSIONS.index(d) if d in DIMENSIONS else len(DIMENSIONS)
