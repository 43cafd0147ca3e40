"""`moeforge profile`: the parser (every `train` flag, plus --out, --warmup, --hardware) and the handler."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError

# Train flags about a run's lifetime (evaluation, checkpoints, samples, logs): a profile runs only steps.
NOT_PROFILED = ("run_dir", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "sample_tokens",
                "sample_prompt", "log_every")


def add_profile_command(sub) -> dict:
    from ..cli import add_train_flags

    p = sub.add_parser("profile", help="profile training steps: compute, communication, overlap, stragglers",
                       description="Run training steps under torch.profiler (after a warm-up) and write per-rank "
                                   "traces, profile.json, timeline.png and the planner's prediction beside them. "
                                   "Takes every `train` flag; --steps is the number of profiled steps.")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write trace/, profile.json, timeline.png")
    p.add_argument("--warmup", type=int, default=2, help="steps run before profiling (default: 2)")
    p.add_argument("--hardware", default=None,
                   help="planner hardware for the prediction (default: cpu, this machine measured; on a GPU its "
                        "catalogue name, else h100)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [train] and [model] sections")
    p.add_argument("-m", "--model", dest="model_overrides", action="append", metavar="FIELD=VALUE",
                   help="override a model config field (repeatable)")
    add_train_flags(p)
    return PROFILE_HANDLERS


def cmd_profile(args) -> int:
    from ..cli import parse_overrides
    from ..config import TrainConfig, load_toml, resolve_run_config
    from ..parallel.launch import launch_local_ranks, strip_launch_flags, under_torchrun
    from .render import table
    from .run import profile_run

    train = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    refused = [f"--{name.replace('_', '-')}" for name in NOT_PROFILED if name in train]
    if refused:
        raise ConfigError(f"{', '.join(refused)}: not used by profile (it runs training steps only; the run folder "
                          "is OUT/run)")
    try:
        steps = int(train.pop("steps", 3))
    except ValueError:
        raise ConfigError(f"--steps must be an integer, got {args.steps!r}") from None
    if steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {args.warmup}")
    toml = load_toml(args.config) if args.config else {}
    train.update(steps=args.warmup + steps, eval_every=0, sample_tokens=0, save_every=0,
                 log_expert_counts=True)  # per-rank routed rows in profile.json
    run = resolve_run_config(toml, train, parse_overrides(args.model_overrides))
    cfg = run.train
    out = Path(args.out)
    if cfg.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {cfg.nproc}")
    if cfg.nproc > 1 and not under_torchrun():
        from ..parallel.mesh import ParallelLayout

        layout = ParallelLayout.resolve(cfg.nproc, cfg.dp, cfg.ep, cfg.tp, cfg.pp, cfg.zero)
        layout.check_model(run.model).check_batch(cfg.batch_size).check_trainer().check_pipeline(cfg)
        code = launch_local_ranks(cfg.nproc, strip_launch_flags(args.argv))
        if code:
            return code
        profile = json.loads((out / "profile.json").read_text())
    else:
        if (cfg.dp > 1 or cfg.ep > 1 or cfg.tp > 1 or cfg.pp > 1) and not under_torchrun():
            raise ConfigError(f"--dp {cfg.dp} --ep {cfg.ep} --tp {cfg.tp} --pp {cfg.pp} needs several processes: add "
                              "--nproc N or launch with torchrun")
        profile = profile_run(run, out, steps, args.warmup, args.hardware, command="moeforge " + " ".join(args.argv))
        if profile is None or under_torchrun():  # a torchrun rank: the launching process prints
            return 0
    print(table(profile))
    print(f"\nwrote {out / 'profile.json'}, {out / 'timeline.png'}, {out / 'trace'}/rank*.json")
    return 0


PROFILE_HANDLERS = {"profile": cmd_profile}
