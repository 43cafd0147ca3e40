"""`moeforge eval --checkpoint DIR --tasks T1,T2`: run lm-evaluation-harness tasks through its Python API
and write the harness's own results JSON (`results` keyed by task)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from ..errors import ConfigError


def add_eval_command(sub) -> None:
    e = sub.add_parser("eval", help="score a checkpoint on lm-evaluation-harness tasks (needs moeforge[eval])",
                       description="Run lm-evaluation-harness tasks on a checkpoint; writes the harness's results "
                                   "JSON. Built-in tasks download their data from the Hugging Face hub; local task "
                                   "YAMLs go in --include-path.")
    e.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run folder, a checkpoint in it, or a Hugging Face DeepseekV3 folder")
    e.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated harness task or group names")
    e.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N documents per task (a fraction if < 1)")
    e.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (task default)")
    e.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra task YAML files")
    e.add_argument("--output", default=None, metavar="FILE.json",
                   help="results file (default: eval-results.json in the checkpoint's run folder)")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="forward under bf16 autocast or in fp32 (scores are always taken in fp32)")
    e.add_argument("--device", default="auto")
    e.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, else bytes)")
    e.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and sampled generation")
    e.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for the stderr of non-mean metrics (0 = skip stderr)")
    e.add_argument("--log-samples", action="store_true",
                   help="also write every request and the model's responses into the results file")


def default_output(folder: Path) -> Path:
    """eval-results.json in the run folder of runs/X/checkpoints/step-N, else beside the weights."""
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    return run / "eval-results.json"


def task_manager(names: list[str], include_path: str | None):
    """The harness's task index; the thousands of built-in task YAMLs are only indexed when a name is not
    in --include-path (that indexing takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)} (not built into lm-eval"
                          + (f" nor in {include_path})" if include_path else "; local YAMLs go in --include-path)"))
    return manager


def cmd_eval(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("moeforge eval needs lm-evaluation-harness: pip install 'moeforge[eval]'")
    from lm_eval import evaluator
    from lm_eval.utils import handle_non_serializable, make_table

    from .. import hardware
    from ..inference.cli import load_for_inference
    from .harness import MoeforgeLM

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks: give at least one task name")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    if limit is not None and limit <= 0:
        raise ConfigError("--limit must be positive")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path {args.include_path}: not a folder")
    model, tokenizer, _, folder = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    manager = task_manager(names, args.include_path)
    autocast = hardware.autocast_dtype(args.precision, hardware.probe(args.device))
    lm = MoeforgeLM(model, tokenizer, batch_size=args.batch_size, autocast_dtype=autocast, seed=args.seed)
    results = evaluator.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=limit,
                                        task_manager=manager, log_samples=args.log_samples,
                                        bootstrap_iters=args.bootstrap_iters, random_seed=args.seed,
                                        numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                        fewshot_random_seed=args.seed)
    output = Path(args.output) if args.output else default_output(folder)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    print(make_table(results))
    print(f"wrote {output}", file=sys.stderr)
    return 0


EVAL_HANDLERS = {"eval": cmd_eval}
