"""How close FP8 training stays to BF16, and where the error comes from (docs/precision.md).

  loss   train the same model, data and seed with --precision bf16, fp8 (1x128 / 128x128 E4M3) and
         fp8-tensorwise, one after another in this process; print the relative difference of the
         final validation loss and of the mean training loss over the last 10% of steps vs bf16.
  quant  capture real linear-layer inputs and output gradients from a short bf16 moeforge run and print
         the relative RMS error of E4M3 per-tensor / 1x128 tile / 128x128 block, E5M2 1x128 tile,
         LogFMT-8 and LogFMT-10 on them.
  accum  dot products of K = 4096 FP8 (E4M3, 1x128-scaled) values through an accumulator with ~14
         fraction bits, with and without promotion to fp32 every 128 elements; max and mean relative
         error vs an exact (float64) sum.

  python benchmarks/fp8_fidelity.py loss --steps 300 [--preset tiny --batch-size 16 --seq-len 256]
  python benchmarks/fp8_fidelity.py loss --precisions fp8@emulated,fp8@rowwise   # FP8 GEMM paths
  python benchmarks/fp8_fidelity.py quant [--steps 30]
  python benchmarks/fp8_fidelity.py accum [--k 4096 --bits 14]
  python benchmarks/fp8_fidelity.py optim [--preset tiny]   # AdamW state memory, fp32 vs bf16 moments
  python benchmarks/fp8_fidelity.py table DIR...            # merge `loss --out DIR` runs made separately
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from moeforge import hardware
from moeforge.config import resolve_run_config
from moeforge.precision.gemm import limited_precision_dot
from moeforge.precision.logfmt import logfmt_roundtrip
from moeforge.precision.quant import BLOCK, E4M3, E5M2, TENSOR, TILE, quantize
from moeforge.train import Trainer


def run_settings(args, precision: str, run_dir: Path) -> dict:
    return dict(preset=args.preset, precision=precision, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, warmup_steps=max(1, args.steps // 10), eval_every=0,
                eval_batches=args.eval_batches, sample_tokens=0, device="cpu", seed=args.seed,
                max_corpus_mb=args.max_corpus_mb, data=args.data, log_expert_counts=False, run_dir=str(run_dir))


def cmd_loss(args) -> None:
    """A precision may name its FP8 GEMM path, `fp8@rowwise` (precision/gemm.py; default: the probed one)."""
    results = {}
    root = Path(args.out or tempfile.mkdtemp(prefix="fp8_fidelity_"))
    for name in args.precisions.split(","):
        precision, _, path = name.partition("@")
        run = resolve_run_config({}, run_settings(args, precision, root / name))
        t0 = time.perf_counter()
        with fp8_gemm_path(path or None):
            summary = Trainer(run).fit()
        rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        tail = rows[-max(1, len(rows) // 10):]
        results[name] = {"val": summary["final_val_loss"], "train_tail": sum(r["loss"] for r in tail) / len(tail),
                         "s_per_step": (time.perf_counter() - t0) / args.steps}
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{args.preset}, {args.steps} steps, batch {args.batch_size} x {args.seq_len}, seed {args.seed}")
    print_table(results)
    (root / "fidelity.json").write_text(json.dumps(results, indent=2))
    print(f"runs and fidelity.json in {root}")


@contextlib.contextmanager
def fp8_gemm_path(path: str | None):
    """Make the trainer's device probe report `path` as the FP8 GEMM path (None: leave it alone)."""
    if path is None:
        yield
        return
    real = hardware.probe
    hardware.probe = lambda device="auto": dataclasses.replace(real(device), fp8_gemm=path)
    try:
        yield
    finally:
        hardware.probe = real


def print_table(results: dict) -> None:
    ref = "bf16" if "bf16" in results else next(iter(results), "")
    base = results.get(ref)
    vs = f"vs {ref}"[:9]
    print(f"{'precision':16} {'val loss':>9} {vs:>9} {'train(last10%)':>15} {vs:>9} {'s/step':>7}")
    for name, r in results.items():
        dv = (r["val"] - base["val"]) / base["val"] if base else float("nan")
        dt = (r["train_tail"] - base["train_tail"]) / base["train_tail"] if base else float("nan")
        print(f"{name:16} {r['val']:9.4f} {dv:+9.3%} {r['train_tail']:15.4f} {dt:+9.3%} {r['s_per_step']:7.2f}")


def cmd_table(args) -> None:
    """Merge the fidelity.json of `loss` runs made separately (e.g. one process per precision)."""
    results = {}
    for folder in args.folders:
        results.update(json.loads((Path(folder) / "fidelity.json").read_text()))
    order = sorted(results, key=lambda k: (k != "bf16", k))
    print_table({k: results[k] for k in order})


def capture(args) -> dict[str, list[torch.Tensor]]:
    """Train briefly in bf16, then run one more step recording every nn.Linear's input (activations)
    and output gradient, as fp32 2-D tensors."""
    run = resolve_run_config({}, run_settings(args, "bf16", Path(tempfile.mkdtemp(prefix="fp8_capture_"))))
    trainer = Trainer(run)
    trainer.fit()
    acts, grads, handles = [], [], []
    for name, m in trainer.model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            handles.append(m.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].detach().float())))
            handles.append(m.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].detach().float())))
    trainer.train_step()
    for h in handles:
        h.remove()
    flat = lambda ts: [t.reshape(-1, t.shape[-1]) for t in ts]
    return {"activations": flat(acts), "gradients": flat(grads)}


