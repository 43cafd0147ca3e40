"""The GPU check behind `bash benchmarks/gpu_check.sh`: everything a single CUDA GPU should confirm, in
at most 8 minutes, ending in one summary table.

Sections:
  tests     the pytest subset that can use CUDA (`-k "cuda or on_gpu"`: they skip themselves without a GPU)
  fp8       FP8 GEMM numerics on the device: Fprop, Dgrad and Wgrad of a plain linear (K ragged and
            aligned) and of ragged expert groups (an empty and a one-token group), on every FP8 path
            that runs there (native blockwise `scaled_mm` on Hopper; row-wise `_scaled_mm` slices),
            against the emulation on the same device; norm-relative error, ok below 1e-3
  experts   grouped-GEMM routed experts (`torch._grouped_mm`) vs the per-expert loop: forward and
            gradients agree (bf16), time of each; FP8 experts on the probed path vs the emulation
  train     one training step at a DeepSeek-V2-Lite (16B) width, depth and vocabulary scaled to fit one
            GPU (hidden 2048, 64 experts top-6 + 2 shared of width 1408, MLA kv 512, 1 dense + 3 MoE
            layers, vocab 32k; batch 4 x 2048): bf16 and fp8 (probed path; emulated for contrast),
            tokens/s and MFU against the bf16 dense-matmul peak measured in the same run
  decode    bf16 (autocast) greedy decoding at the same width, batch 1: tokens/s after a 128-token prompt

`--device cpu --dry-run` runs every section except the tests at toy sizes (the unit tests run it so);
without a CUDA device, `--device cuda` stops with a one-line message and exit code 2.

    bash benchmarks/gpu_check.sh                          # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --dry-run # what the unit test runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fp8_step  # noqa: E402  (benchmarks/fp8_step.py: the GEMM and training-step timings)

from moeforge import hardware  # noqa: E402
from moeforge.errors import ConfigError  # noqa: E402
from moeforge.model.moe import GroupedExperts  # noqa: E402
from moeforge.precision import Fp8GroupedExperts, Fp8Spec  # noqa: E402
from moeforge.precision.gemm import EMULATED, fp8_mm, fp8_wgrad  # noqa: E402
from moeforge.precision.quant import BLOCK, TILE, quantize, quantize_row_tiles  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def row(section: str, item: str, value: str, status: str = "ok") -> dict:
    return {"section": section, "item": item, "value": value, "status": status}


def check_tests(device: str, dry: bool) -> list[dict]:
    if dry:
        return [row("tests", 'pytest -k "cuda or on_gpu"', "not run (--dry-run)", "skip")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or on_gpu", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        return [row("tests", 'pytest -k "cuda or on_gpu"', "timed out after 150 s", "FAIL")]
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return [row("tests", 'pytest -k "cuda or on_gpu"', last, "ok" if proc.returncode == 0 else "FAIL")]


def fp8_cases(dry: bool):
    """(name, M, K, N, counts or None): K ragged and aligned, ragged expert groups."""
    if dry:
        return [("linear 70x200->150", 70, 200, 150, None),
                ("experts [130,0,1,60] 192->160", 191, 192, 160, torch.tensor([130, 0, 1, 60]))]
    return [("linear 70x200->150", 70, 200, 150, None),
            ("linear 4096x2048->1408", 4096, 2048, 1408, None),
            ("linear 4096x2048->576", 4096, 2048, 576, None),
            ("experts 8 ragged 2048->1408", 6001, 2048, 1408, torch.tensor([3000, 0, 1, 1000, 700, 500, 400, 400]))]


def check_fp8(device: str, dry: bool) -> list[dict]:
    backends = [b for b in fp8_step.fp8_backends(device) if b != EMULATED]
    if not backends:
        return [row("fp8", "scaled GEMM", f"none runs on {device}: emulation only", "n/a")]
    out = []
    g = torch.Generator().manual_seed(0)
    for name, M, K, N, counts in fp8_cases(dry):
        E = 1 if counts is None else len(counts)
        x, w, dy = (torch.randn(*s, generator=g).to(device) for s in ((M, K), (E, N, K), (M, N)))
        c = None if counts is None else counts.to(device)
        xq, wq, dyq = quantize(x, TILE), quantize(w, BLOCK), quantize(dy, TILE)
        dyt, xt = quantize_row_tiles(dy, c), quantize_row_tiles(x, c)
        gemms = {"fprop": lambda b: fp8_mm(xq, wq, c, True, b), "dgrad": lambda b: fp8_mm(dyq, wq, c, False, b),
                 "wgrad": lambda b: fp8_wgrad(dyt, xt, c, E, b)}
        for backend in backends:
            for gemm, fn in gemms.items():
                err = rel(fn(backend), fn(EMULATED))
                out.append(row("fp8", f"{backend} {gemm} {name}", f"rel err {err:.1e}",
                               "ok" if err < TOLERANCE else "FAIL"))
    return out


def check_experts(device: str, dry: bool) -> list[dict]:
    E, D, F, rows = (8, 128, 64, 512) if dry else (64, 2048, 1408, 8192 * 6)
    g = torch.Generator().manual_seed(0)
    counts = torch.distributions.Multinomial(rows, torch.ones(E)).sample().long().to(device)
    base = GroupedExperts(E, D, F).to(device)
    with torch.no_grad():
        base.gate_up_proj.normal_(0, 0.02)
        base.down_proj.normal_(0, 0.02)
    x = torch.randn(rows, D, generator=g).to(device)
    dev = torch.device(device).type

    def run(module, impl=None):
        if impl:
            module.impl = impl
        xi = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            y = module(xi, counts)
        y.float().square().mean().backward()
        return [y.detach().float(), xi.grad.float(), module.gate_up_proj.grad.float()]

    out = []
    ref = run(base, "loop")
    got = run(base, "grouped_mm")
    err = max(rel(a, b) for a, b in zip(got, ref))
    out.append(row("experts", f"grouped_mm vs loop ({E} experts, {rows} rows)", f"rel err {err:.1e}",
                   "ok" if err < 2e-2 else "FAIL"))
    times = fp8_step.interleaved({impl: (lambda i=impl: run(base, i)) for impl in ("grouped_mm", "loop")},
                                 1 if dry else 5, device)
    out.append(row("experts", "fwd+bwd ms grouped_mm / loop",
                   f"{times['grouped_mm'] * 1e3:.1f} / {times['loop'] * 1e3:.1f}"))
    emulated = run(Fp8GroupedExperts.from_experts(base, Fp8Spec(backend=EMULATED)))
    for backend in fp8_step.fp8_backends(device)[1:]:
        native = run(Fp8GroupedExperts.from_experts(base, Fp8Spec(backend=backend)))
        err = max(rel(a, b) for a, b in zip(native, emulated))
        out.append(row("experts", f"FP8 experts {backend} vs emulated", f"rel err {err:.1e}",
                       "ok" if err < 1e-2 else "FAIL"))
    return out


def model_args(dry: bool) -> SimpleNamespace:
    """DeepSeek-V2-Lite's width (hidden 2048, 64 routed experts top-6 + 2 shared of 1408, MLA kv 512,
    16 heads of 128 + 64 rope), 4 layers and a 32k vocabulary so one GPU holds a few variants."""
    if dry:
        return SimpleNamespace(batch=1, seq=32, hidden=128, layers=2, dense_intermediate=256, experts=4, top_k=2,
                               shared_experts=1, moe_intermediate=64, heads=2, q_lora_rank=None,
                               kv_lora_rank=32, nope_dim=16, rope_dim=8, v_dim=16, vocab=256, seed=0, steps=1,
                               warmup=0)
    return SimpleNamespace(batch=4, seq=2048, hidden=2048, layers=4, dense_intermediate=10944, experts=64, top_k=6,
                           shared_experts=2, moe_intermediate=1408, heads=16, q_lora_rank=None, kv_lora_rank=512,
                           nope_dim=128, rope_dim=64, v_dim=128, vocab=32000, seed=0, steps=5, warmup=2)


def matmul_peak(device: str, dry: bool) -> float:
    n = 256 if dry else 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = fp8_step.interleaved({"mm": lambda: a @ b}, 2 if dry else 10, device, warmup=1)["mm"]
    return 2 * n ** 3 / t


def check_train(device: str, dry: bool) -> list[dict]:
    args = model_args(dry)
    peak = matmul_peak(device, dry)
    names = ["bf16"] + [f"fp8 {b}" for b in fp8_step.fp8_backends(device)]
    out = [row("train", f"bf16 matmul peak ({8192 if not dry else 256}^3)", f"{peak / 1e12:.1f} TFLOP/s")]
    for r in fp8_step.run_step(args, device, names=names, sequential=True):
        mfu = r["tflops"] * 1e12 / peak
        out.append(row("train", f"{r['variant']} step, {args.batch}x{args.seq} tokens",
                       f"{r['tokens_per_s']:.0f} tok/s, MFU {mfu:.1%}, loss@1 {r['loss']:.3f}"))
    return out


def check_decode(device: str, dry: bool) -> list[dict]:
    from moeforge.inference import generate
    from moeforge.model import Transformer

    args = model_args(dry)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(fp8_step.model_config(args))
    model = hardware.configure(model, hardware.probe(device)).eval()
    prompt = torch.randint(0, args.vocab, (32 if dry else 128,)).tolist()
    new = 8 if dry else 64
    seconds = {}
    for n in (1, new):
        fp8_step.sync(device)
        t0 = time.perf_counter()
        generate(model, [prompt], n, autocast_dtype=torch.bfloat16)
        fp8_step.sync(device)
        seconds[n] = time.perf_counter() - t0
    rate = (new - 1) / max(seconds[new] - seconds[1], 1e-9)
    return [row("decode", f"bf16 greedy, batch 1, {len(prompt)}-token prompt, {new} new", f"{rate:.1f} tok/s")]


SECTIONS = {"tests": check_tests, "fp8": check_fp8, "experts": check_experts, "train": check_train,
            "decode": check_decode}


def print_table(rows: list[dict], out=None) -> None:
    out = out or sys.stdout
    w = max(len(r["item"]) for r in rows)
    print(f"\n{'section':8s} {'check':{w}s} {'status':6s} result", file=out)
    for r in rows:
        print(f"{r['section']:8s} {r['item']:{w}s} {r['status']:6s} {r['value']}", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="toy sizes, no pytest: checks this script itself")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            p.error(f"--sections: unknown {s!r}; choose from {', '.join(SECTIONS)}")
    try:
        device = hardware.resolve_device(args.device)
    except ConfigError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"gpu_check on {name}: {hardware.probe(device).summary()}; torch {torch.__version__}", flush=True)
    rows = []
    for s in sections:
        t0 = time.perf_counter()
        try:
            got = SECTIONS[s](device, args.dry_run)
        except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): report what finished
            rows.append(row(s, "section", "interrupted: over the time limit", "FAIL"))
            break
        except Exception as e:  # a section that breaks is a result too; the others still run
            got = [row(s, "section", f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", "FAIL")]
        rows += got
        print(f"  {s}: {time.perf_counter() - t0:.1f} s", flush=True)
    print_table(rows)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
