"""A budgeted expert cache: only `budget` routed experts stay resident in fast memory, the rest are fetched
from slower storage when the router picks them (KTransformers-style offloading, in software).

  slow storage  `SafetensorsExpertStore`: the checkpoint's per-expert tensors, memory-mapped from disk with
                safetensors' `safe_open` (CPU runs: RAM holds only the resident experts);
                `MemoryExpertStore`: the model's own stacked weights kept in (pinned) CPU RAM (GPU runs).
  policy        "lru" evicts the least recently used expert; "lfu" evicts the one with the fewest routed
                tokens so far (the observed routing statistics; ties: least recently used). MoE routing is
                skewed, so a frequency policy keeps the hot experts.

`apply_expert_cache(model, budget, ...)` swaps every `GroupedExperts` for a `CachedExperts` (from outside,
as the hardware/parallel code does); results are identical to the resident model's `loop` expert kernel,
which computes the same per-expert matmuls. Budgets count experts over all MoE layers together.
Shapes: M routed rows, D hidden, F expert width, E experts.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hf import dequantize_fp8_block
from ..model.moe import GroupedExperts, MoE, swiglu

POLICIES = ("lru", "lfu")


class MemoryExpertStore:
    """Experts kept in CPU RAM (pinned when they will be copied to a GPU), taken from the model itself."""

    def __init__(self, experts: dict[int, GroupedExperts], pin: bool = False):
        self.weights = {}
        for layer, module in experts.items():
            w_in, w_out = module.gate_up_proj.detach().cpu(), module.down_proj.detach().cpu()
            if pin:
                w_in, w_out = w_in.pin_memory(), w_out.pin_memory()
            self.weights[layer] = (w_in, w_out)

    def load(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_in, w_out = self.weights[layer]
        return w_in[expert], w_out[expert]


class SafetensorsExpertStore:
    """Per-expert tensors of a Hugging Face-layout folder (`moeforge.hf` names), read on demand from the
    memory-mapped files; FP8 blocks are dequantised as they are read."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no .safetensors files for the expert store")
        self.handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self.where = {key: h for h in self.handles for key in h.keys()}

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"expert tensor {key} is not in the checkpoint")
        t = self.where[key].get_tensor(key)
        scale = key.removesuffix("weight") + "weight_scale_inv"
        return dequantize_fp8_block(t, self.where[scale].get_tensor(scale)) if scale in self.where else t

    def load(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = f"model.layers.{layer}.mlp.experts.{expert}."
        gate, up = self._get(base + "gate_proj.weight"), self._get(base + "up_proj.weight")
        return torch.cat((gate, up), dim=0), self._get(base + "down_proj.weight")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    tokens: int = 0  # tokens through the MoE layers (counted once per token, not per layer)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0


class ExpertCache:
    """Resident experts keyed by (layer, expert), at most `budget` of them, on `device` in `dtype`."""

    def __init__(self, store, budget: int, policy: str = "lru", device="cpu", dtype: torch.dtype = torch.float32):
        if budget < 1:
            raise ConfigError(f"expert cache budget must be >= 1 expert, got {budget}")
        if policy not in POLICIES:
            raise ConfigError(f"unknown expert cache policy {policy!r}; choose from {POLICIES}")
        self.store, self.budget, self.policy = store, budget, policy
        self.device, self.dtype = torch.device(device), dtype
        self.resident: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.frequency: dict[tuple[int, int], int] = {}
        self.tokens_by_layer: dict[int, int] = {}
        self.stats = CacheStats()

    def observe(self, layer: int, counts: list[int], tokens: int) -> None:
        """Record one forward's routing: tokens per expert of `layer`."""
        for e, n in enumerate(counts):
            if n:
                self.frequency[(layer, e)] = self.frequency.get((layer, e), 0) + n
        self.tokens_by_layer[layer] = self.tokens_by_layer.get(layer, 0) + tokens
        self.stats.tokens = max(self.tokens_by_layer.values())

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, expert)
        if key in self.resident:
            self.stats.hits += 1
            self.resident.move_to_end(key)
            return self.resident[key]
        self.stats.misses += 1
        while len(self.resident) >= self.budget:
            self._evict()
        w_in, w_out = self.store.load(layer, expert)
        self.stats.bytes_moved += w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
        nb = self.device.type == "cuda"
        weights = tuple(w.to(self.device, self.dtype, non_blocking=nb) for w in (w_in, w_out))
        self.resident[key] = weights
        return weights

    def _evict(self) -> None:
        if self.policy == "lru":
            self.resident.popitem(last=False)
            return
        # lfu: fewest routed tokens; the OrderedDict runs from least to most recently used, so min() keeps
        # the least recently used of equally frequent experts.
        victim = min(self.resident, key=lambda k: self.frequency.get(k, 0))
        del self.resident[victim]

    def warm(self, loads: dict[int, list[float]]) -> None:
        """Preload the `budget` most used experts of a routing-statistics table {layer: per-expert load}
        (e.g. a run's logged expert counts); their loads also seed the lfu frequencies."""
        ranked = sorted(((n, layer, e) for layer, row in loads.items() for e, n in enumerate(row)), reverse=True)
        for n, layer, e in ranked[:self.budget]:
            self.frequency[(layer, e)] = self.frequency.get((layer, e), 0) + int(n)
            self.get(layer, e)
        self.stats = CacheStats()


