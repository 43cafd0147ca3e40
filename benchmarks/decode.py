"""Decode speed: moeforge's latent-KV-cache decoding (absorbed vs naive MLA), MTP speculative decoding and
the expert cache, next to `transformers` `generate()` on the same weights, in one process.

Three parts (`--parts speed,mtp,experts`):

  speed    A random model in the shape of shared/reference/cpu-performance-notes.md (hidden 512, 4 layers,
           16 experts top-4, MLA q 192 / kv 128 / nope 64 / rope 32 / v 64, vocab 4096), built by
           `transformers` and read by `moeforge.from_pretrained`. For each context length: greedy decode
           of --new-tokens tokens after a prefill of that many prompt tokens, batch 1, fp32, moeforge with the
           kernels `moeforge.hardware.configure` picks (as `moeforge generate`). Decode tokens/s
           excludes the prefill (HF: time(generate N+1) - time(generate 1)). Variants run interleaved, each
           the median of --repeats. Also: KV-cache bytes per token of each, and whether the greedy tokens agree.
  mtp      A trained checkpoint (--checkpoint; default: train the debug preset for --train-steps on the
           standard library's source, about a minute). Greedy decoding of --mtp-tokens tokens from prompts
           taken from standard-library files, plain vs MTP speculative, greedy and sampled (T 0.8, top-k 50):
           acceptance rate, tokens per main forward, tokens/s of each, and whether greedy outputs are identical.
  experts  The same trained checkpoint: greedy decode with the expert cache (memory-mapped safetensors)
           at budgets of 25 / 50 / 75 / 100 % of the routed experts, LRU and LFU: hit rate, MB moved per
           token and tokens/s next to the fully resident model.

    python benchmarks/decode.py                                   # all parts, a few minutes on 2 cores
    python benchmarks/decode.py --parts speed --contexts 128,1024,2048
    python benchmarks/decode.py --parts mtp,experts --checkpoint runs/tiny-XXXX
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import moeforge
from moeforge.inference import LatentKVCache, forward_cached, generate
from moeforge.inference.expert_cache import apply_expert_cache, expert_bytes, moe_modules
from moeforge.inference.speculative import MTPSpeculativeDecoder


# --- speed: absorbed vs naive vs transformers ----------------------------------------------------
def build_pair(args):
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=1.0,
        max_position_embeddings=max(args.contexts) + args.new_tokens + 8, tie_word_embeddings=False,
        initializer_range=0.02, num_nextn_predict_layers=0)
    torch.manual_seed(args.seed)
    hf = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = moeforge.from_pretrained(tmp).float().eval()
    return hf, configured(ours)


def configured(model):
    """The kernels `moeforge generate` would use here (routed experts: grouped_mm where it runs, which
    touches only the experts a token was routed to)."""
    from moeforge import hardware

    return hardware.configure(model, hardware.probe("cpu"))


@torch.no_grad()
def moeforge_decode(model, prompt: torch.Tensor, n: int, mode: str) -> tuple[float, list[int]]:
    """Seconds for n greedy decode steps after the prefill, and the tokens."""
    cache = LatentKVCache.for_model(model.config, 1, prompt.shape[1] + n)
    logits, _ = forward_cached(model, prompt, cache, mode="auto")  # the prefill is not timed
    token = logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(n):
        logits, _ = forward_cached(model, token, cache, mode=mode)
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return time.perf_counter() - start, tokens


@torch.no_grad()
def hf_decode(model, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True,
              attention_mask=torch.ones_like(prompt))
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    one = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
    return time.perf_counter() - start - one, out[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def hf_cache_bytes_per_token(model, prompt: torch.Tensor) -> float:
    cache = model(prompt, use_cache=True).past_key_values
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / prompt.shape[1]


def part_speed(args) -> None:
    hf, ours = build_pair(args)
    bpt = LatentKVCache.for_model(ours.config, 1, 1).bytes_per_token()
    print(f"\n## speed: greedy decode of {args.new_tokens} tokens, batch 1, fp32, {torch.get_num_threads()} thread(s)")
    print(f"KV cache bytes/token: moeforge latent {bpt} "
          f"(= (kv_lora_rank {ours.config.kv_lora_rank} + rope {ours.config.qk_rope_head_dim}) x "
          f"{ours.config.num_hidden_layers} layers x 4 B); transformers "
          f"{hf_cache_bytes_per_token(hf, torch.randint(0, 4096, (1, 16))):.0f}")
    print("| context | transformers tok/s | naive tok/s | absorbed tok/s | absorbed / naive | absorbed / HF | "
          "greedy tokens agree (absorbed vs naive / vs HF) |")
    print("|---|---|---|---|---|---|---|")
    for ctx in args.contexts:
        prompt = torch.randint(0, 4096, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        variants = {"hf": lambda: hf_decode(hf, prompt, args.new_tokens),
                    "naive": lambda: moeforge_decode(ours, prompt, args.new_tokens, "naive"),
                    "absorbed": lambda: moeforge_decode(ours, prompt, args.new_tokens, "absorbed")}
        times = {k: [] for k in variants}
        tokens = {}
        for r in range(args.repeats + 1):  # round 0 warms up
            for name, fn in variants.items():
                seconds, toks = fn()
                if r:
                    times[name].append(seconds)
                tokens[name] = toks
        tps = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
        agree_naive = prefix_agreement(tokens["absorbed"], tokens["naive"])
        agree_hf = prefix_agreement(tokens["absorbed"], tokens["hf"])
        print(f"| {ctx} | {tps['hf']:.1f} | {tps['naive']:.1f} | {tps['absorbed']:.1f} | "
              f"{tps['absorbed'] / tps['naive']:.2f}x | {tps['absorbed'] / tps['hf']:.2f}x | "
              f"{agree_naive}/{len(tokens['absorbed'])} / {agree_hf}/{len(tokens['absorbed'])} |", flush=True)


def prefix_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- trained checkpoint for mtp / experts -----------------------------------------------------
def trained_checkpoint(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    from moeforge.config import resolve_run_config
    from moeforge.train import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="moeforge-decode-bench-"))
    run = resolve_run_config({}, dict(preset="debug", steps=args.train_steps, seq_len=128, batch_size=16,
                                      warmup_steps=20, eval_every=args.train_steps, sample_tokens=0,
                                      precision="fp32", device="cpu", run_dir=str(run_dir)))
    print(f"training the debug preset for {args.train_steps} steps in {run_dir} ...", file=sys.stderr)
    Trainer(run, run_dir=run_dir).fit()
    return run_dir


def held_out_prompts(n: int, length: int) -> list[list[int]]:
    """Byte prompts from the start of standard-library source files (training reads the same corpus, but
    these openings are a fair stand-in for code a user would continue)."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::7]
    prompts = []
    for f in files:
        text = f.read_bytes()[200:200 + length]
        if len(text) == length:
            prompts.append(list(text))
        if len(prompts) == n:
            break
    return prompts


