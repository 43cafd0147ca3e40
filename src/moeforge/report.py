"""`moeforge report RUN_DIR [--plot]`: summarise a run folder and draw its loss curves and expert-load
heatmaps from metrics.jsonl."""

from __future__ import annotations

import sys
from pathlib import Path

from . import metrics_file
from .errors import DataError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is this a moeforge run folder?)")
    rows = metrics_file.read_metrics(path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if not rows:
        raise DataError(f"{path}: empty")
    return rows


def summarize(rows: list[dict]) -> str:
    last = rows[-1]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    lines = [f"steps          {last['step']}",
             f"train loss     {rows[0]['loss']:.4f} -> {last['loss']:.4f}",
             f"tokens/s       {speeds[len(speeds) // 2]:,.0f} (median)" if speeds else "tokens/s       -"]
    if vals:
        lines.append("val loss       " + ", ".join(f"{v:.4f} @ {s}" for s, v in vals[-4:]))
    if "expert_load_max_over_mean" in last:
        ratios = " ".join(f"{r - 1:.2f}" for r in last["expert_load_max_over_mean"])
        lines.append(f"MaxVio/layer   {ratios} (last step)")
    skipped = sum(1 for r in rows if r.get("skipped"))
    if skipped:
        lines.append(f"skipped steps  {skipped} (non-finite loss or gradient)")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """loss.png (train and validation) and, when counts were logged, expert_load.png (load / mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if vals:
        ax.plot(*zip(*vals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    with_counts = [r for r in rows if "expert_counts" in r]
    if with_counts:
        counts = np.array([r["expert_counts"] for r in with_counts], dtype=float)  # [steps, layers, experts]
        relative = counts / np.maximum(counts.mean(axis=2, keepdims=True), 1e-9)
        n_layers = counts.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 2.2 * n_layers), squeeze=False, sharex=True)
        steps = [r["step"] for r in with_counts]
        for layer in range(n_layers):
            ax = axes[layer, 0]
            im = ax.imshow(relative[:, layer].T, aspect="auto", origin="lower", cmap="magma",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, counts.shape[2] - 0.5),
                           vmin=0, vmax=max(2.0, float(relative[:, layer].max())))
            ax.set_ylabel(f"MoE layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written
