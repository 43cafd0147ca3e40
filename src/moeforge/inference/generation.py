"""Batched generation with the latent KV cache: left-padded prefill, then one token per step.

`stream` yields each step's new tokens (for servers); `generate` collects them. Prompts of different
lengths are left-padded so that all rows write the same cache slot each step; padding is masked out of
attention and does not advance a row's RoPE position, so each row decodes exactly as if it were alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError
from ..model import Transformer
from .absorbed import forward_cached, prefill
from .kv_cache import LatentKVCache
from .sampling import SamplingParams, sample


def cache_dtype(model: Transformer, autocast_dtype: torch.dtype | None) -> torch.dtype:
    return autocast_dtype or next(model.parameters()).dtype


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, T] and mask [B, T] (False on the left padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, T - len(p):] = True
    return ids, mask


def check_length(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ConfigError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                          f"model's context of {limit} tokens")


@torch.no_grad()
def stream(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           params: SamplingParams = SamplingParams(), seed: int = 0, stop_ids: Sequence[int] = (),
           mode: str = "auto", autocast_dtype: torch.dtype | None = None,
           prefill_chunk: int = 512) -> Iterator[list[int | None]]:
    """Yield, once per step, each row's new token (None once that row has stopped). The prompt is
    prefilled in chunks of `prefill_chunk` tokens (bounded attention memory)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, device)
    B, T = ids.shape
    check_length(model, T, max_new_tokens)
    if max_new_tokens <= 0:
        return
    cache = LatentKVCache.for_model(model.config, B, T + max_new_tokens, dtype=cache_dtype(model, autocast_dtype),
                                    device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits, _ = prefill(model, ids, cache, mask, mode, prefill_chunk)
            for step in range(max_new_tokens):
                token = sample(logits[:, -1], params, generator)
                yield [None if d else int(t) for t, d in zip(token.tolist(), done.tolist())]
                done |= torch.isin(token, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                logits, _ = forward_cached(model, token[:, None], cache, None, mode)
    finally:
        model.train(was_training)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: SamplingParams = SamplingParams(), seed: int = 0, stop_ids: Sequence[int] = (),
             mode: str = "auto", autocast_dtype: torch.dtype | None = None,
             prefill_chunk: int = 512) -> list[list[int]]:
    """New tokens per prompt (a stop token is included, as in `moeforge.generate.generate`)."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream(model, prompts, max_new_tokens, params, seed, stop_ids, mode, autocast_dtype, prefill_chunk):
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out
