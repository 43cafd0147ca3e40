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

SCHEDULES = {"gpipe": "1f1b", "1f1b": "1f1b", "interleaved-1f1b": "interleaved-1f1b", "dualpipev": "dualpipe"}
WARMUP_STEPS = 2  # the first steps build lazy state (oneDNN kernels, allocator, FSDP buffers)


@dataclass(frozen=True)
class RunRecord:
    run_dir: Path
    run: RunConfig
    step_times: list  # seconds per optimizer step, from tokens_per_s
    memory: dict | None  # memory.json (--profile-memory), if any

    @property
    def measured(self) -> float:
        times = self.step_times[WARMUP_STEPS:] or self.step_times
        return statistics.median(times)

    processes: int  # ranks the run had (see `infer_processes`)


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
    times = [tokens / r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and not r.get("skipped")]
    if not times:
        raise ConfigError(f"{d}/metrics.jsonl: no timed steps (tokens_per_s) to compare with")
    mem = None
    if (d / "memory.json").is_file():
        try:
            mem = json.loads((d / "memory.json").read_text())
        except ValueError:
            mem = None
    return RunRecord(d, run, times, mem, processes or infer_processes(d, run))


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
    if t.pp > 1:
        chunks = 2 if t.pp_schedule in ("interleaved-1f1b", "dualpipev") else 1
        n_mb = t.pp_microbatches or t.pp * chunks
        micro = max(1, per_rank // n_mb)
    else:
        micro = per_rank
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
                      act_bytes=act, grad_comm_bytes=4.0, memory_headroom=1.0)
    return lo, s


def predict_run(rec: RunRecord, device=None, threads: int | None = None, run_share: float | None = None):
    """(layout, settings, StepTime) predicted for the run on this machine, measured now. threads: per
    rank (default: OMP_NUM_THREADS, else the cores shared evenly, as `moeforge train --nproc` does)."""
    from . import network as net
    from .device import CPUDevice
    from .steptime import step_time

    lo, s = run_layout(rec.run, rec.processes)
    model = from_moe(rec.run.model, rec.run.train.preset)
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or max(1, (os.cpu_count() or 1) // rec.processes)
    if device is None:
        device = CPUDevice(threads=threads, ranks=rec.processes, run_share=run_share)
    hw = local_cpu_hardware(device)
    link = net.Link(device.rates["socket_bw"], device.rates["socket_latency_s"])
    topo = net.Topology("nvswitch", lo.gpus, lo.gpus, link, link)
    return lo, s, step_time(model, hw, topo, lo, s, device=device)


def local_cpu_hardware(device):
    """A Hardware record for MFU and memory limits; the times come from `device`, not from it."""
    from .catalog import Hardware

    return Hardware("cpu", bf16_tflops=1.0, fp8_tflops=0, hbm_gb=64, hbm_tbps=device.rates["elementwise_bw"] / 1e12,
                    nvlink_gbps=device.rates["socket_bw"] / 1e9, gpus_per_node=max(1, device.ranks),
                    nics_per_node=1, nic_gbits=10, pcie_gbps=1, note="this machine (measured)")


def compare(run_dir: str | Path, device=None, threads: int | None = None, processes: int | None = None,
            run_share: float | None = None) -> dict:
    rec = read_run(run_dir, processes)
    lo, s, st = predict_run(rec, device, threads, run_share)
    out = {"run": str(rec.run_dir), "layout": lo.short(), "processes": rec.processes, "predicted_s": st.total,
           "measured_s": rec.measured, "error": st.total / rec.measured - 1, "steps_timed": len(rec.step_times),
           "parts": st.parts(), "by_kind": st.by_kind, "optimizer_s": st.optimizer,
           "memory_predicted": st.memory.to_json(), "cpu_share_during_run": run_share}
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


def validation_table(run_dirs, threads: int | None = None, shares: dict | None = None) -> str:
    """Predicted vs measured for each run, and the mean absolute error. shares: {run dir name: CPU share
    probed while it ran} (benchmarks/planner_validation.py), else the share measured now."""
    rows, errors = [], []
    for d in run_dirs:
        try:
            r = compare(d, threads=threads, run_share=(shares or {}).get(Path(d).name))
        except ConfigError as e:
            rows.append(f"| {Path(d).name} | - | - | - | - | {e} |")
            continue
        errors.append(abs(r["error"]))
        rows.append(f"| {Path(d).name} | {r['layout']} | {r['processes']} | {r['predicted_s']:.3f} | "
                    f"{r['measured_s']:.3f} | {100 * r['error']:+.0f}% |")
    head = ["| run | layout | processes | predicted s | measured s | error |", "|---|---|---|---|---|---|"]
    mae = f"mean absolute error {100 * statistics.mean(errors):.0f}% over {len(errors)} runs" if errors else "no runs"
    return "\n".join(head + rows + ["", mae])

