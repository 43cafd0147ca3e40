"""The default `moeforge train` step against the matmul peak measured in the same run.

Builds the `Trainer` that `moeforge train` builds (preset `tiny`, batch 16 x 256, MTP depth 1, the
sequence-wise balance loss, bias balancing, clipping, fused AdamW, `--precision auto`), one per variant
(`eager`, `compile`: the same seed, so the same weights and batches), and times `Trainer.train_step`
interleaved (eager, compile, matmul, eager, compile, matmul, ...) so that a shared, noisy machine slows
them alike. Per variant: median step, tokens/s, achieved TFLOP/s (`moeforge.costs.training_flops_per_token`
with the MTP module) as a fraction of an N^3 matmul in the step's dtype timed in the same rounds, and for
`compile` the one-off compile time and the step at which it has paid for itself. `--profile` adds where one
step's time goes, by op class, and the time its GEMMs alone would take at the measured peak.

    python benchmarks/default_step.py                            # eager vs compile, ~3 min on 2 idle cores
    python benchmarks/default_step.py --variants eager --profile
    python benchmarks/default_step.py -t precision=bf16 --peak-n 512   # bf16 (emulated without bf16 hardware)

Results and what they mean: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch
from rich.console import Console

from moeforge.config import resolve_run_config
from moeforge.costs import training_flops_per_token
from moeforge.train import Trainer

VARIANTS = {"eager": dict(compile=False), "compile": dict(compile=True)}

# aten ops by class (self time), for --profile. GEMMs: what the FLOP count counts.
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::matmul",
            "aten::linear", "mkldnn::_linear_pointwise"}
OPTIMIZER_OPS = ("adam", "_foreach", "clip", "norm")
MOVE_OPS = {"aten::copy_", "aten::index_select", "aten::cat", "aten::index", "aten::gather", "aten::scatter_",
            "aten::scatter_add_", "aten::_index_put_impl_", "aten::fill_", "aten::zero_", "aten::clone",
            "aten::embedding_dense_backward", "aten::index_fill_", "aten::_to_copy", "aten::contiguous"}


def build(tmp: str, name: str, train: dict) -> Trainer:
    run = resolve_run_config(train_overrides=dict(run_dir=f"{tmp}/{name}", sample_tokens=0, max_corpus_mb=1.0,
                                                  **VARIANTS[name], **train))
    return Trainer(run, console=Console(file=io.StringIO()))


def step(trainer: Trainer) -> float:
    t0 = time.perf_counter()
    trainer.train_step()
    trainer.step += 1
    return time.perf_counter() - t0


def op_classes(trainer: Trainer) -> dict[str, float]:
    """Self CPU seconds of one step by op class (gemm, elementwise/other, data movement, optimizer)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(trainer)
    out = defaultdict(float)
    for e in prof.key_averages():
        name = e.key
        if not name.startswith(("aten::", "mkldnn::")):
            cls = "python/autograd/compiled (self)"
        elif name in GEMM_OPS:
            cls = "gemm"
        elif any(s in name for s in OPTIMIZER_OPS):
            cls = "optimizer + clipping"
        elif name in MOVE_OPS:
            cls = "copies, gathers, fills"
        else:
            cls = "element-wise, reductions, other"
        out[cls] += e.self_cpu_time_total / 1e6
    return dict(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="eager,compile", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (interleaved); median reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (the compile is in "
                                                         "the first one, timed separately)")
    p.add_argument("--run-steps", type=int, default=300, help="run length for the wall-time projection "
                                                              "(moeforge train's default)")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul that measures the peak")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="also print one profiled step per variant by op class")
    p.add_argument("-t", "--train", action="append", default=[], metavar="FIELD=VALUE",
                   help="a `moeforge train` setting, e.g. -t precision=bf16 -t preset=debug (repeatable)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    train = {}
    for item in args.train:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--train {item!r}: expected FIELD=VALUE")
        for conv in (int, float):
            try:
                value = conv(value)
                break
            except ValueError:
                pass
        train[key.replace("-", "_")] = value
    args.train_fields = train
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: build(tmp, name, args.train_fields) for name in args.variants}
        first = next(iter(trainers.values()))
        cfg, tc = first.run.model, first.cfg
        tokens = tc.batch_size * tc.seq_len * tc.grad_accum
        flops = training_flops_per_token(cfg, tc.seq_len, include_mtp=True) * tokens
        dtype = first.amp_dtype or torch.float32
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {first.caps.summary()}")
        print(f"preset {tc.preset}, precision {tc.precision}, batch {tc.batch_size} x {tc.seq_len} = {tokens} "
              f"tokens/step, {flops / 1e9:.1f} GFLOP/step (incl. MTP); peak: {args.peak_n}^3 matmul in {dtype}")
        compile_s = {}
        for name, tr in trainers.items():
            firsts = [step(tr) for _ in range(max(1, args.warmup))]
            compile_s[name] = firsts[0]
        a = torch.randn(args.peak_n, args.peak_n, dtype=dtype)
        b = torch.randn(args.peak_n, args.peak_n, dtype=dtype)
        a @ b
        times, peaks = defaultdict(list), []
        for _ in range(args.steps):
            for name, tr in trainers.items():
                times[name].append(step(tr))
            t0 = time.perf_counter()
            a @ b
            peaks.append(time.perf_counter() - t0)
        peak = 2 * args.peak_n ** 3 / statistics.median(peaks)

        fmt = "{:<8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>9} {:>10} {:>11} {:>12}"
        print()
        print(fmt.format("variant", "step ms", "min ms", "tokens/s", "TFLOP/s", "% peak", "peak TF/s", "first s",
                         "break-even", f"{args.run_steps} steps s"))
        base = statistics.median(times[args.variants[0]])
        for name in args.variants:
            med = statistics.median(times[name])
            extra = compile_s[name] - med  # one-off cost of the first step (compilation) beyond a normal step
            saving = base - med
            even = "-" if name == args.variants[0] else (f"{extra / saving:.0f} steps" if saving > 0 else "never")
            print(fmt.format(name, f"{med * 1e3:.0f}", f"{min(times[name]) * 1e3:.0f}", f"{tokens / med:.0f}",
                             f"{flops / med / 1e12:.3f}", f"{100 * flops / med / peak:.1f}%", f"{peak / 1e12:.3f}",
                             f"{compile_s[name]:.1f}", even, f"{extra + args.run_steps * med:.0f}"))
        if len(args.variants) > 1:
            print("ratios: " + ", ".join(f"{n} {base / statistics.median(times[n]):.2f}x" for n in args.variants[1:])
                  + f" faster than {args.variants[0]} (median step)")
        print(f"'first s' = the first step (includes compilation); break-even = steps after which the compile has "
              f"paid for itself; GEMMs at peak would take {flops / peak * 1e3:.0f} ms/step.")
        if args.profile:
            for name, tr in trainers.items():
                classes = op_classes(tr)
                total = sum(classes.values())
                print(f"\n--- {name}: one profiled step, {total * 1e3:.0f} ms self CPU time ---")
                for cls, s in sorted(classes.items(), key=lambda kv: -kv[1]):
                    print(f"  {cls:<34} {s * 1e3:8.0f} ms  {100 * s / total:5.1f}%")
                gemm = classes.get("gemm", 0.0)
                if gemm:
                    print(f"  GEMMs run at {flops / gemm / 1e12:.3f} TFLOP/s = {100 * flops / gemm / peak:.0f}% of "
                          f"the {args.peak_n}^3 peak at the step's shapes")
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
