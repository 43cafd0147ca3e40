"""Command-line glue for `moeforge generate` (cached / --mtp) and `moeforge serve`."""

from __future__ import annotations

import sys
import time

import torch

from .generation import generate
from .sampling import SamplingParams
from .speculative import MTPSpeculativeDecoder

INFERENCE_DTYPES = ("auto", "fp32", "bf16")


def add_dtype_flag(parser) -> None:
    parser.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                        help="auto: the checkpoint's own dtype for bf16 and FP8 checkpoints (bf16 weights, no fp32 "
                             "copy), else fp32 weights with bf16 autocast where bf16 matmuls are fast; fp32; bf16: "
                             "weights loaded in bf16 (half the memory; routers stay fp32), no autocast")


def inference_precision(dtype: str, caps, folder=None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """--dtype -> (dtype to load the weights in, None = fp32; autocast dtype or None). `auto` keeps a bf16
    or FP8 checkpoint (`folder`) in bf16: upcasting would double its memory, which is what a big model on
    a small machine cannot afford; `--dtype fp32` asks for the upcast (faster where bf16 matmuls are
    emulated, as on CPUs without AVX512-BF16 / AMX)."""
    from .. import hardware

    if dtype == "auto" and folder is not None:
        from ..hf import read_safetensors

        if read_safetensors(folder).stored_dtype() == torch.bfloat16:
            if not caps.bf16:
                print("moeforge: weights kept in bf16 as stored (FP8 dequantised to bf16), half the memory of fp32; "
                      "bf16 matmuls are slow on this device: --dtype fp32 is faster if memory allows", file=sys.stderr)
            dtype = "bf16"
    if dtype == "bf16":
        return torch.bfloat16, None
    return None, hardware.autocast_dtype(dtype, caps)


def add_expert_arguments(parser) -> None:
    """The expert-budget flags of `moeforge generate` and `moeforge serve`."""
    parser.add_argument("--expert-budget", type=int, default=None, metavar="N",
                        help="keep only N routed experts per MoE layer resident, reading the others from the "
                             "checkpoint on demand (the experts are never all loaded)")
    parser.add_argument("--expert-memory", type=float, default=None, metavar="GB",
                        help="like --expert-budget, as a memory budget for the resident experts of all layers")
    parser.add_argument("--expert-policy", choices=("lru", "lfu"), default="lru",
                        help="which resident expert a miss evicts (with a budget; default lru)")
    parser.add_argument("--no-expert-prefetch", action="store_true",
                        help="with a budget, do not read the next layer's predicted experts ahead")


def expert_budgeted(args) -> bool:
    return getattr(args, "expert_budget", None) is not None or getattr(args, "expert_memory", None) is not None


def load_model(folder, caps, args, dtype: torch.dtype | None = None):
    """(model configured for `caps`, its weights in `dtype` (None = fp32; see `inference_precision`), ExpertCache
    or None). With --expert-budget / --expert-memory the routed experts are not loaded: the cache reads
    them from `folder` on demand."""
    from .. import hardware
    from ..errors import ConfigError
    from ..hf import from_pretrained

    budgeted = expert_budgeted(args)
    if budgeted:
        if args.expert_budget is not None and args.expert_memory is not None:
            raise ConfigError("--expert-budget and --expert-memory: give one of them")
        if args.expert_budget is not None and args.expert_budget < 1:
            raise ConfigError(f"--expert-budget must be >= 1, got {args.expert_budget}")
        if args.expert_memory is not None and not args.expert_memory > 0:
            raise ConfigError(f"--expert-memory must be > 0 GB, got {args.expert_memory}")
    model = hardware.configure(from_pretrained(folder, dtype=dtype, device=caps.device, routed_experts=not budgeted),
                               caps)
    if not budgeted:
        return model, None
    from .expert_cache import apply_expert_cache

    memory = None if args.expert_memory is None else int(args.expert_memory * 1e9)
    cache = apply_expert_cache(model, args.expert_budget, args.expert_policy, checkpoint=folder, memory_bytes=memory,
                               prefetch=not args.no_expert_prefetch)
    return model, cache


def generate_cached(model, prompt: list[int], args, stop: tuple[int, ...], autocast: torch.dtype | None) -> list[int]:
    """`moeforge generate` with the latent KV cache, or MTP speculative decoding with --mtp (whose
    acceptance rate and tokens per main-model forward go to stderr); with an expert budget, the cache's
    hit rate and bytes read per token too."""
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    cache = getattr(args, "expert_cache", None)
    start = time.perf_counter()
    if args.mtp:
        decoder = MTPSpeculativeDecoder(model, params, seed=args.seed, autocast_dtype=autocast)
        new = decoder.generate(prompt, args.max_new_tokens, stop)
        s = decoder.stats
        print(f"mtp: {s.accepted}/{s.drafted} drafts accepted ({s.acceptance_rate:.0%}), "
              f"{s.tokens_per_forward:.2f} tokens per main forward", file=sys.stderr)
    else:
        new = generate(model, [prompt], args.max_new_tokens, params, seed=args.seed, stop_ids=stop,
                       autocast_dtype=autocast)[0]
    seconds = time.perf_counter() - start
    if cache is not None:
        st = cache.stats
        scope = "per MoE layer" if cache.scope == "layer" else "in all"
        print(f"expert cache: {cache.budget} experts {scope} ({cache.resident_bytes() / 1e6:.1f} MB resident), "
              f"hit rate {st.hit_rate:.0%}, {st.bytes_per_token / 1e6:.2f} MB read per token"
              + (f", prefetch: {st.prefetch_used}/{st.prefetched} used, next-layer prediction recall "
                 f"{st.prediction_recall:.0%}" if cache.pool is not None else ""), file=sys.stderr)
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return new


def add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server for one checkpoint (needs moeforge[serve])",
                       description="Serve /v1/completions, /v1/chat/completions (streaming), /v1/models, /health.")
    s.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run folder (its newest intact checkpoint), a checkpoint in it, or a Hugging Face "
                        "DeepseekV3/V2 folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, else bytes)")
    s.add_argument("--device", default="auto")
    s.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait; more get HTTP 503")
    s.add_argument("--max-batch", type=int, default=4, help="requests decoded together as one batch (any sampling)")
    s.add_argument("--max-tokens", type=int, default=16, help="default max_tokens of a request")
    add_expert_arguments(s)
    add_dtype_flag(s)


