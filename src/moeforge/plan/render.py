"""Output of the planner: a rich table, JSON, a roofline + step-breakdown plot, and the KV-cache table."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .models import ModelShape, load_model
from .planner import Plan, explain


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def plan_json(p: Plan) -> dict:
    """Everything the issue asks for at the top level, plus the ranked layouts and the decode estimate."""
    best = p.best
    st = best.step
    m = p.model
    return {
        "model": m.name, "hardware": p.hardware.name, "gpus": p.gpus, "topology": p.topology.kind,
        "seq_len": p.settings.seq_len, "global_batch": p.settings.global_batch,
        "total_params": m.total_params, "active_params": m.active_params,
        "train_flops_per_token": st.flops_per_token, "kv_cache_bytes_per_token": m.kv_cache_bytes_per_token,
        "memory_per_gpu_bytes": st.memory.total, "memory_fits": best.fits, "step_time_s": st.total,
        "tokens_per_s": st.tokens_per_s, "mfu": st.mfu, "tpot_s": p.decode.tpot_s,
        "layout": best.layout.to_json(), "breakdown_s": st.parts(), "memory": st.memory.to_json(),
        "algorithms": st.algorithms, "decode": p.decode.to_json(),
        "ranked": [{"layout": c.layout.to_json(), "step_time_s": c.step.total, "mfu": c.step.mfu,
                    "memory_per_gpu_bytes": c.step.memory.total, "fits": c.fits} for c in p.ranked],
        "considered": p.considered, "rejected_memory": p.rejected_memory,
        "settings": {k: getattr(p.settings, k) for k in p.settings.__dataclass_fields__},
        "explanation": explain(p),
    }


def plan_text(p: Plan, width: int = 140) -> str:
    m, hw, st = p.model, p.hardware, p.best.step
    out = io.StringIO()
    con = Console(file=out, width=width, force_terminal=False, color_system=None)
    con.print(f"{m.name} on {p.gpus} x {hw.name} ({p.topology.kind}), seq {p.settings.seq_len}, "
              f"global batch {p.settings.global_batch} sequences, {p.settings.precision.upper()} matmuls")
    con.print(f"params {m.total_params / 1e9:.1f}B total, {m.active_params / 1e9:.1f}B active; "
              f"{st.flops_per_token / 1e9:.1f} GFLOPs/token (fwd+bwd); KV cache "
              f"{m.kv_cache_bytes_per_token / 1000:.3f} KB/token (BF16)")
    table = Table(title="Layouts that fit, fastest first")
    for col in ("#", "layout", "step s", "tokens/s", "MFU", "mem GB", "compute", "bubble", "comm exposed"):
        table.add_column(col, justify="left" if col == "layout" else "right", no_wrap=True)
    for i, c in enumerate(p.ranked, 1):
        s = c.step
        exposed = s.tp_comm + s.exposed_ep_pp + s.exposed_dp
        mem = _gb(s.memory.total) + ("" if c.fits else " (!)")
        table.add_row(str(i), c.layout.short(), f"{s.total:.3g}", f"{s.tokens_per_s:,.0f}", f"{100 * s.mfu:.1f}%",
                      mem, f"{s.compute:.3g}", f"{s.bubble:.3g}", f"{exposed:.3g}")
    con.print(table)
    for line in explain(p):
        con.print(line)
    d = p.decode
    bound = "EP all-to-all" if d.ep_bound_s >= d.hbm_bound_s else "HBM"
    con.print(f"Decode: TPOT {1e3 * d.tpot_s:.2f} ms ({bound} bound; EP bound {1e3 * d.ep_bound_s:.2f} ms over "
              f"{d.link} at {d.bandwidth / 1e9:.0f} GB/s, HBM bound {1e3 * d.hbm_bound_s:.2f} ms), "
              f"{d.tokens_per_device} tokens per device.")
    return out.getvalue().rstrip()


def plot_plan(p: Plan, path: str | Path) -> Path:
    """Left: roofline of the device with the step's matmul intensity; right: where the step time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw, st, m = p.hardware, p.best.step, p.model
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    peak = hw.matmul_flops(p.settings.precision)
    xs = [2 ** i for i in range(-2, 14)]
    ax1.loglog(xs, [min(peak, x * hw.hbm_bw) / 1e12 for x in xs], label=f"{hw.name} {p.settings.precision}")
    ax1.axhline(hw.peak_flops / 1e12, ls=":", c="gray", label="BF16 peak")
    # Intensity of one expert GEMM at this micro-batch: tokens per expert rows against a D x F weight.
    lo = p.best.layout
    tokens = lo.micro_batch * p.settings.seq_len / lo.tp
    rows = tokens * max(1, m.experts_per_token) / max(1, m.n_routed_experts) * lo.ep if m.moe_layers else tokens
    k_dim = m.hidden_size
    n_dim = m.expert_intermediate or m.dense_intermediate
    wb = 1 if p.settings.precision == "fp8" else 2
    intensity = 2 * rows * k_dim * n_dim / (wb * (rows * k_dim + k_dim * n_dim) + 2 * rows * n_dim)
    ax1.scatter([intensity], [min(peak, intensity * hw.hbm_bw) / 1e12], c="C3", zorder=3,
                label=f"{'expert' if m.moe_layers else 'MLP'} GEMM ({rows:.0f} rows)")
    ax1.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax1.set_ylabel("TFLOPS")
    ax1.set_title("roofline")
    ax1.legend(fontsize=8)
    parts = {k: v for k, v in st.parts().items() if v > 0}
    ax2.barh(list(parts), list(parts.values()), color=[f"C{i}" for i in range(len(parts))])
    ax2.set_xlabel("seconds per step")
    ax2.set_title(f"{p.best.layout.short()}\n{st.total:.3g} s/step, MFU {100 * st.mfu:.1f}%", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def kv_rows(names: list[str]) -> list[tuple[ModelShape, str]]:
    rows = []
    for name in names:
        m = load_model(name)
        how = (f"MLA: ({m.kv_lora_rank} latent + {m.moe_config.qk_rope_head_dim} rope) x {m.num_layers} layers"
               if m.kv_lora_rank is not None else
               f"GQA: 2 x {m.num_kv_heads} KV heads x {m.head_dim} x {m.num_layers} layers")
        rows.append((m, how))
    return rows


def kv_json(names: list[str]) -> list[dict]:
    return [{"model": m.name, "kv_cache_bytes_per_token": m.kv_cache_bytes_per_token,
             "kv_cache_kb_per_token": m.kv_cache_bytes_per_token / 1000, "formula": how}
            for m, how in kv_rows(names)]


def kv_text(names: list[str]) -> str:
    rows = kv_rows(names)
    ref = rows[0][0].kv_cache_bytes_per_token
    out = io.StringIO()
    con = Console(file=out, width=110, force_terminal=False, color_system=None)
    table = Table(title="KV cache per token, BF16 (1 KB = 1000 bytes)")
    for col in ("model", "KB/token", f"x {rows[0][0].name}", "what is cached"):
        table.add_column(col, justify="left" if col in ("model", "what is cached") else "right")
    for m, how in rows:
        table.add_row(m.name, f"{m.kv_cache_bytes_per_token / 1000:.3f}", f"{m.kv_cache_bytes_per_token / ref:.2f}",
                      how)
    con.print(table)
    return out.getvalue().rstrip()
