"""`moeforge memory`: measure a configuration's training memory on random tokens (no corpus needed),
optionally with an activation-checkpointing mode, and print the breakdown and the plan."""

from __future__ import annotations

import json
from dataclasses import fields


def add_memory_command(sub) -> None:
    from ..cli import add_train_flags

    m = sub.add_parser("memory", help="measured memory breakdown of a training step (and a checkpointing plan)",
                       description="Build the model of a preset or run config, run a few AdamW steps on random "
                                   "tokens and report parameters, gradients, optimizer states and activations per "
                                   "module type and layer. Training flags (--preset, --batch-size, --seq-len, "
                                   "--activation-checkpointing, --memory-budget, ...) apply as in `train`.")
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
    caps = hardware.probe(cfg.device)
    dtype = hardware.autocast_dtype(cfg.precision, caps)
    torch.manual_seed(cfg.seed)
    model = hardware.configure(Transformer(run.model), caps, seq_len=cfg.seq_len).to(caps.device)
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
    print(f"preset {cfg.preset}, batch {cfg.batch_size} x {cfg.seq_len}, "
          f"{'bf16 autocast' if dtype else 'fp32'}, {caps.device}")
    print(report.table())
    if plan.mode != "none":
        print(plan.summary())
    return 0
