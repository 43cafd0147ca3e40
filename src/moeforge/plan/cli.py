"""`moeforge plan` and `moeforge compare-kv`: parsers and handlers, hooked into moeforge.cli from here so
the main CLI file only registers and dispatches them."""

from __future__ import annotations

import json
from dataclasses import fields

from ..errors import ConfigError
from .layout import Layout, TrainSettings, parse_layout
from .network import TOPOLOGIES

KV_MODELS = ("deepseek-v3", "deepseek-v2", "qwen2.5-72b", "llama3.1-405b")


def add_plan_commands(sub) -> dict:
    """Register the subcommands on `sub` (an argparse subparsers object); return {name: handler}."""
    from .models import PLAN_MODELS

    p = sub.add_parser("plan", help="predict memory, step time and TPOT; rank parallel layouts",
                       description="Hardware co-design planner: memory per GPU, step time, MFU and decode TPOT "
                                   "of a model on a cluster, and the fastest parallel layout that fits.")
    p.add_argument("--model", default="deepseek-v3",
                   help=f"{', '.join(PLAN_MODELS)}, or a Hugging Face config.json (default: deepseek-v3)")
    p.add_argument("--hardware", default="h800", help="catalogue name (a100, h100, h800, h20, h200, b200, "
                                                       "gb200-nvl72), an entry of --hardware-file, or cpu")
    p.add_argument("--hardware-file", metavar="FILE.toml", help="extra [hardware.NAME] entries")
    p.add_argument("--gpus", type=int, default=2048)
    p.add_argument("--seq", type=int, default=4096, help="training sequence length")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: 8 x the GPU count; DeepSeek-V3 ended at 15360 on 2048)")
    p.add_argument("--topology", choices=TOPOLOGIES, default=None,
                   help="network (default: one node if it fits, else the smallest fat-tree that does)")
    p.add_argument("--layout", metavar="K=V,...", help="evaluate one layout instead of searching, e.g. "
                                                       "dp=128,pp=16,ep=64,schedule=dualpipe,recompute=selective")
    p.add_argument("--set", dest="settings", action="append", metavar="FIELD=VALUE", default=[],
                   help="override a TrainSettings field, e.g. --set overlap=0.5 --set precision=bf16")
    p.add_argument("--top", type=int, default=5, help="layouts to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="OUT.png", help="draw a roofline and the step-time breakdown")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine and predict a step of moeforge's own `tiny` training on it")
    p.add_argument("--against", metavar="RUN_DIR",
                   help="predict a finished local run (its config.toml) on this machine, measured now, and "
                        "print predicted vs measured step time (metrics.jsonl) and memory")
    p.add_argument("--threads", type=int, default=None,
                   help="with --against: threads per rank the run used (default: OMP_NUM_THREADS, else the "
                        "cores shared evenly, as --nproc does)")
    p.add_argument("--processes", type=int, default=None,
                   help="with --against: ranks of the run (default: from its distributed checkpoint)")

    k = sub.add_parser("compare-kv", help="KV-cache bytes per token of MLA vs GQA models (Insights, Table 1)")
    k.add_argument("models", nargs="*", default=list(KV_MODELS), metavar="MODEL",
                   help=f"presets or config.json paths (default: {' '.join(KV_MODELS)})")
    k.add_argument("--json", action="store_true")
    return PLAN_HANDLERS


def settings_from_args(args) -> TrainSettings:
    from ..cli import parse_overrides

    over = parse_overrides(args.settings)
    known = {f.name for f in fields(TrainSettings)}
    bad = sorted(set(over) - known)
    if bad:
        raise ConfigError(f"--set: unknown field(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    global_batch = args.global_batch if args.global_batch is not None else 8 * args.gpus
    try:
        return TrainSettings(**{"seq_len": args.seq, "global_batch": global_batch, **over}).validate()
    except TypeError as e:
        raise ConfigError(str(e)) from None


def cmd_plan(args) -> int:
    from .catalog import get_hardware, load_catalog
    from .models import load_model
    from .planner import plan
    from .render import plan_json, plan_text

    if args.against is None and (args.threads is not None or args.processes is not None):
        raise ConfigError("--threads and --processes describe a run: use them with --against RUN_DIR")
    if args.against is not None:
        from .against import against_report

        for name in ("threads", "processes"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ConfigError(f"--{name} must be >= 1")
        print(against_report(args.against, as_json=args.json, threads=args.threads, processes=args.processes))
        return 0
    if args.calibrate:
        from .calibrate import calibrate_report

        print(calibrate_report(as_json=args.json))
        return 0
    extra = load_catalog(args.hardware_file) if args.hardware_file else None
    hw = get_hardware(args.hardware, extra)
    model = load_model(args.model)
    settings = settings_from_args(args)
    layout = None
    if args.layout:
        try:
            layout = Layout(**parse_layout(args.layout))
        except TypeError as e:
            raise ConfigError(f"--layout: {e}") from None
    from rich.console import Console

    what = f"searching the layouts of {model.name} on {args.gpus} {hw.name}"
    with Console(stderr=True).status(f"{what} ...") as status:
        def progress(considered: int, fitting: int) -> None:
            status.update(f"{what}: {considered:,} priced, {fitting:,} fit")

        result = plan(model, hw, args.gpus, settings, topology=args.topology, layout=layout, top=max(1, args.top),
                      progress=progress)
    print(json.dumps(plan_json(result)) if args.json else plan_text(result))
    if args.plot:
        from .render import plot_plan

        path = plot_plan(result, args.plot)
        if not args.json:
            print(f"wrote {path}")
    return 0


def cmd_compare_kv(args) -> int:
    from .render import kv_json, kv_text

    print(json.dumps(kv_json(args.models)) if args.json else kv_text(args.models))
    return 0


PLAN_HANDLERS = {"plan": cmd_plan, "compare-kv": cmd_compare_kv}
