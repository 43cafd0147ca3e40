"""Peak host memory of `moeforge.from_pretrained`, as a multiple of the checkpoint's size.

Writes one random checkpoint per dtype (fp32, bf16), then loads it in a fresh process per case and
reports, over the loaded model's size, the growth of its peak anonymous memory (RssAnon, sampled every
2 ms: the memory that counts against RAM) and of its peak resident size (VmHWM, which also counts the
safetensors pages mapped from the page cache). Linux only. With `--compare-src DIR` (another checkout's
src/, e.g. the previous version) the same loads run with that code too, side by side.

    python benchmarks/load_memory.py [--layers 6] [--compare-src /path/to/old/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
CASES = [("fp32", "None"), ("bf16", "None"), ("bf16", "torch.bfloat16")]

CHILD = """
import sys, threading, time, torch
torch.set_num_threads(1)
import moeforge

def status(key):
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024

peaks = {{"anon": 0}}
done = threading.Event()
def sample():
    while not done.is_set():
        peaks["anon"] = max(peaks["anon"], status("RssAnon"))
        time.sleep(0.002)

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
before_rss, before_anon = status("VmRSS"), status("RssAnon")
thread = threading.Thread(target=sample)
thread.start()
model = moeforge.from_pretrained(sys.argv[1], dtype={dtype})
done.set(); thread.join()
peaks["anon"] = max(peaks["anon"], status("RssAnon"))
size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
print(peaks["anon"] - before_anon, status("VmHWM") - before_rss, size)
"""


def write_checkpoint(folder: Path, layers: int, dtype: str) -> int:
    sys.path.insert(0, SRC)
    import torch

    from moeforge.config import ModelConfig
    from moeforge.hf import save_pretrained
    from moeforge.model import Transformer

    config = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=8, n_routed_experts=32, num_experts_per_tok=4,
                         q_lora_rank=256, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64)
    torch.manual_seed(0)
    save_pretrained(Transformer(config.validate()), folder, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(src: str, folder: Path, dtype: str) -> tuple[int, int, int]:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD.format(dtype=dtype), str(folder)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--compare-src", default=None, help="another checkout's src/ to measure side by side")
    args = ap.parse_args()
    srcs = [("this", SRC)] + ([("compare", args.compare_src)] if args.compare_src else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {d: write_checkpoint(Path(tmp) / d, args.layers, d) for d in ("fp32", "bf16")}
        for file_dtype, load_dtype in CASES:
            row = {"file": file_dtype, "dtype": load_dtype, "file_MB": round(sizes[file_dtype] / 1e6, 1)}
            for name, src in srcs:
                try:
                    anon, rss, model_bytes = measure(src, Path(tmp) / file_dtype, load_dtype)
                    row["model_MB"] = round(model_bytes / 1e6, 1)
                    row[f"{name}_anon_peak_over_model"] = round(anon / model_bytes, 2)
                    row[f"{name}_rss_peak_over_model"] = round(rss / model_bytes, 2)
                except subprocess.CalledProcessError as e:
                    row[f"{name}_peak_MB"] = "failed: " + (e.stderr.strip().splitlines() or ["?"])[-1][:60]
            rows.append(row)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
