"""The MLA latent KV cache: per layer, only the normalised latent c_kv and the rotated RoPE key.

DeepSeek-V3 caches kv_lora_rank + qk_rope_head_dim numbers per token and layer (512 + 64 = 576; 70 KB per
token over 61 layers in BF16) instead of heads x (key + value) dims: the keys and values are rebuilt, or
absorbed into the query and output (`moeforge.inference.absorbed`). Both parts of a token sit side by side
in one row [C | R], so the absorbed scores are one matmul against the cache.

Shapes: L layers, B batch, S slots (cache capacity), C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


class LatentKVCache:
    """Slots are shared by all rows (left padding keeps a batch aligned): slot j of every row is written by
    the same forward. `valid` [B, S] marks real tokens (False for padding), `positions` [B] is each row's
    next RoPE position (its count of real tokens so far), `length` the slots in use."""

    def __init__(self, n_layers: int, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if capacity < 1 or batch < 1:
            raise ConfigError(f"cache needs batch >= 1 and capacity >= 1, got {batch} x {capacity}")
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.kv = torch.zeros(n_layers, batch, capacity, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, n_layers: int | None = None,
                  dtype: torch.dtype = torch.float32, device="cpu") -> "LatentKVCache":
        return cls(config.num_hidden_layers if n_layers is None else n_layers, batch, capacity,
                   config.kv_lora_rank, config.qk_rope_head_dim, dtype, device)

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x dtype size."""
        L, _, _, W = self.kv.shape
        return L * W * self.kv.element_size()

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def reserve(self, T: int, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Claim the next T slots for tokens whose `mask` [B, T] is True where real: returns the first slot
        and the RoPE positions [B, T] of the new tokens (padding gets its row's current position)."""
        start = self.length
        if start + T > self.capacity:
            raise ConfigError(f"KV cache full: {start} + {T} tokens > capacity {self.capacity}")
        mask = mask.to(self.valid.device, torch.bool)
        self.valid[:, start:start + T] = mask
        before = mask.long().cumsum(1) - mask.long()  # real tokens earlier in this chunk
        positions = self.positions[:, None] + before
        self.positions += mask.long().sum(1)
        self.length = start + T
        return start, positions

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.valid[:, length:] = False
        self.positions = self.valid[:, :length].long().sum(1)
        self.length = length

    def attention_bias(self, start: int, T: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, T, S] for queries in slots start..start+T-1: a key is visible when it is a
        real token at or before the query's slot. A query always sees its own slot, so padding rows
        (whose outputs are never read) stay finite."""
        S = start + T
        device = self.valid.device
        q_slot = torch.arange(start, S, device=device)[:, None]
        k_slot = torch.arange(S, device=device)[None, :]
        visible = (self.valid[:, None, :S] & (k_slot <= q_slot)) | (k_slot == q_slot)
        return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
