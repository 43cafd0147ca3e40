"""FP8 vs BF16 vs FP32 on one device, side by side in one process: the three GEMMs of a layer on every
FP8 backend, and whole training steps of the benchmark model.

Two parts (`--parts gemm,step`):

  gemm   Fprop, Dgrad and Wgrad of one linear layer (M tokens x K -> N) and of the routed experts
         (M x top-k rows over E experts, D -> F), on each FP8 backend that runs here (precision/gemm.py:
         emulated, rowwise = row-wise `torch._scaled_mm` over 128-wide K slices, blockwise = native
         1x128 x 128x128 `scaled_mm`), next to the same GEMMs as plain bf16 and fp32 matmuls. Each
         figure: median of --repeats, variants interleaved; FP8 times include quantisation.
  step   zero_grad + forward + backward + AdamW of moeforge's Transformer in the benchmark shape
         (hidden 512, 4 layers, 16 experts top-4 + 1 shared, MLA q 192 / kv 128), same weights and batch:
         fp32, bf16 (autocast over fp32 master weights), and --precision fp8 (bf16 autocast + FP8 linears
         and experts) on each FP8 backend. Variants interleaved, median of --steps; tokens/s, and the
         ratio to bf16 and to fp32.

    python benchmarks/fp8_step.py                       # both parts, CPU
    python benchmarks/fp8_step.py --parts step --batch 4 --steps 5
    python benchmarks/fp8_step.py --device cuda         # on a GPU (what benchmarks/gpu_check.sh runs)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from moeforge import hardware
from moeforge.config import ModelConfig
from moeforge.costs import training_flops_per_token
from moeforge.model import Transformer
from moeforge.precision import apply_fp8
from moeforge.precision.gemm import BLOCKWISE, EMULATED, ROWWISE, check_backend, fp8_mm, fp8_wgrad
from moeforge.precision.quant import BLOCK, TILE, quantize, quantize_row_tiles


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fp8_backends(device: str) -> list[str]:
    """The emulation, plus every scaled-GEMM path that runs here and agrees with it (not only the one
    `hardware.probe` picks for training)."""
    def runs(backend):
        try:
            check_backend(backend, device)
            return True
        except Exception:
            return False

    return [EMULATED] + [b for b in (BLOCKWISE, ROWWISE) if runs(b)]


def interleaved(fns: dict, repeats: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run in turns so machine load affects all alike."""
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# --- gemm -----------------------------------------------------------------------------------------

def gemm_fns(backend: str, x, w, dy, counts):
    """Fprop, Dgrad, Wgrad closures of one (grouped) layer on `backend`, quantisation included."""
    n_groups = w.shape[0]
    c = None if n_groups == 1 else counts
    if backend in ("fp32", "bf16"):
        dt = torch.float32 if backend == "fp32" else torch.bfloat16
        from moeforge.precision.gemm import grouped_mm, grouped_wgrad

        xd, wd, dyd = x.to(dt), w.to(dt), dy.to(dt)
        return {"fprop": lambda: grouped_mm(xd, wd, c, True), "dgrad": lambda: grouped_mm(dyd, wd, c, False),
                "wgrad": lambda: grouped_wgrad(dyd, xd, c, n_groups)}
    return {
        "fprop": lambda: fp8_mm(quantize(x, TILE), quantize(w, BLOCK), c, True, backend),
        "dgrad": lambda: fp8_mm(quantize(dy, TILE), quantize(w, BLOCK), c, False, backend),
        "wgrad": lambda: fp8_wgrad(quantize_row_tiles(dy, c), quantize_row_tiles(x, c), c, n_groups, backend),
    }


def gemm_cases(args, device: str):
    g = torch.Generator().manual_seed(0)
    tokens = args.batch * args.seq
    rows = tokens * args.top_k
    E = args.experts
    counts = torch.full((E,), rows // E)
    counts[: rows % E] += 1
    return {
        f"linear {tokens}x{args.hidden}->{args.dense_intermediate}": (
            torch.randn(tokens, args.hidden, generator=g), torch.randn(1, args.dense_intermediate, args.hidden, generator=g),
            torch.randn(tokens, args.dense_intermediate, generator=g), None),
        f"experts {rows}x{args.hidden}->{args.moe_intermediate} over {E}": (
            torch.randn(rows, args.hidden, generator=g), torch.randn(E, args.moe_intermediate, args.hidden, generator=g),
            torch.randn(rows, args.moe_intermediate, generator=g), counts),
    }


def run_gemm(args, device: str) -> list[dict]:
    rows = []
    variants = ["fp32", "bf16"] + fp8_backends(device)
    for case, tensors in gemm_cases(args, device).items():
        x, w, dy, counts = (t.to(device) if t is not None else None for t in tensors)
        fns = {}
        for v in variants:
            for gemm, fn in gemm_fns(v, x, w, dy, counts).items():
                fns[(v, gemm)] = fn
        t = interleaved(fns, args.repeats, device)
        flops = 2 * x.shape[0] * x.shape[1] * w.shape[1]
        for v in variants:
            total = sum(t[(v, g)] for g in ("fprop", "dgrad", "wgrad"))
            rows.append({"case": case, "variant": v, **{g: t[(v, g)] for g in ("fprop", "dgrad", "wgrad")},
                         "total": total, "tflops": 3 * flops / total / 1e12})
    return rows


def print_gemm(rows: list[dict], out=None) -> None:
    out = out or sys.stdout
    print(f"\n{'case':40s} {'variant':10s} {'fprop ms':>9s} {'dgrad ms':>9s} {'wgrad ms':>9s} "
          f"{'TFLOP/s':>8s} {'vs bf16':>8s} {'vs fp32':>8s}", file=out)
    for r in rows:
        same = [q for q in rows if q["case"] == r["case"]]
        bf16 = next(q["total"] for q in same if q["variant"] == "bf16")
        fp32 = next(q["total"] for q in same if q["variant"] == "fp32")
        print(f"{r['case']:40s} {r['variant']:10s} {r['fprop'] * 1e3:9.2f} {r['dgrad'] * 1e3:9.2f} "
              f"{r['wgrad'] * 1e3:9.2f} {r['tflops']:8.3f} {bf16 / r['total']:7.2f}x {fp32 / r['total']:7.2f}x",
              file=out)


# --- step -----------------------------------------------------------------------------------------

def model_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.dense_intermediate,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        n_shared_experts=args.shared_experts, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.nope_dim, qk_rope_head_dim=args.rope_dim,
        v_head_dim=args.v_dim, max_position_embeddings=max(args.seq, 256), num_nextn_predict_layers=0).validate()


