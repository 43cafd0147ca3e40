"""Held-out evaluation: image exact match, speech word accuracy, expert load per modality."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .data import Example, collate
from .generation import greedy_answers
from .model import MODALITIES, TEXT, MultimodalLM


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions + insertions + deletions)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1]


def word_accuracy(refs: list[str], hyps: list[str]) -> float:
    """1 - word error rate, floored at 0."""
    words = sum(len(r.split()) for r in refs)
    errors = sum(word_errors(r.split(), h.split()) for r, h in zip(refs, hyps))
    return max(0.0, 1.0 - errors / max(1, words))


class ModalityLoad:
    """Counts, per modality, the tokens each routed expert receives: router hooks read the chosen expert
    ids and the `token_type` of the batch being run (set with `types`)."""

    def __init__(self, model: MultimodalLM):
        layers = model.moe_layers()
        E = model.config.n_routed_experts
        self.counts = torch.zeros(len(MODALITIES), len(layers), E)
        self.types: torch.Tensor | None = None
        self._handles = [moe.gate.register_forward_hook(self._hook(i)) for i, (_, moe) in enumerate(layers)]

    def _hook(self, layer: int):
        def record(module, inputs, output):
            _, indices, _ = output
            if self.types is None or self.types.numel() != indices.shape[0]:
                return  # decoding steps (one new token) are not counted
            K = indices.shape[1]
            flat = (self.types.reshape(-1, 1).expand(-1, K) * self.counts.shape[2] + indices.cpu()).flatten()
            self.counts[:, layer] += torch.bincount(flat, minlength=self.counts[:, layer].numel()).view(
                len(MODALITIES), -1).float()
        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def fractions(self) -> dict[str, list[list[float]]]:
        """modality -> [layer][expert] share of that modality's routed slots."""
        share = self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)
        return {m: share[k].tolist() for k, m in enumerate(MODALITIES) if self.counts[k].sum() > 0}

    def separation(self) -> dict[str, list[float]]:
        """'a/b' -> per layer total-variation distance between two modalities' expert shares (0 = the same
        experts in the same proportions, 1 = disjoint experts)."""
        share = self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)
        present = [k for k in range(len(MODALITIES)) if self.counts[k].sum() > 0]
        return {f"{MODALITIES[a]}/{MODALITIES[b]}": (0.5 * (share[a] - share[b]).abs().sum(-1)).tolist()
                for i, a in enumerate(present) for b in present[i + 1:]}


@torch.no_grad()
def evaluate_media(model: MultimodalLM, images: list[Example], speech: list[Example], text_batches, cfg,
                   tokenizer, autocast=nullcontext) -> dict:
    """Held-out accuracies and per-modality expert load (text from `text_batches` of token ids)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    load = ModalityLoad(model)
    try:
        for examples in (images, speech):  # routing of the media and prompt tokens, teacher-forced answers
            for start in range(0, len(examples), 64):
                batch = collate(examples[start:start + 64], cfg, tokenizer).to(device)
                load.types = batch.token_type.cpu()
                with autocast():
                    model.media_logits(batch)
        for ids in text_batches:
            load.types = torch.full(ids.shape, TEXT)
            with autocast():
                model(ids.to(device))
        load.types = None
        img_answers = greedy_answers(model, images, cfg, tokenizer, autocast=autocast)
        speech_answers = greedy_answers(model, speech, cfg, tokenizer, autocast=autocast)
    finally:
        load.remove()
        model.train(was_training)
    accuracy = {}
    for task in sorted({ex.task for ex in images}):
        pairs = [(ex.answer, a) for ex, a in zip(images, img_answers) if ex.task == task]
        accuracy[task] = sum(r == a for r, a in pairs) / len(pairs)
    accuracy["all"] = sum(ex.answer == a for ex, a in zip(images, img_answers)) / max(1, len(images))
    return {
        "image_accuracy": accuracy,
        "speech_word_accuracy": word_accuracy([ex.answer for ex in speech], speech_answers),
        "speech_exact_match": sum(ex.answer == a for ex, a in zip(speech, speech_answers)) / max(1, len(speech)),
        "expert_load_by_modality": load.fractions(),
        "expert_load_separation": load.separation(),
        "examples": [{"kind": ex.kind, "prompt": ex.prompt, "answer": ex.answer, "output": a}
                     for ex, a in list(zip(images, img_answers))[:5] + list(zip(speech, speech_answers))[:5]],
    }
