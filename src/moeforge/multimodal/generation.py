"""Greedy decoding after a multimodal prompt, with the LM's latent KV cache (`moeforge.inference`): the
prompt's embeddings (media vectors included) are prefilled once, then tokens are decoded one at a time."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..inference.absorbed import _rope_and_mask, block_step, forward_cached
from ..inference.kv_cache import LatentKVCache
from ..inference.sampling import SamplingParams, sample
from .data import Example, collate
from .model import MediaBatch, MultimodalLM


def prefill_embeddings(lm, h: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
    """Run embeddings [B, T, D] (rows of equal length) through the LM into `cache`; last logits [B, V]."""
    mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    start, cos, sin, bias = _rope_and_mask(lm, cache, mask)
    for i, layer in enumerate(lm.layers):
        h = block_step(layer, h, cos, sin, cache.kv[i], start, bias, "auto")
    return lm.lm_head(lm.norm(h[:, -1]))


@torch.no_grad()
def greedy_tokens(model: MultimodalLM, batch: MediaBatch, max_new: int, eos: int, autocast=nullcontext,
                  params: SamplingParams = SamplingParams(), seed: int = 0) -> list[list[int]]:
    """Continuation of every row of `batch` (rows of equal length), each cut at its first eos: greedy by
    default, else sampled with `params` (`moeforge.inference.sampling`)."""
    lm = model.lm
    device = next(model.parameters()).device
    batch = batch.to(device)
    B, T = batch.input_ids.shape
    cache = LatentKVCache.for_model(lm.config, B, T + max_new, device=device)
    rows: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast():
        logits = prefill_embeddings(lm, model.embed(batch), cache)
        for step in range(max_new):
            token = sample(logits.float(), params, generator)
            for r, (t, d) in enumerate(zip(token.tolist(), done.tolist())):
                if not d and t != eos:
                    rows[r].append(t)
            done |= token == eos
            if bool(done.all()) or step == max_new - 1:
                break
            logits = forward_cached(lm, token[:, None], cache)[0][:, -1]
    return rows


def greedy_answers(model: MultimodalLM, examples: list[Example], cfg, tokenizer, max_new: int = 20,
                   batch_size: int = 100, autocast=nullcontext) -> list[str]:
    """Greedy answers for examples, batched by equal prompt (hence equal length: media sizes are fixed)."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    answers: list[str] = [""] * len(examples)
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((ex.kind, ex.prompt), []).append(i)
    try:
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                batch = collate([examples[i] for i in chunk], cfg, tokenizer, with_answer=False)
                for i, row in zip(chunk, greedy_tokens(model, batch, max_new, eos, autocast)):
                    answers[i] = tokenizer.decode(row).strip()
    finally:
        model.train(was_training)
    return answers


def answer_media(model: MultimodalLM, kind: str, media_input, prompt: str, tokenizer, max_new: int,
                 params: SamplingParams = SamplingParams(), seed: int = 0) -> str:
    """One `<image>`/`<audio>` + prompt sequence (media already decoded) -> the model's continuation."""
    batch = collate([Example(kind, media_input, prompt, "", "")], model.mm_config, tokenizer, with_answer=False)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return tokenizer.decode(greedy_tokens(model, batch, max_new, eos, params=params, seed=seed)[0])