def part_mtp(args, folder: Path) -> None:
    from moeforge.checkpoint import resolve_checkpoint_dir
    from moeforge.inference import SamplingParams

    model = configured(moeforge.from_pretrained(resolve_checkpoint_dir(folder)).float().eval())
    prompts = held_out_prompts(args.prompts, 64)
    print(f"\n## mtp: {args.mtp_tokens} new tokens, {len(prompts)} prompts, checkpoint {folder}")
    print("| sampling | prompt | plain tok/s | MTP tok/s | speed-up | acceptance | tokens / main forward | "
          "identical |")
    print("|---|---|---|---|---|---|---|---|")
    for label, params in (("greedy", SamplingParams()), ("T=0.8 top-k 50", SamplingParams(0.8, 50))):
        speedups, drafted, accepted, totals = [], 0, 0, [0.0, 0.0, 0, 0]
        for i, prompt in enumerate(prompts):
            plain_t, mtp_t = [], []
            for _ in range(args.repeats):  # interleaved: plain, MTP, plain, MTP, ...
                start = time.perf_counter()
                plain = generate(model, [prompt], args.mtp_tokens, params, seed=i)[0]
                plain_t.append(time.perf_counter() - start)
                decoder = MTPSpeculativeDecoder(model, params, seed=i)
                start = time.perf_counter()
                spec = decoder.generate(prompt, args.mtp_tokens)
                mtp_t.append(time.perf_counter() - start)
            s = decoder.stats
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
            tp, tm = statistics.median(plain_t), statistics.median(mtp_t)
            a, b = len(plain) / tp, len(spec) / tm
            totals = [totals[0] + tp, totals[1] + tm, totals[2] + len(plain), totals[3] + len(spec)]
            speedups.append(b / a)
            same = ("yes" if plain == spec else "NO") if params.greedy else "n/a (sampled)"
            print(f"| {label} | {i} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {s.acceptance_rate:.0%} | "
                  f"{s.tokens_per_forward:.2f} | {same} |", flush=True)
        a, b = totals[2] / totals[0], totals[3] / totals[1]
        print(f"| {label} | all | {a:.1f} | {b:.1f} | {b / a:.2f}x | {accepted / max(drafted, 1):.0%} | | |",
              flush=True)