def rel_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


CODECS = {
    "E4M3 per-tensor": lambda x: quantize(x, TENSOR, E4M3).dequantize(),
    "E4M3 1x128 tile": lambda x: quantize(x, TILE, E4M3).dequantize(),
    "E4M3 128x128 block": lambda x: quantize(x, BLOCK, E4M3).dequantize(),
    "E5M2 1x128 tile": lambda x: quantize(x, TILE, E5M2).dequantize(),
    "LogFMT-8 (1x128)": lambda x: logfmt_roundtrip(x, 8),
    "LogFMT-10 (1x128)": lambda x: logfmt_roundtrip(x, 10),
    "BF16 (reference)": lambda x: x.bfloat16().float(),
}


def cmd_quant(args) -> None:
    tensors = capture(args)
    print(f"\nrelative RMS error, median (max) over the {len(tensors['activations'])} linear-layer inputs and "
          f"output gradients of one {args.preset} training step after {args.steps} bf16 steps")
    print(f"{'format':22} {'activations':>18} {'gradients':>18}")
    for name, codec in CODECS.items():
        cells = []
        for kind in ("activations", "gradients"):
            errs = torch.tensor([rel_rms(codec(t), t) for t in tensors[kind] if t.norm() > 0])
            cells.append(f"{errs.median():.4f} ({errs.max():.4f})")
        print(f"{name:22} {cells[0]:>18} {cells[1]:>18}")


def cmd_accum(args) -> None:
    g = torch.Generator().manual_seed(args.seed)
    # Positive FP8 operands (post-activation-like; every partial sum grows, the worst case for a
    # short accumulator) and zero-mean ones, both 1x128-tile quantised and dequantised.
    cases = {"positive": (torch.rand(args.rows, args.k, generator=g), torch.rand(args.rows, args.k, generator=g)),
             "zero-mean": (torch.randn(args.rows, args.k, generator=g), torch.randn(args.rows, args.k, generator=g))}
    print(f"K = {args.k}, accumulator with {args.bits} fraction bits, {args.rows} dot products; relative error "
          "vs float64: max / mean")
    for case, (a, b) in cases.items():
        a8 = quantize(a, TILE, E4M3).dequantize().double()
        b8 = quantize(b, TILE, E4M3).dequantize().double()
        exact = (a8 * b8).sum(-1)
        scale = (a8 * b8).abs().sum(-1)  # relative to sum |a b| (zero-mean sums can cancel to ~0)
        for label, kw in (("no promotion", {}), ("promote every 128", {"promote_every": 128})):
            for trunc in (False, True):
                got = limited_precision_dot(a8, b8, args.bits, truncate=trunc, **kw).double()
                err = (got - exact).abs() / (exact.abs() if case == "positive" else scale)
                print(f"  {case:9} {label:18} {'truncate' if trunc else 'round':8}: max {float(err.max()):.3%}  "
                      f"mean {float(err.mean()):.4%}")


def cmd_optim(args) -> None:
    from moeforge.config import preset
    from moeforge.model import Transformer
    from moeforge.precision.optim import AdamWBF16Moments, optimizer_state_bytes

    model = Transformer(preset(args.preset))
    sizes = {}
    for name, make in (("torch AdamW (fp32 moments)", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
                       ("AdamWBF16Moments", lambda ps: AdamWBF16Moments(ps, lr=1e-3))):
        opt = make(list(model.parameters()))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        sizes[name] = optimizer_state_bytes(opt)
    n = model.num_parameters()
    fp32, bf16 = sizes.values()
    print(f"{args.preset}: {n / 1e6:.2f}M parameters; optimizer state {fp32 / 2**20:.1f} MiB (fp32 moments) vs "
          f"{bf16 / 2**20:.1f} MiB (bf16 moments): {fp32 / bf16:.2f}x less, {(fp32 - bf16) / 2**20:.1f} MiB saved "
          f"({(fp32 - bf16) / n:.0f} bytes per parameter)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("loss", "quant"):
        s = sub.add_parser(name)
        s.add_argument("--preset", default="tiny")
        s.add_argument("--steps", type=int, default=300 if name == "loss" else 30)
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--seq-len", type=int, default=256)
        s.add_argument("--eval-batches", type=int, default=8)
        s.add_argument("--max-corpus-mb", type=float, default=16.0)
        s.add_argument("--data", default=None)
        s.add_argument("--seed", type=int, default=1234)
        s.add_argument("--out", default=None, help="folder for the runs (default: a temp folder)")
        s.add_argument("--precisions", default="bf16,fp8,fp8-tensorwise")
    a = sub.add_parser("accum")
    a.add_argument("--k", type=int, default=4096)
    a.add_argument("--bits", type=int, default=14)
    a.add_argument("--rows", type=int, default=256)
    a.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("folders", nargs="+")
    o = sub.add_parser("optim")
    o.add_argument("--preset", default="tiny")
    args = p.parse_args(argv)
    {"loss": cmd_loss, "quant": cmd_quant, "accum": cmd_accum, "optim": cmd_optim, "table": cmd_table}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
