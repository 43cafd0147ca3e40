"""A model several times larger than a memory limit, generated with expert budgets down to top-k: load and
generate peak memory under the limit (enforced by a cgroup where this machine lets us make one), tokens/s
against the fully resident model, expert-cache hit rate, MB read per token, and what next-layer
prediction + prefetch buys.

Writes one random fp32 checkpoint of about `--times` x `--limit-mb` (almost all of it routed experts), then:

1. memory, one fresh process per case: the fully resident model and each budget (prefetch on), each in a
   child memory cgroup limited to `--limit-mb` (cgroup v1 `memory.limit_in_bytes` or v2 `memory.max`,
   below this process's own cgroup; the runtime's own memory counts against the limit too). The
   checkpoint's page cache is dropped first (posix_fadvise), so the case reads it through the limit.
   "fits" = it ran to the end, "killed" = the limit's OOM killer stopped it. Without a usable cgroup
   (`--no-cgroup`, or none writable) the limit is not enforced and "fits" compares the peak with it.
   Peaks are VmHWM growth over the runtime's baseline (after a /proc/self/clear_refs reset).
2. speed, one process, side by side: the resident model and every (budget, prefetch on/off) variant are
   loaded together (no limit) and take turns: `--rounds` rounds, each variant generating the same
   `--new-tokens` from that round's prompt, the variants' order rotated every round. Reported: the median
   tokens/s, the median over rounds of each variant's tokens/s / the resident model's in the same round,
   and of prefetch on / off at the same budget; CPU time per token (all threads: the work, which other
   jobs on a shared machine do not inflate as they inflate wall time) and its ratio to the resident
   model's; the cache's hit rate, MB read per token and next-layer recall (medians); whether the greedy
   tokens equal the resident model's (every round).

Linux only. Misses read the checkpoint from the page cache in part 2 (a warm file): a miss costs a copy,
not a disk read.

    python benchmarks/big_model.py [--limit-mb 512] [--times 3] [--rounds 7] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

MEMORY_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from moeforge import hardware
from moeforge.hf import from_pretrained
from moeforge.inference import generate
from moeforge.inference.expert_cache import load_budgeted, moe_modules

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) * 1024

folder, budget, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hardware.probe("cpu")
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
if budget == 0:
    model = from_pretrained(folder)
else:
    model, cache = load_budgeted(folder, budget=budget, prefetch=True)
out = {"baseline": base, "load_peak": status("VmHWM") - base}
print(json.dumps({"phase": "loaded", **out}), flush=True)
generate(model, [[(7 * i) % 1000 + 1 for i in range(16)]], new)
out["generate_peak"] = status("VmHWM") - base
out["hwm"] = status("VmHWM")
print(json.dumps({"phase": "done", **out}), flush=True)
"""

