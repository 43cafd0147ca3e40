"""Calibration against this machine: measure matmul throughput and memory bandwidth, describe the CPU as
a `Hardware` entry ("cpu"), and predict a step of moeforge's own training of the `tiny` preset.

The prediction is a roofline over the operations of one step, with this machine's measured rates:

* which operations run, with what shapes, comes from tracing one step of the real trainer (forward,
  backward, balance losses, clipping, AdamW, bias update; `trace_step` records shapes and bytes, not
  times);
* each distinct matmul (mm, bmm, the routed experts' grouped GEMM) is timed alone at its traced shape
  and dtype: small expert GEMMs run far below the 1024^2 rate, so one peak rate would be wrong by ~2x;
* every other operation costs the bytes it reads and writes at the measured copy bandwidth, plus the
  measured cost of dispatching one small operation (eager PyTorch runs some 1,600 of them per step).

The cluster planner's analytic model (FLOPs at an efficiency, activation bytes) is for fused GPU
implementations; this trace-based form is how it is checked against a machine we can measure.
`benchmarks/plan_calibration.py` runs the trainer and prints predicted vs measured.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache

from .catalog import Hardware


def _best(fn, repeats: int, cold: bool = False) -> float:
    """Fastest of `repeats` timed calls after a warm-up (oneDNN picks and JITs kernels). cold: evict the
    caches before each call, as in a training step, whose working set is far larger than any cache."""
    fn()
    flush = _cache_flusher() if cold else None
    best = float("inf")
    for _ in range(repeats):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@lru_cache(maxsize=None)
def _cache_flusher(mb: int = 256):
    import torch

    buf = torch.empty(mb * 2 ** 20 // 4, dtype=torch.float32)
    return lambda: buf.fill_(0.0)


@lru_cache(maxsize=None)
def measure(n: int = 1024, repeats: int = 5, copy_mb: int = 128) -> dict:
    """Best-of-N matmul FLOP/s (fp32 and bf16, n x n) and copy bandwidth (bytes read + written per s)."""
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        out[f"matmul_{name}_flops"] = 2 * n ** 3 / _best(lambda: a @ b, repeats)
    src = torch.empty(copy_mb * 2 ** 20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    out["memory_bw"] = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats)
    out["threads"] = torch.get_num_threads()
    return out


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


@lru_cache(maxsize=None)
def local_hardware() -> Hardware:
    """This machine as one 'device': measured peaks; no scale-up or scale-out network to speak of."""
    m = measure()
    bw = m["memory_bw"]
    return Hardware("cpu", bf16_tflops=max(m["matmul_bf16_flops"], m["matmul_fp32_flops"]) / 1e12, fp8_tflops=0,
                    hbm_gb=_ram_gb(), hbm_tbps=bw / 1e12, nvlink_gbps=bw / 1e9, gpus_per_node=1, nics_per_node=1,
                    nic_gbits=10, pcie_gbps=bw / 1e9, nvlink_latency_us=1.0, nic_latency_us=20.0,
                    nvlink_efficiency=1.0, nic_efficiency=1.0, note="this machine (measured)")


MATMULS = ("mm", "bmm", "addmm", "baddbmm", "_grouped_mm")
FREE = ("view", "_unsafe_view", "as_strided", "expand", "t", "transpose", "permute", "select", "slice", "split",
        "split_with_sizes", "unsqueeze", "squeeze", "detach", "alias", "unbind", "lift_fresh", "empty", "empty_like",
        "empty_strided", "_local_scalar_dense", "set_", "resize_", "copy_for_view")


@dataclass
class StepTrace:
    """What one training step runs: matmul calls by (op, input shapes, dtype) and the other operations."""

    matmuls: dict = field(default_factory=dict)  # (op name, shapes, strides, dtype, offsets) -> count
    other_ops: int = 0
    other_bytes: int = 0  # bytes read and written by non-matmul, non-view operations

    def matmul_flops(self) -> float:
        """2 x multiply-adds of all traced matmuls (checks the trace against `costs`' analytic count)."""
        total = 0.0
        for (name, shapes, _, _, _), count in self.matmuls.items():
            if name == "_grouped_mm":  # x [rows, K] @ w [E, K, N]: every row meets one expert
                (rows, k), n = shapes[0], shapes[1][-1]
                total += count * 2 * rows * k * n
            else:  # (bias,) a [(B,) M, K] @ b [(B,) K, N]
                a, b = shapes[-2], shapes[-1]
                batch = a[0] if len(a) == 3 else 1
                total += count * 2 * batch * a[-2] * a[-1] * b[-1]
        return total


def trace_step(batch_size: int, seq_len: int, precision: str, preset: str = "tiny") -> StepTrace:
    """Run one `moeforge train` step of a preset (after a warm-up step; a 2 MB slice of the default
    corpus, a temporary run folder) and record its operations."""
    import tempfile

    import torch
    from rich.console import Console
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from ..config import resolve_run_config
    from ..train import Trainer

    trace = StepTrace()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name.split("::")[-1]
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if name in MATMULS:
                key = (name, tuple(tuple(t.shape) for t in tensors), tuple(t.stride() for t in tensors),
                       str(tensors[0].dtype), tuple(tuple(t.tolist()) for t in tensors if t.dtype == torch.int32))
                trace.matmuls[key] = trace.matmuls.get(key, 0) + 1
            elif not (func.is_view or name in FREE):
                outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                trace.other_ops += 1
                trace.other_bytes += sum(t.numel() * t.element_size() for t in tensors + outs)
            return out

    with tempfile.TemporaryDirectory() as tmp:
        run = resolve_run_config({}, dict(preset=preset, batch_size=batch_size, seq_len=seq_len, device="cpu",
                                          precision=precision, max_corpus_mb=2.0, run_dir=tmp))
        trainer = Trainer(run, run_dir=tmp, console=Console(quiet=True))
        trainer.train_step()  # warm-up: lazily built state stays out of the trace
        trainer.step += 1
        with Recorder():
            trainer.train_step()
    return trace


def time_matmul(key, repeats: int = 3) -> float:
    """Seconds of one call of a traced matmul, on fresh tensors of its shapes, strides and dtype."""
    import torch

    name, shapes, strides, dtype, offsets = key
    dtype = getattr(torch, dtype.split(".")[-1])
    ints = iter(offsets)
    args = []
    for shape, stride in zip(shapes, strides):
        if len(args) == 2 and name == "_grouped_mm":  # the offsets (int32 group ends)
            args.append(torch.tensor(next(ints), dtype=torch.int32))
            continue
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
        args.append(torch.randn(max(size, 1), dtype=dtype).as_strided(shape, stride))
    op = getattr(torch.ops.aten, name)
    if name == "_grouped_mm":
        return _best(lambda: op(args[0], args[1], offs=args[2]), repeats, cold=True)
    return _best(lambda: op(*args), repeats, cold=True)


@lru_cache(maxsize=None)
def dispatch_overhead(repeats: int = 5) -> float:
    """Seconds to run one tiny eager operation (Python -> ATen dispatch, allocation), best of N x 200."""
    import torch

    x = torch.ones(8)
    return _best(lambda: [x + 1 for _ in range(200)], repeats) / 200


def predict_tiny_step(batch_size: int = 16, seq_len: int = 256, precision: str | None = None) -> dict:
    """Predicted seconds per optimizer step of `moeforge train` on the tiny preset with these settings."""
    from .. import hardware
    from ..config import preset
    from ..costs import training_flops_per_token

    cfg = preset("tiny")
    m = measure()
    if precision is None:
        precision = "bf16" if hardware.probe("cpu").bf16 else "fp32"
    trace = trace_step(batch_size, seq_len, precision)
    t_matmul = sum(count * time_matmul(key) for key, count in trace.matmuls.items())
    t_memory = trace.other_bytes / m["memory_bw"]
    t_dispatch = trace.other_ops * dispatch_overhead()
    flops = training_flops_per_token(cfg, seq_len, include_mtp=True) * batch_size * seq_len
    return {"precision": precision, "tokens": batch_size * seq_len, "flops": flops, "matmul_s": t_matmul,
            "memory_s": t_memory, "dispatch_s": t_dispatch, "other_ops": trace.other_ops,
            "other_bytes": trace.other_bytes, "predicted_step_s": t_matmul + t_memory + t_dispatch,
            "peak_matmul_s": flops / m[f"matmul_{precision}_flops"], "measured_rates": m}


def calibrate_report(as_json: bool = False) -> str:
    pred = predict_tiny_step()
    if as_json:
        return json.dumps(pred)
    m = pred["measured_rates"]
    return "\n".join([
        f"this machine ({m['threads']} threads): matmul {m['matmul_fp32_flops'] / 1e9:.0f} GFLOP/s fp32, "
        f"{m['matmul_bf16_flops'] / 1e9:.0f} GFLOP/s bf16; memory copy {m['memory_bw'] / 1e9:.1f} GB/s",
        f"tiny preset, batch 16 x seq 256 ({pred['precision']}): {pred['flops'] / 1e9:.1f} GFLOPs per step",
        f"predicted step: {pred['predicted_step_s']:.3f} s = matmuls at their shapes {pred['matmul_s']:.3f} s "
        f"({pred['peak_matmul_s']:.3f} s at the 1024^2 rate) + {pred['other_bytes'] / 1e9:.1f} GB of other "
        f"operations' traffic {pred['memory_s']:.3f} s + {pred['other_ops']} dispatches {pred['dispatch_s']:.3f} s; "
        "compare: python benchmarks/plan_calibration.py",
    ])
