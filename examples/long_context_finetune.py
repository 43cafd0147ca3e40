"""Long-context fine-tuning: train `tiny` at a short length, extend it 4x with YaRN under context parallelism,
and compare validation loss at the positions beyond the training length, before and after.

Data: the longest source files of the default corpus (the Python standard library), split by file into
training and held-out files. Validation windows start at the beginning of a held-out file, so position p
really is the p-th byte of a document (long positions can use long context).

Stages (all through the `moeforge train` CLI):
  1. `moeforge train --preset tiny --seq-len SHORT` on the training files (one process);
  2. a copy of that run continued at --seq-len FACTOR x SHORT with YaRN (factor FACTOR,
     original_max_position_embeddings SHORT) on --nproc C --cp C: `--resume --allow-config-change
     seq_len,rope_scaling` (the optimizer state and step counter continue, as in a context-extension phase);
  3. per-position validation loss on the held-out files at FACTOR x SHORT tokens, for: the stage-1 model as
     trained (plain RoPE, positions past SHORT never seen), the same weights with YaRN switched on (no
     training), and the fine-tuned model;
  --control: also a copy continued as many steps on as many tokens at SHORT (plain RoPE, batch x FACTOR,
     same learning rate), so that what fine-tuning gains by more training alone shows.

  python examples/long_context_finetune.py [--short 128 --factor 4 --steps 300 --finetune-steps 100 --cp 2]
      [--control]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeforge.checkpoint import latest_checkpoint
from moeforge.hf import from_pretrained, hf_to_moeforge, load_into, read_safetensors
from moeforge.model import Transformer


def long_files(min_bytes: int, limit_mb: float) -> list[Path]:
    """The standard library's .py files of at least min_bytes (in path order, tests and site-packages left
    out), up to limit_mb in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "test", "tests"} & set(p.parts)
                   and p.stat().st_size >= min_bytes)
    out, total = [], 0
    for p in files:
        if total > limit_mb * 2**20:
            break
        try:
            p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(p)
        total += p.stat().st_size
    return out


def split_files(files: list[Path], folder: Path, val_every: int) -> list[Path]:
    """Every val_every-th file is held out (returned); the others are copied into folder/train."""
    train = folder / "train"
    train.mkdir(parents=True)
    held = []
    for i, p in enumerate(files):
        if i % val_every == 0:
            held.append(p)
        else:
            shutil.copy(p, train / f"{i:04d}_{p.name}")
    return held


def moeforge(*args: str) -> None:
    cmd = [sys.executable, "-m", "moeforge", "train", *args]
    print("$ moeforge train " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def yarn(factor: float, original: int) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}


@torch.no_grad()
def position_losses(model: Transformer, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss at each position [T-1] over the windows [N, T]."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1)
    for row in windows.split(8):
        logits = model(row[:, :-1]).logits
        total += F.cross_entropy(logits.transpose(1, 2).float(), row[:, 1:], reduction="none").sum(0)
    return total / windows.shape[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=128, help="training length of stage 1")
    ap.add_argument("--factor", type=int, default=4, help="extension factor (YaRN factor; long = factor x short)")
    ap.add_argument("--steps", type=int, default=300, help="stage-1 steps")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--cp", type=int, default=2, help="context-parallel ranks of the fine-tuning")
    ap.add_argument("--data-mb", type=float, default=4.0, help="MB of long standard-library files")
    ap.add_argument("--min-file-bytes", type=int, default=8192, help="long files: at least this many bytes")
    ap.add_argument("--val-files", type=int, default=64, help="held-out windows (one per held-out file)")
    ap.add_argument("--control", action="store_true", help="also continue at the short length (see above)")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temporary one)")
    args = ap.parse_args()
    long = args.short * args.factor
    work = args.work or Path(tempfile.mkdtemp(prefix="moeforge-longctx-"))
    min_bytes = max(long + 1, args.min_file_bytes)
    files = long_files(min_bytes, args.data_mb)
    held = split_files(files, work / "data", val_every=max(2, len(files) // args.val_files))[:args.val_files]
    windows = torch.stack([torch.frombuffer(bytearray(p.read_bytes()[:long + 1]), dtype=torch.uint8).long()
                           for p in held])
    print(f"{len(files)} files of >= {min_bytes} bytes ({sum(p.stat().st_size for p in files) / 2**20:.1f} MB), "
          f"{len(held)} held out; work folder {work}")
    common = ["--data", str(work / "data" / "train"), "--batch-size", str(args.batch_size), "--device", "cpu",
              "--precision", "fp32", "--sample-tokens", "0", "--eval-batches", "4"]
    short_run, long_run = work / "short", work / "long"
    t0 = time.perf_counter()
    moeforge("--preset", "tiny", *common, "--seq-len", str(args.short), "--steps", str(args.steps),
             "--save-every", str(args.steps), "--eval-every", str(args.steps), "--run-dir", str(short_run))
    t1 = time.perf_counter()
    shutil.copytree(short_run, long_run)
    total = args.steps + args.finetune_steps
    moeforge("--resume", "--run-dir", str(long_run), "--seq-len", str(long), "--steps", str(total),
             "--lr", str(args.finetune_lr), "--warmup-steps", "0", "--save-every", str(total),
             "--eval-every", str(total), "--nproc", str(args.cp), "--cp", str(args.cp),
             "-m", "rope_scaling=" + json.dumps(yarn(args.factor, args.short)),
             "--allow-config-change", "seq_len,rope_scaling,lr,warmup_steps")
    t2 = time.perf_counter()
    control_run = work / "control"
    if args.control:
        shutil.copytree(short_run, control_run)
        moeforge("--resume", "--run-dir", str(control_run), "--steps", str(total), "--lr", str(args.finetune_lr),
                 "--warmup-steps", "0", "--batch-size", str(args.batch_size * args.factor), "--save-every", str(total),
                 "--eval-every", str(total), "--allow-config-change", "lr,warmup_steps,batch_size")

    trained = from_pretrained(latest_checkpoint(short_run))
    zero_shot_config = dataclasses.replace(trained.config, rope_scaling=yarn(args.factor, args.short)).validate()
    zero_shot = Transformer(zero_shot_config)
    load_into(zero_shot, hf_to_moeforge(read_safetensors(latest_checkpoint(short_run)), zero_shot_config))
    zero_shot.rotary.reset()
    tuned = from_pretrained(latest_checkpoint(long_run))
    control = [(f"control: continued at {args.short} on as many tokens, plain RoPE", from_pretrained(
        latest_checkpoint(control_run)))] if args.control else []
    print(f"\nvalidation loss (nats/byte) on {len(held)} held-out files, first {long} positions of each")
    print(f"| model | positions 0-{args.short - 1} | positions {args.short}-{long - 1} | all |")
    print("|---|---|---|---|")
    for name, model in ((f"stage 1 (trained at {args.short}, plain RoPE)", trained),
                        (f"stage 1 + YaRN x{args.factor}, no training", zero_shot),
                        *control, (f"fine-tuned at {long}, YaRN x{args.factor}, cp {args.cp}", tuned)):
        per = position_losses(model, windows)
        print(f"| {name} | {per[:args.short].mean():.4f} | {per[args.short:].mean():.4f} | {per.mean():.4f} |")
    print(f"\nstage 1: {args.steps} steps x {args.batch_size} x {args.short} tokens in {t1 - t0:.0f} s; "
          f"fine-tuning: {args.finetune_steps} steps x {args.batch_size} x {long} tokens on {args.cp} ranks "
          f"in {t2 - t1:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
