"""Training throughput: moeforge `Transformer` vs `transformers.DeepseekV3ForCausalLM` and torchtitan's
DeepSeek-V3 model, side by side.

The models are built from one config with identical weights (the HF model is initialised, saved with
`save_pretrained` and read back with `moeforge.from_pretrained`; torchtitan's is built from the moeforge
config and its weights copied from the moeforge model: benchmarks/torchtitan_peer.py, which also says how
it is imported without its GPU-only dependencies), get the same batch, the same loss
(next-token cross-entropy over T-1 positions, `labels=input_ids` for both), the same AdamW settings and
the same precision treatment: fp32; bf16 autocast over fp32 master weights ("bf16"); or pure bf16, the
weights and optimizer state themselves in bf16 and no autocast ("bf16-pure": both loaded with
`from_pretrained(..., dtype=torch.bfloat16)`, which keeps both libraries' routers in fp32); or "fp8": bf16
autocast with each library's FP8 training GEMMs (moeforge's 1x128 / 128x128 recipe, torchtitan's torchao
Float8Linear; transformers has none, so its bf16 step is the row's base: see PRECISIONS). One timed
step = zero_grad + forward + backward + optimizer step. After warmup the variants run interleaved (A, B,
A, B, ...) so that a noisy, shared machine slows them alike; each variant reports its median step.

Achieved FLOP/s uses `moeforge.costs.training_flops_per_token` (6 x activated matmul parameters +
causal attention) and is shown as a fraction of a dense matmul peak measured in the same rounds
(an N^3 matmul in the step's compute dtype).

    python benchmarks/train_throughput.py                       # fp32 (+ bf16, bf16-pure on bf16 hardware)
    python benchmarks/train_throughput.py --dtype fp32,bf16,bf16-pure --peers transformers
    python benchmarks/train_throughput.py --dtype fp32,bf16,bf16-pure,fp8   # all four (torchao for torchtitan's fp8)
    python benchmarks/train_throughput.py --expert-impl grouped_mm --attn-impl eager   # fastest on a 2-core CPU
    python benchmarks/train_throughput.py --dtype bf16 --expert-impl bmm,grouped_mm,loop --attn-impl sdpa,eager
    python benchmarks/train_throughput.py --compile             # torch.compile the moeforge model
    python benchmarks/train_throughput.py --profile             # op-level profile of one step of each variant

See benchmarks/README.md for results and what they mean.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

import moeforge
from moeforge.model.moe import EXPERT_IMPLS

try:
    import torchtitan_peer  # benchmarks/torchtitan_peer.py, next to this file
except ImportError:  # run from elsewhere with python -m
    torchtitan_peer = None

try:
    from moeforge.model.mla import ATTN_IMPLS
except ImportError:  # a moeforge from before MLA.attn_impl (to benchmark an older checkout)
    ATTN_IMPLS = ("sdpa",)

# precision name -> (weight dtype, autocast dtype or None)
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.float32, torch.bfloat16),
              "bf16-pure": (torch.bfloat16, None), "fp8": (torch.float32, torch.bfloat16)}
# fp8: bf16 autocast over fp32 master weights with FP8 GEMMs where each library has them. moeforge: its
# --precision fp8 (`apply_fp8`: 1x128 activation tiles x 128x128 weight blocks, on the GEMM path
# `moeforge.hardware` probes: emulated on a CPU). torchtitan: its own Float8LinearConverter (torchao,
# tensor-wise, emulated without an SM89+ GPU; routed experts stay bf16). transformers has no FP8 training
# (its FineGrainedFP8 quantizer loads FP8 checkpoints for inference, on a GPU), so its fp8 row is its bf16
# autocast step: the base the other fp8 rows are compared with.


def hf_config(args):
    import transformers

    return transformers.DeepseekV3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.dense_intermediate,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, n_shared_experts=args.shared_experts,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=1, topk_group=1,
        first_k_dense_replace=args.dense_layers, q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.nope_dim, qk_rope_head_dim=args.rope_dim, v_head_dim=args.v_dim,
        routed_scaling_factor=1.0, max_position_embeddings=max(args.seq, 256), tie_word_embeddings=False,
        initializer_range=0.02, attention_dropout=0.0, num_nextn_predict_layers=0,  # HF has no MTP
    )


def build_models(args, weight_dtypes) -> dict:
    """weight dtype -> (HF model, moeforge model, torchtitan model or None) with the same weights, in training
    mode: the fp32 HF model is initialised and saved once, and each library's own `from_pretrained(...,
    dtype=...)` reads it back; torchtitan's gets the moeforge model's weights (all of it in `dtype`: torchtitan
    has no fp32-router rule)."""
    import transformers

    torch.manual_seed(args.seed)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(args)).float().train()
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        for dtype in weight_dtypes:
            theirs = hf if dtype == torch.float32 else \
                transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype).train()
            ours = moeforge.from_pretrained(tmp, dtype=dtype).train()
            titan = None
            if "torchtitan" in args.peers:
                titan = torchtitan_peer.build(ours.config)
                torchtitan_peer.copy_weights(titan, moeforge.from_pretrained(tmp))  # fp32 copy, then cast
                torchtitan_peer.cast_parameters(titan, dtype)
                titan.train()
            models[dtype] = (theirs, ours, titan)
    return models


def fp8_models(args, hf, ours) -> tuple:
    """The fp8 row's models from the fp32 ones: transformers as is (it runs its bf16 autocast step), a copy
    of the moeforge model with its FP8 modules swapped in, and torchtitan built with its float8 converter
    and the moeforge weights; -> ((hf, moeforge fp8, torchtitan fp8 or None), FP8 GEMM path, why no
    torchtitan fp8 ('' if it runs or was not asked for))."""
    import copy

    from moeforge import hardware
    from moeforge.precision import apply_fp8

    ours8 = copy.deepcopy(ours)
    backend = hardware.probe("cpu").fp8_gemm
    apply_fp8(ours8, "fp8", backend=backend)
    titan8, note = None, ""
    if "torchtitan" in args.peers:
        note = torchtitan_peer.float8_status()
        if not note:
            titan8 = torchtitan_peer.build(ours.config, float8=True)
            torchtitan_peer.copy_weights(titan8, ours)
            titan8.train()
    return (hf, ours8, titan8), backend, note


def torchtitan_status(args) -> str:
    """'' if the torchtitan column can run; else why not (and drop it from args.peers)."""
    if "torchtitan" not in args.peers:
        return "torchtitan column off (--peers)"
    try:
        if torchtitan_peer is None:
            raise ImportError("benchmarks/torchtitan_peer.py not importable")
        torchtitan_peer.import_torchtitan()
        return ""
    except ImportError as e:
        args.peers = [p for p in args.peers if p != "torchtitan"]
        return f"torchtitan column skipped: {e} (pip install 'moeforge[bench]')"


def flops_per_token(config, seq_len: int) -> tuple[float, str]:
    """Training FLOPs per token: moeforge.costs if present, else the same convention computed here."""
    try:
        from moeforge.costs import training_flops_per_token
    except ImportError:  # fallback: 6 x activated non-embedding matmul params + causal attention
        c = config
        active = _activated_matmul_params(config)
        attn = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (seq_len / 2) * c.num_hidden_layers
        return 3.0 * (2 * active + attn), "6N + attention (local formula)"
    return training_flops_per_token(config, seq_len), "moeforge.costs.training_flops_per_token"


def _activated_matmul_params(c) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    q = D * H * c.qk_head_dim if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    attn = q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) \
        + H * c.v_head_dim * D
    dense = 3 * D * c.intermediate_size
    moe = c.n_routed_experts * D + 3 * D * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
    L, k = c.num_hidden_layers, c.first_k_dense_replace
    return L * attn + k * dense + (L - k) * moe + D * c.vocab_size


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    step: callable
    times: list[float] = field(default_factory=list)
    first_loss: float | None = None


ADAMW = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def make_step(model, forward, kind: str, ids, amp_dtype, lr: float, adamw: str = "fused"):
    """One training step for either model; returns (seconds, loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **ADAMW[adamw])
    labels = ids  # both shift labels inside their loss (transformers' convention)
    autocast = (lambda: torch.autocast("cpu", dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            if kind == "hf":
                loss = forward(input_ids=ids, labels=labels, use_cache=False).loss
            elif kind == "torchtitan":
                loss = torchtitan_peer.next_token_loss(forward(ids), labels)
            else:
                loss = forward(ids, labels=labels).loss
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, float(loss.detach())

    return step


def matmul_peak_step(dtype: torch.dtype, n: int, fp8: bool = False):
    """An n^3 matmul in `dtype`; `fp8`: torch._scaled_mm of e4m3 operands with row-wise scales (the FP8
    matmul peak of the device: tensor cores on a GPU; on a CPU, torch dequantises and runs an fp32 GEMM)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        sa, sb = torch.ones(n, 1), torch.ones(1, n)

    def step():
        t0 = time.perf_counter()
        if fp8:
            torch._scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16)
        else:
            a @ b
        return time.perf_counter() - t0, None

    return step


def set_expert_impl(model, impl: str) -> None:
    for _, moe in model.moe_layers():
        moe.experts.impl = impl


def set_attn_impl(model, impl: str) -> None:
    for layer in model.layers:
        layer.self_attn.attn_impl = impl


def apply_device_defaults(model) -> str:
    """The kernels `moeforge train` would pick on this CPU (`moeforge.hardware.configure`)."""
    try:
        from moeforge import hardware

        hardware.configure(model, hardware.probe("cpu"))
        return "moeforge.hardware.configure"
    except Exception as e:  # the benchmark should still run against an older/newer hardware module
        return f"model defaults ({type(e).__name__}: {e})"


def current_impls(model) -> tuple[str, str]:
    layers = model.moe_layers()
    expert = layers[0][1].experts.impl if layers else "bmm"
    return expert, getattr(model.layers[0].self_attn, "attn_impl", "sdpa")


def run_dtype(dtype_name: str, hf, ours, titan, ids, args) -> tuple[list[Variant], list[float]]:
    weights, amp = PRECISIONS[dtype_name]
    if args.compile:  # a fresh compile per dtype (a recompile for the new autocast state could go dynamic)
        torch._dynamo.reset()
    ours_fwd = torch.compile(ours) if args.compile else ours
    fp8 = dtype_name == "fp8"
    variants = [Variant("transformers" + (" (bf16: no FP8 training)" if fp8 else ""), hf,
                        make_step(hf, hf, "hf", ids, amp, args.lr, args.adamw))]
    if titan is not None:
        variants.append(Variant("torchtitan" + (" float8 emulated" if fp8 else ""), titan,
                                make_step(titan, titan, "torchtitan", ids, amp, args.lr, args.adamw)))
    expert0, attn0 = current_impls(ours)
    for expert in args.expert_impl or [expert0]:
        for attn in args.attn_impl or [attn0]:
            label = f"moeforge {expert}/{attn}" + (" +compile" if args.compile else "") + \
                (f" fp8 {args.fp8_backend}" if fp8 else "")
            step = make_step(ours, ours_fwd, "ours", ids, amp, args.lr, args.adamw)

            def run(expert=expert, attn=attn, step=step):
                set_expert_impl(ours, expert)
                set_attn_impl(ours, attn)
                return step()

            variants.append(Variant(label, ours, run))
    peak = matmul_peak_step(amp or weights, args.peak_n, fp8=fp8)

    for v in variants:
        for i in range(args.warmup):
            _, loss = v.step()
            if i == 0:
                v.first_loss = loss
        if args.warmup == 0:
            v.first_loss = float("nan")
    peak()
    peak_times = []
    for _ in range(args.steps):
        for v in variants:
            v.times.append(v.step()[0])
        peak_times.append(peak()[0])
    if args.profile:
        profile_variants(variants, dtype_name)
    return variants, peak_times


def logits_check(ours, titan, ids) -> str:
    """How far torchtitan's logits are from moeforge's on the benchmark batch (eval mode, no grad)."""
    ours.eval(), titan.eval()
    with torch.no_grad():
        a, b = ours(ids[:2]).logits.float(), titan(ids[:2]).float()
    ours.train(), titan.train()
    return f"logits max |torchtitan - moeforge| {float((a - b).abs().max()):.1e} (of max |logit| " \
           f"{float(a.abs().max()):.2f}) on 2 sequences"


def profile_variants(variants: list[Variant], dtype_name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for v in variants:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            v.step()
        print(f"\n--- profile: {v.name}, {dtype_name}, one step (self CPU time) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (interleaved), median reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--dtype", default="auto",
                   help="comma list of fp32, bf16 (autocast over fp32 master weights), bf16-pure (weights and "
                        "optimizer state in bf16, no autocast); auto: fp32, plus bf16 and bf16-pure where bf16 "
                        "matmuls are fast here (moeforge.hardware; emulated bf16 is 30-55x slower than fp32); "
                        "fp8: bf16 autocast + each library's FP8 training GEMMs (see PRECISIONS)")
    p.add_argument("--peers", default="transformers,torchtitan",
                   help="comma list: transformers (always timed: the 'vs HF' base) and torchtitan (skipped "
                        "with a message when it is not installed)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--compile", action="store_true", help="torch.compile the moeforge model")
    p.add_argument("--expert-impl", default="auto",
                   help=f"comma list of moeforge GroupedExperts impls ({'|'.join(EXPERT_IMPLS)}), each timed as its "
                        "own variant; auto: what moeforge.hardware.configure picks here (what `moeforge train` runs)")
    p.add_argument("--attn-impl", default="auto",
                   help=f"comma list of moeforge MLA attention impls ({'|'.join(ATTN_IMPLS)}), crossed with "
                        "--expert-impl; auto: as for --expert-impl")
    p.add_argument("--profile", action="store_true", help="after timing, print a torch.profiler table of one step "
                                                          "of each variant")
    p.add_argument("--adamw", choices=list(ADAMW), default="fused",
                   help="AdamW implementation, the same for both models (torch's CPU default is 'loop')")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="AdamW learning rate; the update is computed and applied in full either way, and the default 0 "
                        "keeps both models' weights (so their routing, hence their work) identical across steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul that measures peak FLOP/s")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace")
    g.add_argument("--dense-intermediate", type=int, default=1536)
    g.add_argument("--experts", type=int, default=16)
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--shared-experts", type=int, default=1)
    g.add_argument("--moe-intermediate", type=int, default=256)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--q-lora-rank", type=int, default=192)
    g.add_argument("--kv-lora-rank", type=int, default=128)
    g.add_argument("--nope-dim", type=int, default=64)
    g.add_argument("--rope-dim", type=int, default=32)
    g.add_argument("--v-dim", type=int, default=64)
    g.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args(argv)
    if args.dtype == "auto":
        from moeforge import hardware

        args.dtype = "fp32,bf16,bf16-pure" if hardware.probe("cpu").bf16 else "fp32"
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    for peer in args.peers:
        if peer not in ("transformers", "torchtitan"):
            p.error(f"--peers: unknown {peer!r}; choose from transformers, torchtitan")
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in PRECISIONS:
            p.error(f"--dtype: unknown {d!r}; choose from {', '.join(PRECISIONS)}")
    args.expert_impl = None if args.expert_impl == "auto" else args.expert_impl
    args.attn_impl = None if args.attn_impl == "auto" else args.attn_impl
    if args.expert_impl:
        args.expert_impl = [s.strip() for s in args.expert_impl.split(",") if s.strip()]
        for impl in args.expert_impl:
            if impl not in EXPERT_IMPLS:
                p.error(f"--expert-impl: unknown {impl!r}; choose from {', '.join(EXPERT_IMPLS)}")
    if args.attn_impl:
        args.attn_impl = [s.strip() for s in args.attn_impl.split(",") if s.strip()]
        for impl in args.attn_impl:
            if impl not in ATTN_IMPLS:
                p.error(f"--attn-impl: unknown {impl!r}; choose from {', '.join(ATTN_IMPLS)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    t_start = time.perf_counter()
    titan_note = torchtitan_status(args)
    models = build_models(args, sorted({PRECISIONS[d][0] for d in args.dtypes}, key=str))
    hf, ours, titan = next(iter(models.values()))
    config = ours.config
    impl_source = [apply_device_defaults(m) for _, m, _ in models.values()][0]  # the same kernels for each
    fp8_note = ""
    if "fp8" in args.dtypes:
        hf32, ours32, _ = models[torch.float32]
        models["fp8"], args.fp8_backend, fp8_note = fp8_models(args, hf32, ours32)
    tokens = args.batch * args.seq
    fpt, fsource = flops_per_token(config, args.seq)
    step_flops = fpt * tokens
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"HF experts_implementation={hf.config._experts_implementation}, attn={hf.config._attn_implementation}")
    if titan is not None:
        print(f"torchtitan {torchtitan_peer.version()}: DeepSeekV3Model, eager SDPA inner attention, local token "
              f"dispatch, bf16 routed-expert GEMMs (its own choice, any dtype); {logits_check(ours, titan, ids)}")
    elif titan_note:
        print(titan_note)
    if "fp8" in args.dtypes:
        print(f"fp8: moeforge --precision fp8 (1x128 x 128x128 scaling) on the {args.fp8_backend} GEMM path; "
              + (f"torchtitan float8 skipped: {fp8_note}" if fp8_note else
                 "torchtitan Float8LinearConverter(emulate=True), routed experts bf16" if titan is not None else
                 "no torchtitan column") + "; transformers: its bf16 step (it has no FP8 training)")
    print(f"config: hidden {config.hidden_size}, {config.num_hidden_layers} layers ({config.first_k_dense_replace} dense, "
          f"intermediate {config.intermediate_size}), {config.n_routed_experts} experts top-{config.num_experts_per_tok} "
          f"+ {config.n_shared_experts} shared (F {config.moe_intermediate_size}), {config.num_attention_heads} heads, "
          f"MLA q_lora {config.q_lora_rank} kv_lora {config.kv_lora_rank} nope {config.qk_nope_head_dim} "
          f"rope {config.qk_rope_head_dim} v {config.v_head_dim}, vocab {config.vocab_size}; "
          f"{ours.num_parameters() / 1e6:.1f}M params")
    print(f"batch {args.batch} x {args.seq} = {tokens} tokens/step; {fpt / 1e6:.1f} MFLOP/token ({fsource}) = "
          f"{step_flops / 1e9:.1f} GFLOP/step; AdamW ({args.adamw}, lr {args.lr:g}); warmup {args.warmup}, "
          f"{args.steps} timed steps each, interleaved, median")
    expert0, attn0 = current_impls(ours)
    print(f"moeforge kernels (expert/attention): {','.join(args.expert_impl or [expert0])} / "
          f"{','.join(args.attn_impl or [attn0])}" + ("" if args.expert_impl and args.attn_impl else
                                                      f"; defaults from {impl_source}"))

    head = ("dtype", "model", "step ms", "min ms", "tokens/s", "vs HF", "TFLOP/s", "% peak", "peak TF/s", "loss@1")
    fmt = "{:<9} {:<40} {:>8} {:>8} {:>9} {:>6} {:>8} {:>7} {:>9} {:>8}"
    print()
    print(fmt.format(*head), flush=True)
    for dtype_name in args.dtypes:  # each precision's rows as soon as they are measured
        key = dtype_name if dtype_name in models else PRECISIONS[dtype_name][0]
        variants, peak_times = run_dtype(dtype_name, *models[key], ids, args)
        peak = 2 * args.peak_n ** 3 / statistics.median(peak_times)
        base = statistics.median(variants[0].times)
        for v in variants:
            med = statistics.median(v.times)
            print(fmt.format(dtype_name, v.name, f"{med * 1e3:.0f}", f"{min(v.times) * 1e3:.0f}",
                             f"{tokens / med:.0f}", f"{base / med:.2f}x", f"{step_flops / med / 1e12:.3f}",
                             f"{100 * step_flops / med / peak:.1f}%", f"{peak / 1e12:.2f}", f"{v.first_loss:.4f}"),
                  flush=True)
    print(f"\n'vs HF' = tokens/s / transformers tokens/s (same dtype; for fp8, its bf16 step); peak = median "
          f"{args.peak_n}^3 matmul in that dtype (fp8: torch._scaled_mm, row-wise scales), timed in the same rounds; loss@1 = loss of the first warmup step "
          f"(same weights and batch: should agree). Total {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
