"""A model several times larger than a memory limit, generated with expert budgets from all experts down
to top-k: load peak RSS, generate peak RSS, tokens/s, expert-cache hit rate, MB read per token and what
next-layer prefetch buys.

Writes one random fp32 checkpoint of about `--times` x `--limit-mb` (almost all of it routed experts), then
runs each case in a fresh process and measures its peak resident memory growth over the runtime's
baseline (VmHWM after a /proc/self/clear_refs reset, so file pages a process maps count too). "fits" says
whether the whole run stayed under the limit. Greedy tokens are compared with the fully resident model's.
Linux only. No cgroup is needed: the peak is measured, not enforced.

    python benchmarks/big_model.py [--limit-mb 256] [--times 4] [--new-tokens 24]
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

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from moeforge.hf import from_pretrained
from moeforge.inference import generate
from moeforge.inference.expert_cache import load_budgeted, moe_modules

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) * 1024

folder, budget, prefetch, new = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
prompt = [[(7 * i) % 1000 + 1 for i in range(16)]]
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
if budget == 0:
    model, cache = from_pretrained(folder), None
    for moe in moe_modules(model).values():
        moe.experts.impl = "loop"  # the cache's per-expert matmuls: identical tokens
else:
    model, cache = load_budgeted(folder, budget=budget, prefetch=prefetch)
out = {"load_peak": status("VmHWM") - base}
generate(model, prompt, 2)  # warm-up (not timed; the cache keeps what it read)
if cache is not None:
    cache.stats = type(cache.stats)()
start = time.perf_counter()
tokens = generate(model, prompt, new)[0]
out["seconds"] = time.perf_counter() - start
out["generate_peak"] = status("VmHWM") - base
out["tokens"] = tokens
if cache is not None:
    s = cache.stats
    out.update(hit_rate=s.hit_rate, mb_per_token=s.bytes_per_token / 1e6, recall=s.prediction_recall,
               prefetched=s.prefetched, prefetch_used=s.prefetch_used, resident=cache.resident_bytes())
print(json.dumps(out))
"""


def write_checkpoint(folder: Path, target_bytes: int, experts: int, top_k: int) -> dict:
    sys.path.insert(0, SRC)
    import torch

    from moeforge.config import ModelConfig
    from moeforge.hf import save_pretrained
    from moeforge.model import Transformer

    D = F = 256
    per_layer = experts * 3 * D * F * 4
    layers = max(1, round(target_bytes / per_layer))
    config = ModelConfig(vocab_size=1024, hidden_size=D, intermediate_size=2 * D, moe_intermediate_size=F,
                         num_hidden_layers=layers, num_attention_heads=4, n_routed_experts=experts,
                         num_experts_per_tok=top_k, first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=64,
                         kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                         num_nextn_predict_layers=0).validate()
    torch.manual_seed(0)
    save_pretrained(Transformer(config), folder)
    return {"layers": layers, "experts": experts, "top_k": top_k,
            "file_MB": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6, 1)}


def run_case(folder: Path, budget: int, prefetch: bool, new: int) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(budget), "1" if prefetch else "0", str(new)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-mb", type=float, default=256, help="the memory limit the model is sized against")
    ap.add_argument("--times", type=float, default=4, help="model size as a multiple of the limit")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--budgets", default=None, help="comma-separated experts per layer (default: E, E/4, 2k, k)")
    args = ap.parse_args()
    limit = args.limit_mb * 1e6
    E, k = args.experts, args.top_k
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else sorted({E, E // 4, 2 * k, k}, reverse=True)
    print("| experts resident | prefetch | load peak MB | generate peak MB | fits limit | tok/s | hit rate "
          "| MB read/token | next-layer recall | prefetches used | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "big"
        info = write_checkpoint(folder, int(args.times * limit), E, k)
        print(json.dumps({**info, "limit_MB": args.limit_mb}), flush=True)
        full = run_case(folder, 0, False, args.new_tokens)
        print_row("all resident", "-", full, full, args.new_tokens, limit)
        for b in budgets:
            for prefetch in (False, True):
                r = run_case(folder, b, prefetch, args.new_tokens)
                print_row(f"{b}/layer", "on" if prefetch else "off", r, full, args.new_tokens, limit)


def print_row(name: str, prefetch: str, r: dict, full: dict, new: int, limit: float) -> None:
    cache = (f"{r['hit_rate']:.1%} | {r['mb_per_token']:.2f} | {r['recall']:.0%} | "
             f"{r['prefetch_used']}/{r['prefetched']}" if "hit_rate" in r else "- | 0 | - | -")
    print(f"| {name} | {prefetch} | {r['load_peak'] / 1e6:.0f} | {r['generate_peak'] / 1e6:.0f} | "
          f"{'yes' if r['generate_peak'] <= limit else 'no'} | {new / r['seconds']:.1f} | {cache} | "
          f"{'yes' if r['tokens'] == full['tokens'] else 'NO'} |", flush=True)

if __name__ == "__main__":
    main()
