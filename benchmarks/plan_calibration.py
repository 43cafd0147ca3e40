"""Predicted vs measured step time of moeforge's own `tiny` training on this machine.

    python benchmarks/plan_calibration.py [--steps 6]

Measures the median wall time of optimizer steps (after two warm-up steps) with Trainer.train_step, and
prints it next to `moeforge plan --calibrate`'s prediction. The issue's aim is agreement within 25%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from moeforge.config import resolve_run_config
from moeforge.plan.calibrate import predict_tiny_step
from moeforge.train import Trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = resolve_run_config({}, dict(preset="tiny", batch_size=args.batch_size, seq_len=args.seq_len,
                                          steps=args.steps + 2, device="cpu", sample_tokens=0, max_corpus_mb=2.0,
                                          run_dir=str(Path(tmp) / "run")))
        trainer = Trainer(run, run_dir=Path(tmp) / "run")
        precision = "bf16" if trainer.amp_dtype is not None else "fp32"
        times = []
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            if i >= 2:
                times.append(time.perf_counter() - t0)
    measured = statistics.median(times)
    pred = predict_tiny_step(args.batch_size, args.seq_len, precision)
    err = pred["predicted_step_s"] / measured - 1
    print(f"tiny, batch {args.batch_size} x seq {args.seq_len}, {precision}: predicted {pred['predicted_step_s']:.3f} s "
          f"(matmuls at their traced shapes {pred['matmul_s']:.3f} + {pred['other_bytes'] / 1e9:.1f} GB other traffic "
          f"{pred['memory_s']:.3f} + {pred['other_ops']} dispatches {pred['dispatch_s']:.3f}; one peak matmul rate would "
          f"say {pred['peak_matmul_s']:.3f} for the matmuls), measured median {measured:.3f} s over {len(times)} steps "
          f"-> {100 * err:+.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
