"""Greedy decoding after a multimodal prompt, with the LM's latent KV cache (`moeforge.inference`): the
prompt's embeddings (media vectors included) are prefilled once, then tokens are decoded one at a time."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..inference.absorbed import forward_cached
from ..inference.kv_cache import LatentKVCache
from ..inference.sampling import SamplingParams, sample
from .data import Example, collate, prompt_segments
from .model import MediaBatch, MultimodalLM


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
        logits = forward_cached(lm, batch.input_ids, cache, embeds=model.embed(batch))[0][:, -1]
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


def segments_batch(segments: list, cfg, tokenizer) -> MediaBatch:
    """One prompt of text and (kind, item) segments, laid out as the server lays it out
    (`serving.layout`), as a batch of one."""
    from .encoders import pad_clip
    from .serving import layout

    ids, types, spans = layout(segments, cfg, tokenizer)
    images = [item for _, kind, item in spans if kind == "image"]
    clips = [pad_clip(item, cfg) for _, kind, item in spans if kind == "audio"]
    return MediaBatch(torch.tensor([ids]), torch.tensor([types]),
                      images=torch.stack(images) if images else None,
                      mels=torch.stack([m for m, _ in clips]) if clips else None,
                      frames=torch.tensor([f for _, f in clips]) if clips else None)


def answer_segments(model: MultimodalLM, segments: list, tokenizer, max_new: int,
                    params: SamplingParams = SamplingParams(), seed: int = 0) -> str:
    """Text and (kind, item) segments (media already decoded) -> the model's continuation."""
    batch = segments_batch(segments, model.mm_config, tokenizer)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return tokenizer.decode(greedy_tokens(model, batch, max_new, eos, params=params, seed=seed)[0])


def answer_media(model: MultimodalLM, kind: str, media_input, prompt: str, tokenizer, max_new: int,
                 params: SamplingParams = SamplingParams(), seed: int = 0) -> str:
    """One image or clip and a prompt, as training lays them out (`data.prompt_segments`) -> the model's
    continuation."""
    return answer_segments(model, prompt_segments(kind, media_input, prompt), tokenizer, max_new, params, seed)