def part_experts(args, folder: Path) -> None:
    from moeforge.checkpoint import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(folder)
    prompts = held_out_prompts(args.prompts, 64)
    resident = moeforge.from_pretrained(ckpt).float().eval()
    for moe in moe_modules(resident).values():
        moe.experts.impl = "loop"  # the cache's per-expert matmuls: same kernel, so equal tokens/s = no overhead
    n_main = sum(m.gate.n_experts for layer, m in moe_modules(resident).items()
                 if layer < resident.config.num_hidden_layers)
    print(f"\n## experts: greedy, {args.expert_tokens} new tokens x {len(prompts)} prompts, "
          f"{n_main} routed experts in the main model's MoE layers, store = memory-mapped safetensors")

    def run(model) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = [generate(model, [p], args.expert_tokens)[0] for p in prompts]
        return time.perf_counter() - start, out

    base_t, expected = run(resident)
    n_tokens = sum(len(o) for o in expected)
    print("| budget | policy | hit rate | MB moved / token | tok/s | vs resident | identical |")
    print("|---|---|---|---|---|---|---|")
    print(f"| all resident (loop kernel) | - | - | 0 | {n_tokens / base_t:.1f} | 1.00x | - |")
    for fraction in (0.25, 0.5, 0.75, 1.0):
        budget = max(1, round(fraction * n_main))
        for policy in ("lru", "lfu"):
            model = moeforge.from_pretrained(ckpt).float().eval()
            # a budget over all MoE layers together, as a byte budget
            cache = apply_expert_cache(model, policy=policy, checkpoint=ckpt, memory_bytes=budget * expert_bytes(model))
            seconds, out = run(model)
            s = cache.stats
            print(f"| {budget} ({fraction:.0%}) | {policy} | {s.hit_rate:.1%} | {s.bytes_per_token / 1e6:.3f} | "
                  f"{n_tokens / seconds:.1f} | {base_t / seconds:.2f}x | {'yes' if out == expected else 'NO'} |",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="speed,mtp,experts")
    p.add_argument("--contexts", default="128,1024,2048", help="speed: prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="speed: decode steps timed per context")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="mtp/experts: a trained run or checkpoint folder")
    p.add_argument("--train-steps", type=int, default=400, help="mtp/experts: steps when no --checkpoint")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--mtp-tokens", type=int, default=96)
    p.add_argument("--expert-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if "speed" in parts:
        part_speed(args)
    if "mtp" in parts or "experts" in parts:
        folder = trained_checkpoint(args)
        if "mtp" in parts:
            part_mtp(args, folder)
        if "experts" in parts:
            part_experts(args, folder)


if __name__ == "__main__":
    main()
