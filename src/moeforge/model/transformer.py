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
    """A DeepSeek-V3-style causal LM. `model(input_ids, labels=None) -> ModelOutput`."""

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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T]; labels [B, T] = the token after each position (IGNORE_INDEX to skip)."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rotary(torch.arange(T, device=input_ids.device))
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        if labels is None:
            return ModelOutput(logits=logits)

        lm_loss = cross_entropy(logits, labels)
        if not self.mtp:
            return ModelOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss)
        # Depth k predicts token i+k+1 from h_i^{k-1} and the embedding of token i+k (= labels[:, i+k-1]).
        mtp_losses = []
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            h = module(h[:, :T - k], self.embed_tokens(labels[:, k - 1:T - 1].clamp(min=0)),
                       cos[:T - k], sin[:T - k])
            mtp_losses.append(cross_entropy(self.lm_head(module.norm(h)), labels[:, k:]))
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else lm_loss.new_zeros(())
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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
