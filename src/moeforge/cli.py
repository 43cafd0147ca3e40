"""`moeforge` command line: train, generate, serve, eval, report, balance, info, plan, memory, profile.

`train` flags are generated from `TrainConfig` (one definition, documented there); model fields are
set in a TOML [model] section or with `-m FIELD=VALUE`. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .config import PRESETS, ModelConfig, TrainConfig, decode_none, load_toml, resolve_run_config
from .errors import ConfigError, MoeforgeError
from .evaluation.cli import EVAL_HANDLERS, add_eval_command
from .inference.cli import SERVE_HANDLERS, add_dtype_flag, add_serve_command, inference_precision
from .memory.cli import add_memory_command, cmd_memory
from .plan.cli import PLAN_HANDLERS, add_plan_commands
from .profile.cli import PROFILE_HANDLERS, add_profile_command


def parse_value(text: str):
    """'3' -> 3, 'true' -> True, 'null'/'none' -> None, '{"factor": 4}' -> dict, else the string."""
    if text.strip().lower() == "none":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-m expects FIELD=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def add_train_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        help_text += f" (default: {default})"
        if str(f.type).startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (defaults: the tiny preset on the standard library's source)",
                       description="Train a DeepSeek-V3-style MoE model. Priority: preset < --config < flags.")
    t.add_argument("--config", metavar="FILE.toml", help="TOML file with [train] and [model] sections")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (default: the newest folder under runs/); flags that "
                        "change what is computed (seed, batch size, data, model, ...) are refused, see "
                        "--allow-config-change")
    t.add_argument("--allow-config-change", metavar="FIELD[,FIELD]", default="",
                   help="with --resume: accept these changed config fields although the run will then not "
                        "continue exactly as it would have (e.g. --allow-config-change lr,seed)")
    t.add_argument("-m", "--model", dest="model_overrides", action="append", metavar="FIELD=VALUE",
                   help="override a model config field, e.g. -m n_routed_experts=32 (repeatable)")
    t.add_argument("--profile-memory", action="store_true",
                   help="run 3 steps, print a memory breakdown and save memory.json in the run folder")
    add_train_flags(t)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run folder (its newest intact checkpoint), a checkpoint in it, or a Hugging Face "
                        "DeepseekV3/V2 folder")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, else bytes)")
    g.add_argument("--device", default="auto")
    g.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the model's MTP module as drafter (prints acceptance)")
    from .inference.cli import add_expert_arguments

    add_expert_arguments(g)
    g.add_argument("--image", metavar="FILE", help="multimodal checkpoints: an image before the prompt")
    g.add_argument("--audio", metavar="FILE.wav", help="multimodal checkpoints: a WAV clip before the prompt")
    g.add_argument("--no-cache", action="store_true",
                   help="re-run the whole sequence per token instead of the latent KV cache (reference)")
    add_dtype_flag(g)

    r = sub.add_parser("report", help="summarise a run folder; --plot writes loss and expert-load PNGs")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--plot", action="store_true", help="write loss.png and expert_load.png")
    r.add_argument("--out", metavar="DIR", help="where to write the plots (default: RUN_DIR/plots)")

    b = sub.add_parser("balance", help="expert load balancing tools")
    bsub = b.add_subparsers(dest="balance_command", required=True, metavar="ACTION")
    bp = bsub.add_parser("plan", help="place redundant expert replicas on devices from a load matrix")
    bp.add_argument("--loads", required=True, metavar="loads.json",
                    help="JSON list of per-layer lists of expert loads (or a run's metrics.jsonl)")
    bp.add_argument("--slots", type=int, required=True, help="physical expert slots in all")
    bp.add_argument("--groups", type=int, default=1, help="expert groups (group-limited routing)")
    bp.add_argument("--nodes", type=int, default=1)
    bp.add_argument("--gpus", type=int, required=True, help="devices in all (slots per device = slots / gpus)")
    bp.add_argument("--policy", default="auto", choices=["auto", "hierarchical", "global"])
    bp.add_argument("--json", action="store_true", help="print the placement as JSON")

    i = sub.add_parser("info", help="parameters, FLOPs and KV-cache size of a preset or config.json")
    i.add_argument("model", metavar="PRESET|config.json", help=f"one of {', '.join(PRESETS)} or a path")
    i.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOPs figure")
    add_plan_commands(sub)  # plan, compare-kv
    add_memory_command(sub)  # memory
    add_serve_command(sub)  # serve
    add_eval_command(sub)  # eval
    add_profile_command(sub)  # profile
    return parser


def cmd_train(args) -> int:
    train_overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    model_overrides = parse_overrides(args.model_overrides)
    run_dir = train_overrides.get("run_dir")
    if args.resume:
        run_dir = Path(run_dir) if run_dir else newest_run()
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; --config is not allowed")
        toml = load_toml(run_dir / "config.toml")
    else:
        if args.allow_config_change:
            raise ConfigError("--allow-config-change applies to --resume only")
        toml = load_toml(args.config) if args.config else {}
    run = resolve_run_config(toml, train_overrides, model_overrides)
    if run_dir is not None:
        run.train.run_dir = str(run_dir)
    from .parallel.launch import run_training  # one process, a torchrun rank, or launch torchrun

    return run_training(run, run_dir, args.resume, args.argv, profile_memory=args.profile_memory,
                        allow_config_change=args.allow_config_change)


def newest_run() -> Path:
    runs = [p for p in Path("runs").glob("*") if (p / "config.toml").is_file()]
    if not runs:
        raise ConfigError("--resume: no runs under ./runs; pass --run-dir DIR")
    return max(runs, key=lambda p: p.stat().st_mtime)


def cmd_generate(args) -> int:
    from . import hardware
    from .data import load_tokenizer
    from .generate import generate
    from .checkpoint import resolve_checkpoint_dir
    from .inference.cli import expert_budgeted, load_model

    if args.no_cache and (args.mtp or expert_budgeted(args)):
        flag = "--mtp" if args.mtp else "--expert-budget/--expert-memory"
        raise ConfigError(f"--no-cache runs the cache-free reference path, which has no {flag}; drop one of them")
    folder = resolve_checkpoint_dir(args.checkpoint)
    if args.image or args.audio:
        from .multimodal.cli import generate_with_media

        return generate_with_media(folder, args)
    tokenizer_path = args.tokenizer
    if tokenizer_path is None and (folder / "tokenizer.json").is_file():
        tokenizer_path = str(folder / "tokenizer.json")
    if tokenizer_path is None:
        for run_config in (folder.parent.parent / "config.toml", Path(args.checkpoint) / "config.toml"):
            if run_config.is_file():
                tokenizer_path = decode_none(load_toml(run_config).get("train", {}).get("tokenizer"))
                break
    tokenizer = load_tokenizer(tokenizer_path)
    caps = hardware.probe(args.device)
    weights, autocast = inference_precision(args.dtype, caps, folder)
    model, args.expert_cache = load_model(folder, caps, args, weights)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    stop = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    if args.no_cache:
        new = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop, autocast_dtype=autocast)
    else:
        from .inference.cli import generate_cached

        new = generate_cached(model, tokenizer.encode(args.prompt) or [stop[0] if stop else 0], args, stop, autocast)
    print(args.prompt + tokenizer.decode(new))
    return 0


def cmd_info(args) -> int:
    from .costs import format_info
    from .hf import load_config

    if args.model in PRESETS:
        config, title = ModelConfig(**PRESETS[args.model]).validate(), f"preset {args.model}"
    else:
        path = Path(args.model)
        if path.is_file() and path.name.endswith(".json"):
            path = path.parent if path.name == "config.json" else path
        if path.is_dir():
            config, title = load_config(path), str(path)
        elif not path.exists():
            raise ConfigError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
        else:
            from .hf import config_from_hf

            try:
                config = config_from_hf(json.loads(path.read_text()))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            title = str(path)
    print(format_info(config, seq_len=args.seq_len, title=title))
    return 0


def cmd_report(args) -> int:
    from .report import plot, read_metrics, summarize

    rows = read_metrics(Path(args.run_dir))
    print(summarize(rows))
    if args.plot:
        from .multimodal.report import plot_modality_load

        out = Path(args.out) if args.out else Path(args.run_dir) / "plots"
        for path in plot(rows, out) + plot_modality_load(Path(args.run_dir), out):
            print(f"wrote {path}")
    return 0


def cmd_balance(args) -> int:
    from .balance.placement import plan_placement, unreplicated

    loads = read_loads(Path(args.loads))
    placement = plan_placement(loads, args.slots, args.groups, args.nodes, args.gpus, policy=args.policy)
    if args.json:
        print(json.dumps(placement.to_json()))
        return 0
    try:
        before = unreplicated(loads, args.gpus).balancedness()
    except ConfigError:
        before = None
    after = placement.balancedness()
    print(f"{len(loads)} layer(s), {len(loads[0])} experts -> {args.slots} slots on {args.gpus} device(s) "
          f"in {args.nodes} node(s); balancedness = mean device load / max device load")
    for layer, row in enumerate(placement.phy2log):
        was = f"{before[layer]:.3f} -> " if before is not None else ""
        hot = placement.logcnt[layer].argsort()[::-1][:3]
        replicas = ", ".join(f"e{e}x{placement.logcnt[layer][e]}" for e in hot if placement.logcnt[layer][e] > 1)
        print(f"  layer {layer}: {was}{after[layer]:.3f}" + (f"  (replicated: {replicas})" if replicas else ""))
    return 0


def read_loads(path: Path) -> list[list[float]]:
    """A JSON [layers][experts] matrix, or the summed expert_counts of a run's metrics.jsonl."""
    if not path.is_file():
        raise ConfigError(f"loads file not found: {path}")
    if path.suffix == ".jsonl":
        from .report import read_metrics

        rows = [r["expert_counts"] for r in read_metrics(path.parent) if "expert_counts" in r]
        if not rows:
            raise ConfigError(f"{path}: no expert_counts logged")
        return [[sum(r[layer][e] for r in rows) for e in range(len(rows[0][layer]))] for layer in range(len(rows[0]))]
    try:
        loads = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(loads, list) and loads and all(isinstance(r, list) and r for r in loads)):
        raise ConfigError(f"{path}: expected a JSON list of per-layer lists of expert loads")
    if len({len(r) for r in loads}) != 1:
        raise ConfigError(f"{path}: every layer must list the same number of experts")
    return loads


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` re-runs it under torchrun
    handler = {"train": cmd_train, "generate": cmd_generate, "info": cmd_info, "report": cmd_report,
               "balance": cmd_balance, "memory": cmd_memory, **PLAN_HANDLERS, **SERVE_HANDLERS, **EVAL_HANDLERS,
               **PROFILE_HANDLERS}[args.command]
    try:
        return handler(args)
    except MoeforgeError as e:
        print(f"moeforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
