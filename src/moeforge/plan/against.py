"""`moeforge plan --against RUN_DIR`: the planner's prediction for a finished local run next to what
the run measured (median step time from metrics.jsonl; memory from memory.json where the run was
profiled with --profile-memory).

Why: a step-time model is only as good as its checks on runs it did not see. The run's config.toml
gives the model and the layout; the device is this machine, measured (`device.CPUDevice`: GEMMs at the
run's own shapes, element-wise bandwidth, dispatch cost, loopback sockets for gloo), with the eager
implementation moeforge's trainer runs. Nothing is fitted to the run's measured time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, load_toml, resolve_run_config
from ..errors import ConfigError
from .layout import Layout, TrainSettings
from .models import from_moe

SCHEDULES = {"gpipe": "1f1b", "1f1b": "1f1b", "interleaved-1f1b": "interleaved-1f1b", "dualpipev": "dualpipev"}
WARMUP_STEPS = 2  # the first steps build lazy state (oneDNN kernels, allocator, FSDP buffers)


@dataclass(frozen=True)
class RunRecord:
    run_dir: Path
    run: RunConfig
    step_times: list  # seconds per optimizer step, from tokens_per_s
    memory: dict | None  # memory.json (--profile-memory), if any
    processes: int  # ranks the run had (see `infer_processes`)
    cpu_times: list = ()  # rank 0's CPU seconds per step (cpu_s; runs since the step clock)
    runq_times: list = ()  # rank 0's run-queue delay per step (runq_s: runnable, no core free)
    expert_counts: list = ()  # per step: [MoE layer][expert] tokens routed, over all ranks

    def rank0_expert_load(self, ep: int) -> float:
        """Rank 0's routed-expert rows over the mean EP rank's, over the timed steps: rank 0 runs the first
        E/ep experts (parallel/expert.py). 1 without EP, without logged counts, or with redundant experts
        (their placement moves)."""
        counts = _timed(self.expert_counts)
        if ep <= 1 or not counts or self.run.train.redundant_experts:
            return 1.0
        mine = total = 0
        for layers in counts:
            for row in layers:
                mine += sum(row[: len(row) // ep])
                total += sum(row)
        return mine * ep / total if total else 1.0

    @property
    def measured(self) -> float:
        return statistics.median(_timed(self.step_times))

    @property
    def measured_cpu(self) -> float | None:
        return statistics.median(_timed(self.cpu_times)) if self.cpu_times else None

    @property
    def measured_blocked(self) -> float | None:
        """Median seconds per step rank 0 was neither on a core nor waiting for one: waiting for peers
        (collectives, pipeline sends), the bubble. wall = CPU + run-queue delay + blocked."""
        if not self.cpu_times or len(self.runq_times) != len(self.cpu_times):
            return None
        return statistics.median(_timed([w - c - q for w, c, q in zip(self.step_times, self.cpu_times, self.runq_times)]))

    @property
    def cpu_share(self) -> float | None:
        """The fraction of a core rank 0 got while it could run: CPU / (CPU + run-queue delay), median over
        the timed steps. Blocked time (waiting for a peer) is in neither, so it does not lower the share."""
        if not self.cpu_times or len(self.runq_times) != len(self.cpu_times):
            return None
        shares = [c / (c + q) for c, q in zip(self.cpu_times, self.runq_times) if c > 0]
        return min(1.0, statistics.median(_timed(shares))) if shares else None


def _timed(values):
    return list(values[WARMUP_STEPS:]) or list(values)


def infer_processes(d: Path, run: RunConfig) -> int:
    """config.toml keeps `nproc = 1` for a launched run (the ranks drop the flag) and `dp = 0` (auto), so
    the world size is read from the newest distributed checkpoint (one __RANK_0.distcp file per rank),
    and is at least what the degrees need."""
    t = run.train
    shards = 0
    ckpts = sorted((d / "checkpoints").glob("step-*")) if (d / "checkpoints").is_dir() else []
    if ckpts:
        shards = len(list(ckpts[-1].glob("__*_0.distcp")))
    need = max(t.dp or 1, t.ep) * t.tp * t.pp
    return max(1, t.nproc, shards, need)


def read_run(run_dir: str | Path, processes: int | None = None) -> RunRecord:
    """The run's resolved config and per-step times; a torn last metrics line is dropped (metrics_file)."""
    from ..metrics_file import read_metrics

    d = Path(run_dir)
    if not (d / "config.toml").is_file():
        raise ConfigError(f"{d}: not a run folder (no config.toml)")
    run = resolve_run_config(load_toml(d / "config.toml"))
    metrics = d / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{d}: no metrics.jsonl (did the run start?)")
    rows = read_metrics(metrics, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    t = run.train
    tokens = t.batch_size * t.seq_len * t.grad_accum
    timed = [r for r in rows if r.get("tokens_per_s") and not r.get("skipped")]
    times = [tokens / r["tokens_per_s"] for r in timed]
    cpu = [r["cpu_s"] for r in timed if "cpu_s" in r]
    runq = [r["runq_s"] for r in timed if "runq_s" in r]
    if not times:
        raise ConfigError(f"{d}/metrics.jsonl: no timed steps (tokens_per_s) to compare with")
    mem = None
    if (d / "memory.json").is_file():
        try:
            mem = json.loads((d / "memory.json").read_text())
        except ValueError:
            mem = None
    cpu = cpu if len(cpu) == len(times) else []
    counts = [r["expert_counts"] for r in timed if "expert_counts" in r]
    return RunRecord(d, run, times, mem, processes or infer_processes(d, run), cpu, runq if cpu else [],
                     counts if len(counts) == len(times) else [])


def pipeline_microbatches(t) -> int:
    """Micro-batches of one step on a pipeline rank (the trainer's default: 1 per stage it holds, x pp); 1
    without pipeline stages."""
    if t.pp <= 1:
        return 1
    chunks = 2 if t.pp_schedule in ("interleaved-1f1b", "dualpipev") else 1
    return t.pp_microbatches or t.pp * chunks


def run_layout(run: RunConfig, world: int) -> tuple[Layout, TrainSettings]:
    """moeforge train's flags as a planner layout and settings (fp32 or bf16 compute on this CPU)."""
    t = run.train
    dp = t.dp or world // (t.tp * t.pp)
    if dp * t.tp * t.pp != world:
        raise ConfigError(f"run layout dp={dp} x tp={t.tp} x pp={t.pp} != {world} processes")
    if t.batch_size % dp:
        raise ConfigError(f"batch_size {t.batch_size} is not a multiple of dp={dp}")
    schedule = SCHEDULES.get(t.pp_schedule, "1f1b") if t.pp > 1 else "1f1b"
    per_rank = t.batch_size // dp
    micro = max(1, per_rank // pipeline_microbatches(t))
    zero = 0 if dp == 1 or t.pp > 1 else (3 if t.zero == 3 else 2)  # PP x DP: DDP-like all-reduce
    recompute = {"none": "none", "selective": "selective", "full": "full"}.get(t.activation_checkpointing, "none")
    lo = Layout(dp=dp, tp=t.tp, pp=t.pp, ep=t.ep, zero=zero, schedule=schedule, micro_batch=micro,
                recompute=recompute)
    bf16 = t.precision in ("bf16", "fp8", "fp8-tensorwise")
    act = 2.0 if bf16 else 4.0
    moments = 2.0 if t.optimizer_state_dtype == "bf16" else 4.0
    dispatch = {"fp8": 1 + 4 / 128, "logfmt": 1 + 8 / 128}.get(t.ep_dispatch, act)
    s = TrainSettings(seq_len=t.seq_len, global_batch=t.batch_size * t.grad_accum,
                      precision="bf16" if bf16 else "fp32", node_limit=None, dispatch_bytes=dispatch,
                      combine_bytes=act, weight_bytes=4.0, master_bytes=0.0, grad_bytes=4.0, moment_bytes=moments,
                      act_bytes=act, grad_comm_bytes=4.0, memory_headroom=1.0, sequence_parallel=False)
    return lo, s


def predict_run(rec: RunRecord, device=None, threads: int | None = None, run_share: float | None = None,
                with_layout_overhead: bool = True):
    """(layout, settings, StepTime, rank 0's CPU seconds) predicted for the run on this machine, measured
    now. threads: per rank (default: OMP_NUM_THREADS, else the cores shared evenly, as `moeforge train
    --nproc` does). run_share: the CPU share the run's ranks got while runnable (default: the run's own
    step clock, else the load measured now, `CPUDevice.slowdown`). with_layout_overhead: add the host work
    the layout adds beyond every other component (layout_overhead.py)."""
    from dataclasses import replace

    from . import network as net
    from .device import CPUDevice
    from .steptime import _stage_step_time, step_time

    lo, s = run_layout(rec.run, rec.processes)
    s = replace(s, expert_load=rec.rank0_expert_load(lo.ep))  # the measured routing, not a fitted constant
    model = from_moe(rec.run.model, rec.run.train.preset)
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or max(1, (os.cpu_count() or 1) // rec.processes)
    if run_share is None:
        run_share = rec.cpu_share
    if device is None:
        device = CPUDevice(threads=threads, ranks=rec.processes, run_share=run_share)
    if device.host is None:
        device.host = host_costs(rec.run, device)
    hw = local_cpu_hardware(device)
    link = gloo_link(device) if rec.processes > 1 else net.Link(device.rates["socket_bw"], 0.0)
    topo = net.Topology("nvswitch", lo.gpus, lo.gpus, link, link)
    st = step_time(model, hw, topo, lo, s, device=device)
    own = replace(device, run_share=1.0)  # rank 0 (the first stage) on a core of its own: CPU seconds
    cpu = _stage_step_time(model, hw, topo, lo, s, own, 0).compute
    host = 0.0
    extras = {"fsdp2/dtensor host": wrapper_seconds(rec, lo, device),
              "layout host (8-token run)": layout_overhead_s(rec, lo, device, threads) if with_layout_overhead else 0.0}
    for kind, seconds in extras.items():
        if seconds:
            host += seconds
            st = replace(st, compute=st.compute + seconds * device.slowdown,
                         total=st.total + seconds * device.slowdown,
                         by_kind={**st.by_kind, kind: seconds * device.slowdown})
    return lo, s, st, cpu + host


def layout_overhead_s(rec: RunRecord, lo: Layout, device, threads: int) -> float:
    """Rank 0's CPU seconds per step that the run's distributed layout adds beyond every priced component:
    the layout trained at 8 tokens (layout_overhead.py) minus this planner's price of that small run;
    cached with the device's timings. 0 for one process (host_cost.py measures that case directly)."""
    import tempfile

    from .host_cost import run_key
    from .layout_overhead import train_small

    t = rec.run.train
    if rec.processes <= 1:
        return 0.0
    n_mb = pipeline_microbatches(t)
    degrees = f"dp{lo.dp}tp{lo.tp}pp{lo.pp}ep{lo.ep}cp{t.cp}z{lo.zero}mb{n_mb}"  # not the batch: measured at 8 tokens
    key = (f"layout-overhead|{run_key(rec.run)}|{degrees}|{rec.processes}|{t.pp_schedule}|{t.ep_dispatch}|"
           f"{t.ep_overlap_shared}|{t.grad_accum}|{threads}")

    def measure() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            small = read_run(train_small(rec.run, rec.processes, lo.dp, n_mb, Path(tmp), threads), rec.processes)
            *_, priced = predict_run(small, device, threads, with_layout_overhead=False)
            return max(0.0, small.measured_cpu - priced) if small.measured_cpu else 0.0

    try:
        seconds = device.cache.get(key, measure)
    except ConfigError as e:
        print(f"moeforge plan: {e}; it is left out", file=sys.stderr)
        return 0.0
    device.save()
    return seconds


def host_costs(run: RunConfig, device) -> dict:
    """The eager trainer's host seconds per layer and step for the run's model (host_cost.py), cached with
    the device's GEMM timings; {} (host work unpriced) if the model cannot be built here."""
    from .host_cost import measure_host_cost, run_key

    try:
        costs = device.cache.get(f"host|{run_key(run)}|{device.threads}", lambda: measure_host_cost(run, device))
    except (ConfigError, OSError, RuntimeError, ValueError) as e:
        print(f"moeforge plan: host cost not measured ({e}); it is left out", file=sys.stderr)
        return {}
    device.save()
    return costs


def wrapper_seconds(rec: RunRecord, lo: Layout, device) -> float:
    """Host CPU seconds per step of the distributed wrappers, each measured as the run uses it
    (`CPUDevice.wrapper`): the TP plan's DTensors when tp > 1, FSDP2 (ZeRO-2, or ZeRO-3 resharding after
    forward) over the run's dp ranks when dp > 1 without pipeline stages, with the routed experts split
    over its ep ranks (EP's dispatch and combine); a pipeline rank holds 1/pp of the parameter tensors."""
    if not rec.run.train.preset:
        return 0.0
    fsdp = lo.dp > 1 and lo.pp == 1  # pipeline stages are not FSDP-wrapped: their dp ranks all-reduce
    modes = (["tp"] if lo.tp > 1 else []) + ([("zero3" if lo.zero == 3 else "fsdp2")] if fsdp else [])
    total = 0.0
    for mode in modes:
        w = device.wrapper(rec.run.train.preset, mode, world=lo.dp, ep=lo.ep)
        total += w["per_tensor_s"] * w["tensors"]
    device.save()
    return total / lo.pp


def gloo_link(device):
    """The link every gloo collective of a local run crosses: gloo's own measured alpha and beta."""
    from . import network as net

    g = device.gloo()
    device.save()
    return net.Link(g["gloo_bw"], g["gloo_latency_s"])


def local_cpu_hardware(device):
    """A Hardware record for MFU and memory limits; the times come from `device`, not from it."""
    from .catalog import Hardware

    return Hardware("cpu", bf16_tflops=1.0, fp8_tflops=0, hbm_gb=64, hbm_tbps=device.rates["elementwise_bw"] / 1e12,
                    nvlink_gbps=device.rates["socket_bw"] / 1e9, gpus_per_node=max(1, device.ranks),
                    nics_per_node=1, nic_gbits=10, pcie_gbps=1, note="this machine (measured)")


def compare(run_dir: str | Path, device=None, threads: int | None = None, processes: int | None = None,
            run_share: float | None = None) -> dict:
    rec = read_run(run_dir, processes)
    share = run_share if run_share is not None else rec.cpu_share
    lo, s, st, cpu = predict_run(rec, device, threads, share)
    measured_cpu = rec.measured_cpu
    out = {"run": str(rec.run_dir), "layout": lo.short(), "processes": rec.processes, "predicted_s": st.total,
           "measured_s": rec.measured, "error": st.total / rec.measured - 1, "steps_timed": len(rec.step_times),
           "parts": st.parts(), "by_kind": st.by_kind, "optimizer_s": st.optimizer,
           "memory_predicted": st.memory.to_json(), "cpu_share_during_run": share,
           "share_source": "given" if run_share is not None else ("run" if share is not None else "load now"),
           "predicted_cpu_s": cpu, "measured_cpu_s": measured_cpu,
           "cpu_error": cpu / measured_cpu - 1 if measured_cpu else None,
           "predicted_waits_s": st.total - st.compute, "measured_blocked_s": rec.measured_blocked}
    if rec.memory:
        keys = {"weights": "parameters", "gradients": "gradients", "optimizer": "optimizer",
                "activations": "activations"}
        out["memory_measured"] = {k: rec.memory.get(v) for k, v in keys.items()}
    return out


def against_report(run_dir: str | Path, as_json: bool = False, threads: int | None = None,
                   processes: int | None = None) -> str:
    r = compare(run_dir, threads=threads, processes=processes)
    if as_json:
        return json.dumps(r)
    lines = [f"{r['run']}: {r['layout']}, {r['processes']} process(es)",
             f"step time: predicted {r['predicted_s']:.3f} s, measured {r['measured_s']:.3f} s (median of "
             f"{max(1, r['steps_timed'] - WARMUP_STEPS)} steps) -> error {100 * r['error']:+.0f}%",
             cpu_line(r),
             "predicted breakdown: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["parts"].items() if v > 0),
             "compute by kind: " + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(r["by_kind"].items()))
             + f" (optimizer {r['optimizer_s']:.3f} s)"]
    mp = r["memory_predicted"]
    mem = (f"memory per rank predicted: weights {mp['weights'] / 2**20:.1f} MiB, gradients {mp['gradients'] / 2**20:.1f}, "
           f"optimizer {mp['optimizer'] / 2**20:.1f}, activations {mp['activations'] / 2**20:.1f}")
    lines.append(mem)
    if "memory_measured" in r:
        mm = r["memory_measured"]
        lines.append("measured (memory.json): " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB ({100 * (mp[k] / v - 1):+.0f}%)" for k, v in mm.items() if v))
    else:
        lines.append("measured memory: not recorded (run with --profile-memory for memory.json)")
    return "\n".join(lines)


def cpu_line(r: dict) -> str:
    """Where the measured wall time went (the run's step clock) next to the model's CPU seconds and waits."""
    share = r["cpu_share_during_run"]
    head = f"CPU share {share:.2f} ({r['share_source']})" if share is not None else "CPU share: load measured now"
    if r["measured_cpu_s"] is None:
        return f"{head}; predicted CPU {r['predicted_cpu_s']:.3f} s/step (the run has no step clock: cpu_s, runq_s)"
    return (f"{head}; CPU s/step of the training thread: predicted {r['predicted_cpu_s']:.3f}, measured "
            f"{r['measured_cpu_s']:.3f} ({100 * r['cpu_error']:+.0f}%); waits: predicted "
            f"{r['predicted_waits_s']:.3f} s, measured blocked {r['measured_blocked_s']:.3f} s")


def validation_table(run_dirs, threads: int | None = None, shares: dict | None = None,
                     predicted: dict | None = None) -> str:
    """Predicted vs measured for each run: rank 0's CPU seconds per step (the op model, load-free) and the
    wall seconds per step (plus the waits: bubble, collectives, the share the load left), with the mean
    absolute error of each. shares: {run dir name: CPU share} to use instead of the run's step clock;
    predicted: {run dir name: `compare` result made earlier} (predictions made right after each run)."""
    rows, errors, cpu_errors = [], [], []
    for d in run_dirs:
        try:
            r = (predicted or {}).get(Path(d).name) or compare(d, threads=threads,
                                                               run_share=(shares or {}).get(Path(d).name))
        except ConfigError as e:
            rows.append(f"| {Path(d).name} | - | - | - | - | - | - | - | - | - | - | {e} |")
            continue
        errors.append(abs(r["error"]))
        cpu = "- | - | -"
        if r["cpu_error"] is not None:
            cpu_errors.append(abs(r["cpu_error"]))
            cpu = f"{r['predicted_cpu_s']:.3f} | {r['measured_cpu_s']:.3f} | {100 * r['cpu_error']:+.0f}%"
        share = f"{r['cpu_share_during_run']:.2f}" if r["cpu_share_during_run"] is not None else "-"
        blocked = f"{r['measured_blocked_s']:.3f}" if r["measured_blocked_s"] is not None else "-"
        rows.append(f"| {Path(d).name} | {r['layout']} | {r['processes']} | {cpu} | {share} | "
                    f"{r['predicted_waits_s']:.3f} | {blocked} | {r['predicted_s']:.3f} | "
                    f"{r['measured_s']:.3f} | {100 * r['error']:+.0f}% |")
    head = ["| run | layout | processes | predicted CPU s | measured CPU s | CPU error | CPU share | "
            "predicted waits s | measured blocked s | predicted wall s | measured wall s | wall error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tail = [""]
    if cpu_errors:
        tail.append(f"CPU seconds per step (rank 0): mean absolute error {100 * statistics.mean(cpu_errors):.0f}% "
                    f"over {len(cpu_errors)} runs")
    tail.append(f"wall seconds per step: mean absolute error {100 * statistics.mean(errors):.0f}% over {len(errors)} runs"
                if errors else "no runs")
    return "\n".join(head + rows + tail)