class CachedExperts(nn.Module):
    """Drop-in for `GroupedExperts` whose weights live in an `ExpertCache`; computes like its `loop`
    kernel (one matmul pair per expert that received tokens)."""

    def __init__(self, cache: ExpertCache, layer: int, n_experts: int, top_k: int):
        super().__init__()
        self.cache, self.layer, self.n_experts, self.top_k = cache, layer, n_experts, top_k
        self.impl = "cached"

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]."""
        sizes = counts.tolist()
        self.cache.observe(self.layer, sizes, x.shape[0] // self.top_k)
        outs = []
        for e, xe in enumerate(x.split(sizes)):
            if sizes[e]:
                w_in, w_out = self.cache.get(self.layer, e)
                outs.append(swiglu(xe @ w_in.to(xe.dtype).T) @ w_out.to(xe.dtype).T)
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])


def moe_modules(model) -> dict[int, MoE]:
    """{checkpoint layer id: MoE} for the main model and its MTP blocks (MTP k is layer L + k)."""
    L = model.config.num_hidden_layers
    found = {i: layer.mlp for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)}
    found.update({L + k: m.block.mlp for k, m in enumerate(model.mtp) if isinstance(m.block.mlp, MoE)})
    return found


def apply_expert_cache(model, budget: int, policy: str = "lru", checkpoint: str | Path | None = None) -> ExpertCache:
    """Replace every routed-expert module by a cached one sharing one `ExpertCache` of `budget` experts.
    checkpoint: a HF-layout folder whose safetensors become the (memory-mapped) store; None keeps the
    model's expert weights in CPU RAM (the store for GPU runs). The model's own copies are released."""
    moes = moe_modules(model)
    if not moes:
        raise ConfigError("this model has no MoE layers to cache")
    sample = next(iter(moes.values())).experts
    if not isinstance(sample, GroupedExperts):
        raise ConfigError("the expert cache is already applied")
    device, dtype = sample.gate_up_proj.device, sample.gate_up_proj.dtype
    if checkpoint is None:
        store = MemoryExpertStore({i: m.experts for i, m in moes.items()}, pin=device.type == "cuda")
    else:
        store = SafetensorsExpertStore(checkpoint)
    cache = ExpertCache(store, budget, policy, device=device, dtype=dtype)
    for layer, moe in moes.items():
        moe.experts = CachedExperts(cache, layer, moe.gate.n_experts, moe.top_k)
    return cache