SPEED_CHILD = r"""
import json, statistics, sys, time, torch
from moeforge.hf import from_pretrained
from moeforge.inference import generate
from moeforge.inference.expert_cache import load_budgeted, moe_modules

folder, budgets = sys.argv[1], json.loads(sys.argv[2])
rounds, new, threads = (int(a) for a in sys.argv[3:6])
torch.set_num_threads(threads)
resident = from_pretrained(folder)
for moe in moe_modules(resident).values():
    moe.experts.impl = "loop"  # the cache's per-expert matmuls: identical tokens, and tokens/s compares the cache only
variants = {"resident": (resident, None)}
for b in budgets:
    for prefetch in (False, True):
        variants[f"{b}/{'on' if prefetch else 'off'}"] = load_budgeted(folder, budget=b, prefetch=prefetch)
names = list(variants)
warm = [[3, 1, 4, 1, 5, 9, 2, 6]]
for name in names:  # first-call costs, and the caches filled once
    generate(variants[name][0], warm, 2)
rows = {name: [] for name in names}
for r in range(rounds):
    prompt = [[(13 * r + 7 * i) % 1000 + 1 for i in range(16)]]
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
        model, cache = variants[name]
        if cache is not None:
            cache.stats = type(cache.stats)()
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = generate(model, prompt, new)[0]
        row = {"round": r, "tok_s": new / (time.perf_counter() - t0), "tokens": tokens,
               "cpu_ms": (time.process_time() - c0) * 1e3 / new}
        if cache is not None:
            s = cache.stats
            row.update(hit_rate=s.hit_rate, mb_per_token=s.bytes_per_token / 1e6, recall=s.prediction_recall,
                       prefetched=s.prefetched, prefetch_used=s.prefetch_used)
        rows[name].append(row)
    print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
print(json.dumps(rows))
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
    with torch.no_grad():
        model = Transformer(config)
    save_pretrained(model, folder)
    expert_mb = 3 * D * F * 4 / 1e6
    return {"layers": layers, "experts": experts, "top_k": top_k, "expert_MB": round(expert_mb, 2),
            "file_MB": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6, 1)}


# --- a memory limit that is enforced -------------------------------------------------------------------
def make_cgroup(limit_bytes: int, name: str) -> Path | None:
    """A child memory cgroup of this process's own, limited to `limit_bytes` (v1 or v2), or None when this
    machine does not let us make one (no permission, v2 without the memory controller delegated, ...)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, knob = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        elif hierarchy == "0" and controllers == "":
            base, knob = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        else:
            continue
        group = base / f"moeforge-big-model-{os.getpid()}-{name}"
        try:
            group.mkdir(exist_ok=True)
            (group / knob).write_text(str(limit_bytes))
            if int((group / knob).read_text()) > limit_bytes:
                raise OSError("limit not applied")
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


def drop_page_cache(folder: Path) -> None:
    """Forget the checkpoint's cached pages, so the next case reads it (and is charged for it) itself."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cgroup_peak(group: Path) -> int | None:
    """The cgroup's peak charge (anonymous memory + the page cache its reads brought in), if it keeps one."""
    for knob in ("memory.max_usage_in_bytes", "memory.peak"):
        if (group / knob).is_file():
            return int((group / knob).read_text())
    return None