def load_for_inference(checkpoint: str, tokenizer_path: str | None, device: str, args=None,
                       dtype: str | None = None):
    """(model, tokenizer, autocast dtype, folder) the way `moeforge generate` finds them: the tokenizer is
    --tokenizer, else the checkpoint's tokenizer.json, else the run's configured one, else bytes. `args`
    with an expert budget: the model's routed experts are read on demand (see `load_model`); `dtype` (else
    args.dtype, else auto): the --dtype of generate and serve."""
    from pathlib import Path

    from .. import hardware
    from ..config import decode_none, load_toml
    from ..data import load_tokenizer
    from ..errors import ConfigError
    from ..checkpoint import resolve_checkpoint_dir

    folder = resolve_checkpoint_dir(checkpoint)
    if tokenizer_path is None and (folder / "tokenizer.json").is_file():
        tokenizer_path = str(folder / "tokenizer.json")
    if tokenizer_path is None:
        for run_config in (folder.parent.parent / "config.toml", Path(checkpoint) / "config.toml"):
            if run_config.is_file():
                tokenizer_path = decode_none(load_toml(run_config).get("train", {}).get("tokenizer"))
                break
    tokenizer = load_tokenizer(tokenizer_path)
    caps = hardware.probe(device)
    weights, autocast = inference_precision(dtype or getattr(args, "dtype", "auto"), caps, folder)
    model, _ = load_model(folder, caps, args, weights)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    return model, tokenizer, autocast, folder


def media_encoder(lm, folder):
    """A multimodal checkpoint's encoders (image_url / input_audio content parts), else None."""
    from ..multimodal.model import ENCODER_CONFIG

    if not (folder / ENCODER_CONFIG).is_file():
        return None
    import json

    from ..multimodal.encoders import MultimodalConfig
    from ..multimodal.model import MultimodalLM, load_encoders
    from ..multimodal.serving import MediaEncoder

    mm = MultimodalLM(lm, MultimodalConfig.from_dict(json.loads((folder / ENCODER_CONFIG).read_text())))
    load_encoders(mm, folder)
    return MediaEncoder(mm.to(next(lm.parameters()).device).eval())


def cmd_serve(args) -> int:
    from ..errors import ConfigError

    try:
        from .server import serve
    except ImportError as e:
        raise ConfigError(f"moeforge serve needs FastAPI and uvicorn: pip install 'moeforge[serve]' ({e})") from None
    from .engine import Engine

    if args.max_queue < 1 or args.max_batch < 1:
        raise ConfigError("--max-queue and --max-batch must be >= 1")
    model, tokenizer, autocast, folder = load_for_inference(args.checkpoint, args.tokenizer, args.device, args)
    name = folder.parent.parent.name if folder.name.startswith("step-") else folder.name  # run name
    engine = Engine(model, tokenizer, autocast, max_queue=args.max_queue, max_batch=args.max_batch,
                    media_encoder=media_encoder(model, folder))
    print(f"moeforge serve: {folder} on http://{args.host}:{args.port} (model id {name!r})", file=sys.stderr)
    serve(engine, name, args.host, args.port, default_max_tokens=args.max_tokens)
    return 0


SERVE_HANDLERS = {"serve": cmd_serve}
