"""The DeepSeek-V3 decoder: embedding, blocks (MLA + dense MLP or MoE), final norm, output head, and
optional multi-token-prediction (MTP) modules.

Parameter names match the Hugging Face checkpoint without its `model.` prefix, except that routed
experts are stacked (see `moeforge.hf` for the mapping). Shapes: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mla import MLA
from .moe import MoE
from .norm import RMSNorm, SwiGLU
from .rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """`loss` is what training minimises: next-token loss + mtp_loss_weight x mean MTP loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = MLA(config)
        self.mlp = MoE(config) if layer_id >= config.first_k_dense_replace else SwiGLU(
            config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 sec. 2.2).

    h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]), then one transformer block and a final norm; the
    embedding and output head are the main model's. (Concatenation order as in the released checkpoint.)
    """

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(config, layer_id)
        self.norm = RMSNorm(D, config.rms_norm_eps)  # HF: shared_head.norm

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.block(h, cos, sin)


class Transformer(nn.Module):
    """A DeepSeek-V3-style causal LM. `model(input_ids, labels=None) -> ModelOutput` (labels unshifted, as in
    transformers)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP modules take the layer ids after the main model's, as in the checkpoint (V3: layer 61).
        self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for routing biases."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias") or name.endswith("tokens_per_expert"):
                b.zero_()
        self.rotary.reset()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                shift_labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, V], and the loss when targets are given, either as

        labels [B, T]        transformers' convention: unshifted, the model shifts (position i is scored on
                             labels[:, i+1]), so `labels=input_ids` is next-token training;
        shift_labels [B, T]  already shifted, shift_labels[:, i] = the token after position i (the name
                             transformers' loss functions use): what a sampler of T+1-token windows
                             passes, so that the last position keeps its target.

        IGNORE_INDEX (-100) skips a target. MTP depth k at position i predicts the target of position i+k
        from the embedding of token i+k, read from input_ids (targets may hold -100).
        """
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rotary(torch.arange(T, device=input_ids.device))
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        targets, known = shifted_targets(input_ids, labels, shift_labels)
        if targets is None:
            return ModelOutput(logits=logits)
        lm_loss = cross_entropy(logits, targets)
        if not self.mtp:
            return ModelOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss)
        mtp_loss = mtp_losses(self, h, input_ids, targets, known, cos, sin)
        loss = lm_loss + self.config.mtp_loss_weight * mtp_loss
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss)

    def logits_from_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, D] input embeddings -> logits [B, T, V]: the blocks, norm and head without the token
        embedding, for callers that build the input vectors themselves (e.g. `moeforge.multimodal`)."""
        T = h.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rotary(torch.arange(T, device=h.device))
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer id, MoE module) for every MoE layer of the main model."""
        return [(i, layer.mlp) for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def shifted_targets(input_ids: torch.Tensor, labels: torch.Tensor | None,
                    shift_labels: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """(targets [B, T] with targets[:, i] scored at position i, how many leading positions can have one):
    labels are shifted as transformers' ForCausalLMLoss does (the last position gets IGNORE_INDEX)."""
    if labels is not None and shift_labels is not None:
        raise ValueError("pass labels (unshifted) or shift_labels (already shifted), not both")
    given = labels if labels is not None else shift_labels
    if given is None:
        return None, 0
    if given.shape != input_ids.shape:
        name = "labels" if labels is not None else "shift_labels"
        raise ValueError(f"{name} has shape {tuple(given.shape)}, input_ids {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if shift_labels is not None:
        return shift_labels, T
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX), T - 1


def mtp_losses(model: nn.Module, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, known: int,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mean MTP loss over the depths (DeepSeek-V3 sec. 2.2): depth k runs on positions i < known - k,
    from its previous depth's hidden state h_i and the embedding of token i+k, and is scored on
    targets[:, i+k] (= token i+k+1). `model` is anything with embed_tokens, lm_head and mtp (the
    Transformer, or a pipeline's last stage)."""
    losses = []
    for k, module in enumerate(model.mtp, start=1):
        n = known - k
        if n <= 0:
            break
        h = module(h[:, :n], model.embed_tokens(input_ids[:, k:k + n]), cos[:n], sin[:n])
        losses.append(cross_entropy(model.lm_head(module.norm(h)), targets[:, k:k + n]))
    return torch.stack(losses).mean() if losses else h.new_zeros((), dtype=torch.float32)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 over the targets that are not IGNORE_INDEX; labels [B, T] already
    aligned with logits [B, T, V]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