def memory_case(folder: Path, budget: int, new: int, limit: int | None) -> dict:
    """One case in a fresh process (in its own memory cgroup of `limit` bytes unless limit is None); the
    'enforced' key says whether a cgroup could be made."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    group = None if limit is None else make_cgroup(limit, f"b{budget}")
    join = (lambda: (group / "cgroup.procs").write_text("0")) if group is not None else None
    drop_page_cache(folder)
    try:
        run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(folder), str(budget), str(new)], env=env,
                             capture_output=True, text=True, preexec_fn=join)
        peak = cgroup_peak(group) if group is not None else None
    finally:
        if group is not None:
            group.rmdir()
    phases = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    out = phases[-1] if phases else {"phase": "started"}
    out.update(enforced=group is not None, cgroup_peak=peak)
    if run.returncode == -9:
        out["killed"] = "at load" if out["phase"] == "started" else "while generating"
    elif run.returncode != 0:
        raise RuntimeError(f"memory case budget={budget} failed:\n{run.stderr[-2000:]}")
    return out


# --- report ---------------------------------------------------------------------------------------------
def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def paired(rows: list[dict], ref: list[dict], key: str = "tok_s") -> float:
    """The median over rounds of rows' `key` over ref's in the same round."""
    return statistics.median(a[key] / b[key] for a, b in zip(rows, ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-mb", type=float, default=512, help="the memory limit (the whole process: runtime too)")
    ap.add_argument("--times", type=float, default=3, help="model size as a multiple of the limit")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="speed rounds (variants interleaved in each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the speed process")
    ap.add_argument("--budgets", default=None, help="comma-separated experts per layer (default: E/4, 2k, k)")
    ap.add_argument("--no-cgroup", action="store_true", help="do not enforce the limit, only measure the peaks")
    ap.add_argument("--skip", choices=("memory", "speed"), default=None, help="leave one part out")
    args = ap.parse_args()
    limit = int(args.limit_mb * 1e6)
    E, k = args.experts, args.top_k
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else sorted({E // 4, 2 * k, k}, reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "big"
        info = write_checkpoint(folder, int(args.times * limit), E, k)
        print(json.dumps({**info, "limit_MB": args.limit_mb, "budgets": budgets}), flush=True)
        if args.skip != "memory":
            memory_part(folder, budgets, args, limit, info)
        if args.skip != "speed":
            speed_part(folder, budgets, args)


def memory_part(folder: Path, budgets: list[int], args, limit: int, info: dict) -> None:
    rows = [(b, memory_case(folder, b, args.new_tokens, None if args.no_cgroup else limit)) for b in [0, *budgets]]
    enforced = all(r["enforced"] for _, r in rows)
    bases = [r["baseline"] for _, r in rows if "baseline" in r]
    base = statistics.median(bases) if bases else 0
    how = ("enforced by a memory cgroup per case" if enforced else "NOT enforced (no writable memory cgroup"
           + (", --no-cgroup" if args.no_cgroup else "") + "): peak RSS compared with it")
    print(f"\n## memory: limit {args.limit_mb:g} MB, {how}; runtime baseline RSS {base / 1e6:.0f} MB (python + torch; "
          "shared libraries already in memory are not charged to the cgroup)\n")
    print("| experts resident | resident experts MB | load peak MB | generate peak MB "
          "| cgroup peak MB (incl. page cache) | fits |")
    print("|---|---|---|---|---|---|")
    for b, r in rows:
        name = "all (no budget)" if b == 0 else f"{b}/layer"
        budget_mb = info["file_MB"] if b == 0 else b * info["layers"] * info["expert_MB"]
        cell = lambda key: f"{r[key] / 1e6:.0f}" if r.get(key) is not None else "-"  # noqa: E731
        if "killed" in r:
            fits = f"no: killed {r['killed']}"
        elif enforced:
            fits = "yes"
        else:
            fits = "yes" if r["hwm"] <= limit else "no"
        print(f"| {name} | {budget_mb:.0f} | {cell('load_peak')} | {cell('generate_peak')} | {cell('cgroup_peak')} | "
              f"{fits} |", flush=True)


def speed_part(folder: Path, budgets: list[int], args) -> None:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": str(args.threads)}
    run = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(folder), json.dumps(budgets), str(args.rounds),
                          str(args.new_tokens), str(args.threads)], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"speed process failed:\n{run.stderr[-3000:]}")
    rows = json.loads(run.stdout.splitlines()[-1])
    ref = rows["resident"]
    print(f"\n## speed, {args.rounds} interleaved rounds x {args.new_tokens} new tokens, {args.threads} thread(s); "
          "medians over rounds\n")
    print("| experts resident | prefetch | tok/s | vs resident | prefetch on / off | CPU ms / token | vs resident "
          "| hit rate | MB read / token | next-layer recall | prefetches used | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| all resident | - | {median(ref, 'tok_s'):.2f} | 1.00x | - | {median(ref, 'cpu_ms'):.0f} | 1.00x | - "
          "| 0 | - | - | - |")
    for b in budgets:
        for p in ("off", "on"):
            mine = rows[f"{b}/{p}"]
            same = sum(a["tokens"] == r["tokens"] for a, r in zip(mine, ref))
            gain = f"{paired(rows[f'{b}/on'], rows[f'{b}/off']):.2f}x" if p == "on" else "-"
            used = f"{sum(r['prefetch_used'] for r in mine)}/{sum(r['prefetched'] for r in mine)}" if p == "on" else "-"
            print(f"| {b}/layer | {p} | {median(mine, 'tok_s'):.2f} | {paired(mine, ref):.2f}x | {gain} | "
                  f"{median(mine, 'cpu_ms'):.0f} | {paired(mine, ref, 'cpu_ms'):.2f}x | "
                  f"{median(mine, 'hit_rate'):.1%} | {median(mine, 'mb_per_token'):.2f} | {median(mine, 'recall'):.0%} | "
                  f"{used} | {same}/{len(mine)} |", flush=True)


if __name__ == "__main__":
    main()
