"""Calibration against this machine: measure matmul throughput and memory bandwidth, describe the CPU as
a `Hardware` entry ("cpu"), and predict a step of moeforge's own training of the `tiny` preset.

Prediction = matmul FLOPs (forward + backward, MTP included, as the trainer runs it) at the measured
matmul rate for the trainer's precision, plus memory traffic at the measured bandwidth: the activations
written once and read once per backward, and AdamW reading p, g, m, v and writing p, m, v (FP32).
`benchmarks/plan_calibration.py` runs the trainer and prints predicted vs measured.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache

from .catalog import Hardware


def _best(fn, repeats: int) -> float:
    fn()  # warm up (oneDNN picks and JITs kernels)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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


def predict_tiny_step(batch_size: int = 16, seq_len: int = 256, precision: str | None = None) -> dict:
    """Predicted seconds per optimizer step of `moeforge train` on the tiny preset with these settings."""
    from .. import hardware
    from ..config import preset
    from ..costs import parameter_counts, training_flops_per_token
    from .layout import Layout, TrainSettings
    from .memory import activation_bytes
    from .models import from_moe

    cfg = preset("tiny")
    m = measure()
    if precision is None:
        precision = "bf16" if hardware.probe("cpu").bf16 else "fp32"
    rate = m[f"matmul_{precision}_flops"]
    tokens = batch_size * seq_len
    flops = training_flops_per_token(cfg, seq_len, include_mtp=True) * tokens
    p = parameter_counts(cfg)
    params = p["total"] + p["mtp"]
    shape = from_moe(cfg, "tiny")
    settings = TrainSettings(seq_len=seq_len, global_batch=batch_size, act_bytes=4 if precision == "fp32" else 2)
    acts = activation_bytes(shape, Layout(micro_batch=batch_size), settings, 0)
    traffic = 2 * acts + 7 * 4 * params  # activations written + read; AdamW p,g,m,v in, p,m,v out (FP32)
    t_matmul, t_memory = flops / rate, traffic / m["memory_bw"]
    return {"precision": precision, "tokens": tokens, "flops": flops, "matmul_s": t_matmul, "memory_s": t_memory,
            "predicted_step_s": t_matmul + t_memory, "measured_rates": m}


def calibrate_report(as_json: bool = False) -> str:
    pred = predict_tiny_step()
    if as_json:
        return json.dumps(pred)
    m = pred["measured_rates"]
    return "\n".join([
        f"this machine ({m['threads']} threads): matmul {m['matmul_fp32_flops'] / 1e9:.0f} GFLOP/s fp32, "
        f"{m['matmul_bf16_flops'] / 1e9:.0f} GFLOP/s bf16; memory copy {m['memory_bw'] / 1e9:.1f} GB/s",
        f"tiny preset, batch 16 x seq 256 ({pred['precision']}): {pred['flops'] / 1e9:.1f} GFLOPs per step",
        f"predicted step: {pred['predicted_step_s']:.3f} s (matmuls {pred['matmul_s']:.3f} s + memory traffic "
        f"{pred['memory_s']:.3f} s); compare: python benchmarks/plan_calibration.py",
    ])
