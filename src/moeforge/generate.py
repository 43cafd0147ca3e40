"""Plain autoregressive sampling (greedy, temperature, top-k, top-p), seeded.

Each step re-runs the whole sequence: simple and exact for short samples. The latent-KV-cache decoder
and MTP speculative decoding belong to the inference work.
"""

from __future__ import annotations

import torch

from .model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
             stop_ids: tuple[int, ...] = (), autocast_dtype: torch.dtype | None = None) -> list[int]:
    """Return the new token ids (without the prompt). temperature 0 = greedy."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids or [0]], dtype=torch.long, device=device)
    limit = model.config.max_position_embeddings
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = ids[:, -limit:]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(context).logits[0, -1].float()
        token = sample(logits, temperature, top_k, top_p, g)
        new.append(token)
        if token in stop_ids:
            break
        ids = torch.cat((ids, ids.new_tensor([[token]])), dim=1)
    model.train(was_training)
    return new


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
