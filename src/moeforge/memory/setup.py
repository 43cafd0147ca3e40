"""Applying a run's memory settings to a built model: activation checkpointing (with its plan printed
and saved) and CPU offload. One call from the trainer, after the model and optimizer exist."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .auto import plan_auto
from .auto import transient as plan_transient
from .budget import parse_budget
from .candidates import find_candidates
from .checkpointing import MODES, ActivationCheckpointing, fixed_plan
from .offload import OFFLOAD, apply_offload
from .profiler import profile_forward

PLAN_FILE = "activation_checkpointing.json"


@dataclass
class CheckpointPlan:
    mode: str
    names: list[str]
    baseline_bytes: int = 0  # activations kept with no checkpointing (measured on a sample batch)
    held_bytes: int = 0  # ... with this plan
    transient_bytes: int = 0  # largest region rebuilt during backward
    recompute_s: float = 0.0  # forward time of the checkpointed regions, per micro-batch
    forward_s: float = 0.0  # forward time of all blocks, per micro-batch (for scale)
    budget_bytes: int | None = None
    candidates: list[dict] = field(default_factory=list)
    sample_shape: list[int] = field(default_factory=list)  # [sequences, tokens] of the profiled micro-batch

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        mib = 2**20
        lines = [f"activation checkpointing: {self.mode}, {len(self.names)} region(s)"
                 + (" (measured on {} x {} tokens per process)".format(*self.sample_shape) if self.sample_shape else "")]
        if self.baseline_bytes:
            lines.append(f"  activations {self.baseline_bytes / mib:.1f} MiB without checkpointing -> "
                         f"{self.held_bytes / mib:.1f} MiB kept + {self.transient_bytes / mib:.1f} MiB rebuilt at a time"
                         + (f" (budget {self.budget_bytes / mib:.1f} MiB)" if self.budget_bytes else ""))
            share = self.recompute_s / self.forward_s if self.forward_s else 0.0
            lines.append(f"  recompute {self.recompute_s * 1e3:.1f} ms per micro-batch "
                         f"({share:.0%} of the blocks' forward time)")
        if self.names:
            lines.append("  checkpointed: " + ", ".join(self.names))
        return "\n".join(lines)


def sample_batch(vocab: int, batch: int, seq_len: int, device, seed: int = 0):
    """Random tokens (a private generator: the run's random stream is untouched)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def build_plan(model: torch.nn.Module, mode: str, budget: str | float | None, batch, autocast=None,
               repeats: int = 3, profile=None) -> CheckpointPlan:
    """Measure the model on `batch` (input_ids, shift_labels) and choose what to checkpoint for `mode` (`profile`:
    reuse an ActivationProfile with candidates, e.g. to compare modes on the same measurements)."""
    if mode not in MODES:
        raise ConfigError(f"activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    if budget is not None and mode != "auto":
        raise ConfigError("memory_budget applies to --activation-checkpointing auto only")
    if mode == "none":
        return CheckpointPlan("none", [])
    candidates = find_candidates(model)
    profile = profile or profile_forward(model, *batch, candidates=True, repeats=repeats, autocast=autocast)
    budget_bytes = None
    if mode == "auto":
        budget_bytes = parse_budget(0.5 if budget is None else budget, profile.saved_bytes)
        auto = plan_auto(profile, candidates, budget_bytes)
        names, transient = auto.names, auto.transient
    else:
        names = fixed_plan(model, mode)
        transient = plan_transient(profile, names, candidates)
    rows = [{"name": c.name, "kind": c.kind, "saves_bytes": profile.saved_bytes - profile.held({c.name}),
             "rebuilds_bytes": profile.rebuilt(c.name), "forward_s": profile.seconds.get(c.name, 0.0)}
            for c in candidates]
    blocks = sum(r["forward_s"] for r in rows if r["kind"] == "block")
    return CheckpointPlan(mode, names, profile.saved_bytes, profile.held(names), transient,
                          sum(profile.seconds.get(n, 0.0) for n in names), blocks,
                          None if budget_bytes is None else int(budget_bytes), rows, list(batch[0].shape))


def same_on_every_rank(names: list[str]) -> list[str]:
    """Rank 0's choice, in a distributed run. Ranks measure their own timings, and a region recomputed on
    one rank but not another would re-run its collectives (the EP all-to-all, FSDP all-gathers) on one
    side only: a collective mismatch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return names
    chosen = [names]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def setup_memory(trainer) -> CheckpointPlan:
    """Apply the trainer's activation_checkpointing / memory_budget / offload settings to its model. The plan
    is measured on the micro-batch one process runs (`trainer.micro_batch_rows`: a data-parallel rank's share
    of the global batch), so a budget is memory per process."""
    cfg, model = trainer.cfg, trainer.model
    if cfg.offload not in OFFLOAD:
        raise ConfigError(f"offload must be one of {', '.join(OFFLOAD)}, got {cfg.offload!r}")
    plan = CheckpointPlan("none", [])
    if cfg.activation_checkpointing != "none" or cfg.memory_budget is not None:
        batch = sample_batch(trainer.run.model.vocab_size, trainer.micro_batch_rows, cfg.seq_len, trainer.device,
                             cfg.seed)
        plan = build_plan(model, cfg.activation_checkpointing, cfg.memory_budget, batch, trainer.autocast())
        plan.names = same_on_every_rank(plan.names)
        trainer.router_probe.pop_loss()  # drop what the router probe saw during the measurement
        trainer.activation_checkpointing = ActivationCheckpointing(model, plan.names)
        trainer.console.print(plan.summary())
        if trainer.is_main:  # every rank writing the same file at once interleaved them (invalid JSON)
            (Path(trainer.run_dir) / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    if cfg.offload != "none":
        trainer.console.print(apply_offload(cfg.offload, model, trainer.optimizer, trainer.device))
    return plan


__all__ = ["CheckpointPlan", "build_plan", "sample_batch", "setup_memory"]