def step_variant_names(device: str) -> list[str]:
    return ["fp32", "bf16"] + [f"fp8 {b}" for b in fp8_backends(device)]


def build_variant(args, device: str, name: str) -> tuple[torch.nn.Module, torch.dtype | None]:
    """One variant's model (the same initialisation for every name) and its autocast dtype."""
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialise in place: a 16B-width model takes long to fill on a host CPU
        model = Transformer(model_config(args))
    model = hardware.configure(model, hardware.probe(device), seq_len=args.seq).train()
    if name.startswith("fp8 "):
        apply_fp8(model, "fp8", backend=name.split()[1])
    return model, (None if name == "fp32" else torch.bfloat16)


def make_step(model, amp_dtype, ids, labels, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.1)
    dev = torch.device(device).type
    autocast = (lambda: torch.autocast(dev, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    return step, losses


def run_step(args, device: str, names: list[str] | None = None, sequential: bool = False) -> list[dict]:
    """Time each variant's training step: interleaved (all models alive at once), or `sequential`
    (one model at a time, for models that only fit alone on the device)."""
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)
    names = names or step_variant_names(device)
    t, losses = {}, {}
    if sequential:
        for name in names:
            step, losses[name] = make_step(*build_variant(args, device, name), ids, labels, device)
            t.update(interleaved({name: step}, args.steps, device, warmup=args.warmup))
            del step
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    else:
        steps = {}
        for name in names:
            steps[name], losses[name] = make_step(*build_variant(args, device, name), ids, labels, device)
        t = interleaved(steps, args.steps, device, warmup=args.warmup)
    tokens = args.batch * args.seq
    flops = training_flops_per_token(model_config(args), args.seq) * tokens
    return [{"variant": k, "seconds": s, "tokens_per_s": tokens / s, "tflops": flops / s / 1e12,
             "loss": float(losses[k][0])} for k, s in t.items()]


def print_step(rows: list[dict], args, out=None) -> None:
    out = out or sys.stdout
    bf16 = next((r["seconds"] for r in rows if r["variant"] == "bf16"), float("nan"))
    fp32 = next((r["seconds"] for r in rows if r["variant"] == "fp32"), float("nan"))
    print(f"\ntraining step, batch {args.batch} x {args.seq}, median of {args.steps} interleaved steps", file=out)
    print(f"{'variant':16s} {'s/step':>8s} {'tok/s':>9s} {'TFLOP/s':>8s} {'vs bf16':>8s} {'vs fp32':>8s} {'loss@1':>8s}",
          file=out)
    for r in rows:
        print(f"{r['variant']:16s} {r['seconds']:8.3f} {r['tokens_per_s']:9.0f} {r['tflops']:8.3f} "
              f"{bf16 / r['seconds']:7.2f}x {fp32 / r['seconds']:7.2f}x {r['loss']:8.4f}", file=out)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and batch (defaults: the benchmark config of train_throughput.py)")
    for name, default in [("batch", 8), ("seq", 256), ("hidden", 512), ("layers", 4), ("dense-intermediate", 1536),
                          ("experts", 16), ("top-k", 4), ("shared-experts", 1), ("moe-intermediate", 256),
                          ("heads", 8), ("q-lora-rank", 192), ("kv-lora-rank", 128), ("nope-dim", 64),
                          ("rope-dim", 32), ("v-dim", 64), ("vocab", 4096)]:
        g.add_argument(f"--{name}", type=int, default=default)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="gemm,step", help="comma list of gemm, step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per GEMM variant")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in args.parts if s not in ("gemm", "step")]
    if bad:
        p.error(f"--parts: unknown {bad[0]!r}; choose from gemm, step")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = hardware.resolve_device(args.device)
    caps = hardware.probe(device)
    print(f"{caps.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "gemm" in args.parts:
        print_gemm(run_gemm(args, device))
    if "step" in args.parts:
        print_step(run_step(args, device), args)


if __name__ == "__main__":
    main()
