"""Speculative decoding with the model's own multi-token-prediction (MTP) module as the drafter.

DeepSeek-V3 trains an MTP module to predict token i+2 from the main model's last hidden state at i and the
embedding of token i+1. At inference it drafts one token ahead for free-ish (one block instead of the whole
stack); the main model then checks the current token and the draft in *one* forward:

    main([t, d]) -> p(. | ..t) and p(. | ..t, d)
    accept d with probability min(1, p(d) / q(d))  (greedy: iff d is the argmax)
    accepted: emit d and a bonus token from p(. | ..t, d)  -> 2 tokens per main forward
    rejected: emit a token from norm(max(p - q, 0))         -> 1 token; forget d's cache slot

This is the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023), so the output
follows the main model's distribution exactly, and greedy output is identical to plain greedy decoding.
Only the first MTP depth drafts (V3 has one); batch size 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model import Transformer
from .absorbed import forward_cached, forward_mtp, prefill
from .generation import cache_dtype, check_length
from .kv_cache import LatentKVCache
from .sampling import SamplingParams, distribution, sample

PREFILL_CHUNK = 512


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    main_forwards: int = 0  # decode forwards of the main model after the prefill
    tokens: int = 0  # tokens emitted after the first (which comes from the prefill)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.main_forwards if self.main_forwards else 0.0


def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None,
                 greedy: bool) -> tuple[bool, int]:
    """Speculative-sampling acceptance for target p [V] and draft distribution q [V]: (accepted, token),
    where token is the draft if accepted, else a sample from the residual norm(max(p - q, 0))."""
    if greedy:
        best = int(p.argmax())
        return best == draft, best
    u = torch.rand((), generator=generator, device=p.device)
    if float(u) * float(q[draft]) < float(p[draft]):  # u < p/q without dividing by a zero q
        return True, draft
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q: any rejection was measure-zero; fall back to p
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


class MTPSpeculativeDecoder:
    """Generate with MTP drafts; `stats` describes the last call."""

    def __init__(self, model: Transformer, params: SamplingParams = SamplingParams(), seed: int = 0,
                 mode: str = "auto", autocast_dtype: torch.dtype | None = None):
        if not len(model.mtp):
            raise ConfigError("this model has no MTP module (num_nextn_predict_layers = 0): cannot use --mtp")
        self.model, self.params, self.seed, self.mode = model, params, seed, mode
        self.autocast_dtype = autocast_dtype
        self.stats = SpeculativeStats()

    def draft(self, mtp_logits: torch.Tensor, generator) -> tuple[int, torch.Tensor]:
        """The drafted token (for output index len(self.output)) and the distribution it was drawn from,
        from MTP logits [V]."""
        q = distribution(mtp_logits[None], self.params)[0]
        if self.params.greedy:
            return int(q.argmax()), q
        return int(torch.multinomial(q, 1, generator=generator)), q

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        model, mode = self.model, self.mode
        if not prompt:
            raise ConfigError("the prompt needs at least one token")
        check_length(model, len(prompt), max_new_tokens)
        self.stats = stats = SpeculativeStats()
        if max_new_tokens <= 0:
            return []
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        dtype = cache_dtype(model, self.autocast_dtype)
        capacity = len(prompt) + max_new_tokens
        main = LatentKVCache.for_model(model.config, 1, capacity, dtype=dtype, device=device)
        mtp_cache = LatentKVCache.for_model(model.config, 1, capacity, n_layers=1, dtype=dtype, device=device)
        mtp = model.mtp[0]
        stops = set(stop_ids)
        self.output = out = []  # what is emitted so far (drafters may read it)

        def emit(tokens: list[int]) -> bool:
            """Append tokens up to a stop token or the limit; True when generation is over."""
            for t in tokens:
                out.append(t)
                if t in stops or len(out) >= max_new_tokens:
                    return True
            return False

        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
                logits, h = prefill(model, ids, main, mode=mode, chunk=PREFILL_CHUNK)
                t = int(sample(logits[:, -1], self.params, generator))
                if emit([t]):
                    return out
                # The MTP layer sees (h_i, token i+1) for every prompt position i.
                next_ids = torch.cat((ids[:, 1:], ids.new_tensor([[t]])), dim=1)
                for i in range(0, next_ids.shape[1], PREFILL_CHUNK):  # chunked like the main prefill
                    mtp_logits, _ = forward_mtp(model, mtp, h[:, i:i + PREFILL_CHUNK],
                                                next_ids[:, i:i + PREFILL_CHUNK], mtp_cache, mode=mode)
                while True:
                    if len(out) + 1 >= max_new_tokens:  # one token left: no room for a bonus token
                        logits, _ = forward_cached(model, ids.new_tensor([[t]]), main, mode=mode)
                        stats.main_forwards += 1
                        stats.tokens += 1
                        emit([int(sample(logits[:, -1], self.params, generator))])
                        return out
                    d, q = self.draft(mtp_logits[0, -1], generator)
                    logits, h = forward_cached(model, ids.new_tensor([[t, d]]), main, mode=mode)
                    stats.main_forwards += 1
                    stats.drafted += 1
                    p = distribution(logits[:, 0], self.params)[0]
                    accepted, token = accept_draft(p, q, d, generator, self.params.greedy)
                    if accepted:
                        stats.accepted += 1
                        new = [d, int(sample(logits[:, 1], self.params, generator))]
                    else:
                        main.truncate(main.length - 1)  # forget the rejected draft's slot
                        new, h = [token], h[:, :1]
                    stats.tokens += len(new)
                    if emit(new):
                        return out
                    mtp_logits, _ = forward_mtp(model, mtp, h, ids.new_tensor([new]), mtp_cache, mode=mode)
                    t = new[-1]
        finally:
            model.train(was_training)
