"""`moeforge memory`: measure a configuration's training memory on random tokens (no corpus needed),
optionally with an activation-checkpointing mode, and print the breakdown and the plan.

It accepts the `train` flags (so a training command line can be measured by changing its first word), but
applies only the settings that one process measuring AdamW steps on random tokens can: every other flag
is refused rather than silently dropped (a flag that is accepted must act).
"""

from __future__ import annotations

import json
from dataclasses import fields

# TrainConfig fields this command applies (the model, the batch shape, precision, the optimizer, the device
# and activation checkpointing).
APPLIED = frozenset({"preset", "seq_len", "batch_size", "precision", "optimizer_state_dtype", "device", "seed",
                     "lr", "weight_decay", "beta1", "beta2", "activation_checkpointing", "memory_budget"})
# Fields that would change the measured memory but that this command does not apply: refused whenever they
# differ from their defaults, also when a run's config.toml sets them. The other unapplied fields (data,
# schedule, logging, ...) do not change the measurement and are refused only as flags.
CHANGE_MEMORY = frozenset({"nproc", "dp", "ep", "tp", "pp", "zero", "ep_dispatch", "ep_overlap_shared",
                           "pp_schedule", "pp_microbatches", "offload", "compile", "grad_accum", "fp8_policy",
                           "routing"})


def add_memory_command(sub) -> None:
    from ..cli import add_train_flags

    m = sub.add_parser("memory", help="measured memory breakdown of a training step (and a checkpointing plan)",
                       description="Build the model of a preset or run config, run a few AdamW steps on random "
                                   "tokens and report parameters, gradients, optimizer states and activations per "
                                   "module type and layer. The training flags of the model, batch, precision, "
                                   "optimizer, device and activation checkpointing (--preset, --batch-size, "
                                   "--seq-len, --precision, "
                                   "--activation-checkpointing, --memory-budget, ...) apply as in `train`; the "
                                   "others (--nproc, --offload, --data, ...) are refused.")
    m.add_argument("--config", metavar="FILE.toml", help="TOML file with [train] and [model] sections")
    m.add_argument("-m", "--model", dest="model_overrides", action="append", metavar="FIELD=VALUE",
                   help="override a model config field (repeatable)")
    m.add_argument("--profile-steps", type=int, default=2, help="AdamW steps to run; the last is measured")
    m.add_argument("--json", action="store_true", help="print the report (and plan) as JSON")
    add_train_flags(m)


def cmd_memory(args) -> int:
    import torch

    from .. import hardware
    from ..cli import parse_overrides
    from ..config import TrainConfig, load_toml, resolve_run_config
    from ..errors import ConfigError
    from ..model import Transformer
    from ..precision import apply_training_precision
    from ..train import make_optimizer
    from .checkpointing import ActivationCheckpointing
    from .report import profile_steps
    from .setup import build_plan, sample_batch

    if args.profile_steps < 1:
        raise ConfigError("--profile-steps must be >= 1")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    run = resolve_run_config(load_toml(args.config) if args.config else {}, overrides,
                             parse_overrides(args.model_overrides))
    cfg = run.train
    refused = unapplied_settings(cfg, flags=set(overrides))
    if refused:
        raise ConfigError(f"{', '.join(refused)}: not applied by `moeforge memory`, which measures one process "
                          "on random tokens; drop them (or measure a run with `moeforge train --profile-memory`)")
    caps = hardware.probe(cfg.device)
    dtype = hardware.autocast_dtype(cfg.precision, caps)
    torch.manual_seed(cfg.seed)
    model = hardware.configure(Transformer(run.model), caps, seq_len=cfg.seq_len).to(caps.device)
    apply_training_precision(model, cfg.precision)  # fp8*: the FP8 linears and experts, as the trainer does
    optimizer = make_optimizer(model, cfg)
    batch = sample_batch(run.model.vocab_size, cfg.batch_size, cfg.seq_len, caps.device, cfg.seed)

    def autocast():
        return torch.autocast(torch.device(caps.device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    plan = build_plan(model, cfg.activation_checkpointing, cfg.memory_budget, batch, autocast())
    ActivationCheckpointing(model, plan.names)
    report = profile_steps(model, optimizer, batch, args.profile_steps, autocast())
    if args.json:
        print(json.dumps({"report": report.to_json(), "plan": plan.to_json()}, indent=2))
        return 0
    compute = "fp32" if dtype is None else "bf16 autocast"
    if cfg.precision.startswith("fp8"):
        compute = f"{cfg.precision} linears and experts, the rest bf16 autocast"
    print(f"preset {cfg.preset}, batch {cfg.batch_size} x {cfg.seq_len}, {compute}, {caps.device}")
    print(report.table())
    if plan.mode != "none":
        print(plan.summary())
    return 0


def unapplied_settings(cfg, flags: set[str]) -> list[str]:
    """'--flag value' for each setting of `cfg` this command would not apply: a field outside APPLIED that
    was given as a flag, or one in CHANGE_MEMORY that differs from its default (from a flag or the TOML)."""
    from ..config import TrainConfig

    defaults = TrainConfig()
    out = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in APPLIED:
            continue
        if f.name in CHANGE_MEMORY and value == getattr(defaults, f.name):
            continue
        if f.name in CHANGE_MEMORY or f.name in flags:
            flag = "--" + f.name.replace("_", "-")
            out.append((flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag} {value}")
    return out
