"""Where training metrics go besides metrics.jsonl: TensorBoard and Weights & Biases.

metrics.jsonl stays the record; a sink receives the same rows (`log`) and draws them in a tool people
already have open. Every sink has the same two methods, `log(row)` and `close()`; the trainer holds one
`MetricsSinks` fan-out and never learns which tools are behind it. Only rank 0 opens sinks.

A resumed run restarts at its last checkpoint, so the steps logged after that checkpoint come again.
TensorBoard is told with `purge_step` (its reader drops the older events from that step on); W&B cannot
delete history, so its sink skips steps it already logged (resume is exact: they carry the same values).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from .errors import ConfigError

PER_LAYER = "expert_load_max_over_mean"
NOT_SCALARS = {"step", "skipped", "elapsed_s"}
RENAMED = {"val_loss": "val/loss", "max_vio": "balance/max_vio"}


def scalars(row: dict) -> dict[str, float]:
    """A metrics row as tool scalars: train/<field>, val/loss, balance/max_vio and per-layer MaxVio."""
    out = {}
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[RENAMED.get(key, f"train/{key}")] = float(value)
    for layer, ratio in enumerate(row.get(PER_LAYER, [])):
        out[f"balance/max_vio_layer_{layer}"] = float(ratio) - 1.0  # MaxVio = max load / mean load - 1
    return out


class MetricsSink(Protocol):
    def log(self, row: dict, images: dict) -> None: ...

    def close(self) -> None: ...


class ExpertLoadHeatmap:
    """Sums expert_counts over the steps since the last image; `figure()` draws load/mean per layer."""

    def __init__(self):
        self.total, self.first, self.last = None, None, None

    def add(self, row: dict) -> None:
        import numpy as np

        counts = row.get("expert_counts")
        if counts is None:
            return
        counts = np.asarray(counts, dtype=float)
        self.total = counts if self.total is None else self.total + counts
        self.first = row["step"] if self.first is None else self.first
        self.last = row["step"]

    def figure(self):
        """A matplotlib figure [MoE layer x expert] of load / mean load, or None when nothing was counted."""
        if self.total is None:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        relative = self.total / np.maximum(self.total.mean(axis=1, keepdims=True), 1e-9)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * relative.shape[1] + 2), 0.5 * relative.shape[0] + 1.5))
        im = ax.imshow(relative, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(relative.max())))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load / mean, steps {self.first}-{self.last}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        self.total, self.first = None, None
        return fig


class TensorBoardSink:
    """torch.utils.tensorboard events in RUN_DIR/tensorboard, flushed every row (a crash loses nothing)."""

    def __init__(self, log_dir: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the 'tensorboard' package: "
                              "pip install 'moeforge[logging]'") from None
        # purge_step: TensorBoard's reader discards older events from this step on (a resumed run's repeats).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def log(self, row: dict, images: dict) -> None:
        step = row["step"]
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, step)
        for name, fig in images.items():
            self.writer.add_figure(name, fig, step, close=False)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run named after the run folder, resumed by the id kept in RUN_DIR/wandb/moeforge.json."""

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the 'wandb' package: pip install 'moeforge[wandb]'") from None
        self.wandb = wandb
        self.state_file = run_dir / "wandb" / "moeforge.json"
        resumed = start_step > 0 and self.state_file.is_file()  # a fresh run in an old folder: a new W&B run
        state = json.loads(self.state_file.read_text()) if resumed else {}
        run_id = state.get("id") or uuid.uuid4().hex[:12]
        self.last_step = int(state.get("last_step", 0))
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "moeforge"), name=run_dir.name, id=run_id,
                                  resume="allow", dir=str(run_dir), config=config)
        except Exception as e:  # wandb raises its own error types for login, network and settings problems
            raise ConfigError(f"wandb: {type(e).__name__}: {e} (WANDB_MODE=offline logs without a network)") from None
        self._save_state(run_id)

    def _save_state(self, run_id: str) -> None:
        self.run_id = run_id
        self.state_file.write_text(json.dumps({"id": run_id, "last_step": self.last_step}) + "\n")

    def log(self, row: dict, images: dict) -> None:
        step = row["step"]
        if step <= self.last_step:  # logged before the resume; W&B history cannot be rewritten
            return
        data = dict(scalars(row))
        data.update({name: self.wandb.Image(fig) for name, fig in images.items()})
        self.run.log(data, step=step)
        self.last_step = step
        self._save_state(self.run_id)

    def close(self) -> None:
        self.run.finish()


class MetricsSinks:
    """The trainer's one handle on all sinks: same row to each, plus the expert-load heatmap at every
    validation row and at the last step."""

    def __init__(self, sinks: list, final_step: int):
        self.sinks, self.final_step = sinks, final_step
        self.heatmap = ExpertLoadHeatmap()

    def log(self, row: dict) -> None:
        if not self.sinks:
            return
        self.heatmap.add(row)
        images = {}
        if "val_loss" in row or row["step"] >= self.final_step:
            fig = self.heatmap.figure()
            if fig is not None:
                images["balance/expert_load"] = fig
        for sink in self.sinks:
            sink.log(row, images)
        if images:
            import matplotlib.pyplot as plt

            for fig in images.values():
                plt.close(fig)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_sinks(run, run_dir: Path, start_step: int, enabled: bool = True) -> MetricsSinks:
    """The sinks `run.train` asks for (--tensorboard, --wandb); none on ranks other than 0."""
    cfg, sinks = run.train, MetricsSinks([], final_step=run.train.steps)
    try:
        if enabled and cfg.tensorboard:
            sinks.sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard", start_step))
        if enabled and cfg.wandb:
            sinks.sinks.append(WandbSink(Path(run_dir), {"train": asdict(cfg), "model": asdict(run.model)},
                                         start_step))
    except ConfigError:
        sinks.close()  # the ones already open
        raise
    return sinks
