"""A budgeted expert cache: only a budget of routed experts is resident, the rest stay in slower storage and
are read when the router picks them (KTransformers-style offloading, in software).

  slow storage  `SafetensorsExpertStore`: the checkpoint's expert tensors read from disk on a miss with
                positioned reads into memory the cache owns (`moeforge.safetensors_reader`: no file
                mapping, so the process holds only the resident experts). Per-expert tensors and fused
                [E, ...] stacks alike read one expert, so no second file layout is needed.
                `MemoryExpertStore`: the model's own stacked weights kept in (pinned) CPU RAM.
  budget        `budget` experts per MoE layer (scope "layer", `--expert-budget N`), or over all MoE
                layers together (scope "model", what a byte budget `--expert-memory GB` becomes).
  policy        "lru" evicts the least recently used expert; "lfu" the one with the fewest routed tokens
                so far (ties: least recently used).
  prefetch      while layer l computes, layer l+1's router applied to layer l's input predicts l+1's
                experts (the residual stream changes little between layers); the missing ones are read
                by a background thread (`os.preadv` releases the GIL). Stats say how often it was right.

With a budget the model is built with its routed experts left on the meta device and never read whole
(`load_budgeted`): peak memory is the dense weights + the budget + the KV cache, whatever the number of
experts. Results are identical to the resident model's `loop` expert kernel (the same per-expert
matmuls). Shapes: M routed rows, D hidden, F expert width, E experts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.moe import GroupedExperts, MoE, swiglu

POLICIES = ("lru", "lfu")
SCOPES = ("layer", "model")


class MemoryExpertStore:
    """Experts kept in CPU RAM (pinned when they will be copied to a GPU), taken from the model itself."""

    def __init__(self, experts: dict[int, GroupedExperts], pin: bool = False):
        self.weights = {}
        for layer, module in experts.items():
            w_in, w_out = module.gate_up_proj.detach().cpu(), module.down_proj.detach().cpu()
            if pin:
                w_in, w_out = w_in.pin_memory(), w_out.pin_memory()
            self.weights[layer] = (w_in, w_out)

    def load(self, layer: int, expert: int, dtype: torch.dtype, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        w_in, w_out = self.weights[layer]
        if out is not None:
            return out[0].copy_(w_in[expert]), out[1].copy_(w_out[expert])
        # copies, never views: the cache reuses an evicted expert's memory for the next read
        return w_in[expert].to(dtype, copy=True), w_out[expert].to(dtype, copy=True)


class SafetensorsExpertStore:
    """One expert at a time from a Hugging Face-layout folder (`moeforge.hf` names): per-expert
    gate/up/down tensors (FP8 blocks dequantised) or the fused gate_up_proj / down_proj stacks."""

    def __init__(self, folder: str | Path):
        from ..hf import read_safetensors

        self.files = read_safetensors(folder)

    def load(self, layer: int, expert: int, dtype: torch.dtype, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [2F, D], w_out [D, F]) in `dtype`, read into `out` (an evicted expert's pair) if given."""
        base = f"model.layers.{layer}.mlp.experts."
        if base + "gate_up_proj" in self.files:
            w = (self.files.expert(base + "gate_up_proj", expert), self.files.expert(base + "down_proj", expert))
            return tuple(o.copy_(t) for o, t in zip(out, w)) if out is not None else tuple(t.to(dtype) for t in w)
        names = [f"{base}{expert}.{p}_proj.weight" for p in ("gate", "up", "down")]
        missing = [n for n in names if n not in self.files]
        if missing:
            raise CheckpointError(f"expert tensor {missing[0]} is not in {self.files.folder}")
        (F, D), (D2, F2) = self.files.shape(names[0]), self.files.shape(names[2])
        w_in, w_out = out if out is not None else (torch.empty(2 * F, D, dtype=dtype), torch.empty(D2, F2, dtype=dtype))
        self.files.read_into(names[0], w_in[:F])
        self.files.read_into(names[1], w_in[F:])
        self.files.read_into(names[2], w_out)
        return w_in, w_out


@dataclass
class CacheStats:
    hits: int = 0  # expert uses found resident (prefetched ones included)
    misses: int = 0  # expert uses that waited for a read
    prefetched: int = 0  # experts read ahead by the prefetch thread
    prefetch_used: int = 0  # ... of them used before being evicted
    predicted: int = 0  # experts a layer needed that the previous layer's prediction named
    needed: int = 0  # experts a layer needed, over the layers that had a prediction
    bytes_moved: int = 0  # bytes brought into the cache (misses and prefetches)
    tokens: int = 0  # tokens through the MoE layers (counted once per token, not per layer)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0

    @property
    def prediction_recall(self) -> float:
        return self.predicted / self.needed if self.needed else 0.0


class ExpertCache:
    """Resident experts keyed by (layer, expert) on `device` in `dtype`: at most `budget` per layer (scope
    "layer") or in all (scope "model"). An entry is a (w_in, w_out) pair or the Future of a prefetch."""

    def __init__(self, store, budget: int, policy: str = "lru", device="cpu", dtype: torch.dtype = torch.float32,
                 scope: str = "layer", prefetch: bool = False):
        if budget < 1:
            raise ConfigError(f"expert cache budget must be >= 1 expert, got {budget}")
        if policy not in POLICIES:
            raise ConfigError(f"unknown expert cache policy {policy!r}; choose from {POLICIES}")
        if scope not in SCOPES:
            raise ConfigError(f"unknown expert cache scope {scope!r}; choose from {SCOPES}")
        self.store, self.budget, self.policy, self.scope = store, budget, policy, scope
        self.device, self.dtype = torch.device(device), dtype
        self.resident: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | Future] = OrderedDict()
        self.frequency: dict[tuple[int, int], int] = {}
        self.tokens_by_layer: dict[int, int] = {}
        self.unused_prefetch: set[tuple[int, int]] = set()
        self.free: list[tuple[torch.Tensor, torch.Tensor]] = []  # evicted experts' memory, for reuse
        self.slot_shapes: tuple[torch.Size, torch.Size] | None = None  # an expert's (w_in, w_out) shapes
        self.predictions: dict[int, set[int]] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moeforge-prefetch") if prefetch else None
        self.stats = CacheStats()
        self.lock = threading.Lock()  # stats.bytes_moved is updated by both threads

    # --- bookkeeping ------------------------------------------------------------------------------
    def observe(self, layer: int, counts: list[int], tokens: int) -> None:
        """Record one forward's routing: tokens per expert of `layer` (and how well it was predicted)."""
        used = {e for e, n in enumerate(counts) if n}
        for e in used:
            self.frequency[(layer, e)] = self.frequency.get((layer, e), 0) + counts[e]
        if layer in self.predictions:
            guess = self.predictions.pop(layer)
            self.stats.predicted += len(used & guess)
            self.stats.needed += len(used)
        self.tokens_by_layer[layer] = self.tokens_by_layer.get(layer, 0) + tokens
        self.stats.tokens = max(self.tokens_by_layer.values())

    def resident_bytes(self) -> int:
        return sum(sum(w.numel() * w.element_size() for w in v) for v in self.resident.values()
                   if not isinstance(v, Future))

    def _load(self, layer: int, expert: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one expert (main thread on a miss, the prefetch thread ahead of use), into `out` if given."""
        w_in, w_out = self.store.load(layer, expert, self.dtype, out)
        self.slot_shapes = (w_in.shape, w_out.shape)
        nb = self.device.type == "cuda"
        with self.lock:
            self.stats.bytes_moved += w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
        return w_in.to(self.device, non_blocking=nb), w_out.to(self.device, non_blocking=nb)

    # --- use -------------------------------------------------------------------------------------
    def get(self, layer: int, expert: int, keep: frozenset = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's weights, read now on a miss (evicting per policy, sparing `keep` if it can)."""
        key = (layer, expert)
        if key in self.resident:
            self.stats.hits += 1
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
                self.stats.prefetch_used += 1
            self.resident.move_to_end(key)
            w = self.resident[key]
            if isinstance(w, Future):
                w = self.resident[key] = w.result()
            return w
        self.stats.misses += 1
        self._make_room(layer, keep | {key})
        self.resident[key] = self._load(layer, expert, self._free_slot())
        return self.resident[key]

    def prefetch(self, layer: int, experts: list[int], keep: frozenset = frozenset()) -> None:
        """Start reading `experts` of `layer` (most wanted first) in the background, at most the budget,
        evicting neither them nor `keep` (the experts the running layer still needs) if it can."""
        self.predictions[layer] = set(experts)
        if self.pool is None:
            return
        wanted = [(layer, e) for e in experts[:self.budget]]
        protect = frozenset(wanted) | keep
        for key in wanted:
            if key in self.resident:
                continue
            self._make_room(layer, protect)
            self.resident[key] = self.pool.submit(self._load, *key, self._free_slot())
            self.resident.move_to_end(key, last=False)  # not used yet: first to go if the guess is wrong
            self.stats.prefetched += 1
            self.unused_prefetch.add(key)

    def _free_slot(self):
        """An evicted expert's (w_in, w_out) to read into, else (on CPU, once an expert's shapes are known)
        fresh memory allocated here, on the calling (main) thread, or None. Resident memory then stays at
        the budget: fresh allocations per miss let the heap grow well past it (glibc keeps freed chunks),
        and allocations on the prefetch thread would grow a heap arena of its own."""
        if self.free:
            return self.free.pop()
        if self.device.type == "cpu" and self.slot_shapes is not None:
            return tuple(torch.empty(shape, dtype=self.dtype) for shape in self.slot_shapes)
        return None

    def _recycle(self, future: Future) -> None:
        """A prefetch evicted while its read ran: its memory goes back to the free slots when the read ends."""
        if not future.cancelled() and future.exception() is None and self.device.type == "cpu":
            self.free.append(future.result())

    def _make_room(self, layer: int, keep: frozenset) -> None:
        scope = [k for k in self.resident if self.scope == "model" or k[0] == layer]
        while len(scope) >= self.budget:
            candidates = [k for k in scope if k not in keep] or scope
            victim = candidates[0] if self.policy == "lru" else min(candidates, key=lambda k: self.frequency.get(k, 0))
            # lfu: the OrderedDict runs from least to most recently used, so min() keeps the least recently
            # used of equally frequent experts.
            entry = self.resident.pop(victim)
            if isinstance(entry, Future):
                if not entry.cancel():  # running or done: keep its memory
                    entry.add_done_callback(self._recycle)
            elif self.device.type == "cpu":  # its memory takes the next expert read: no allocator churn
                self.free.append(entry)
            self.unused_prefetch.discard(victim)
            scope.remove(victim)

    def warm(self, loads: dict[int, list[float]]) -> None:
        """Preload the most used experts of a routing-statistics table {layer: per-expert load} (e.g. a
        run's logged expert counts), as many as the budget holds; their loads also seed lfu."""
        ranked = sorted(((n, layer, e) for layer, row in loads.items() for e, n in enumerate(row)), reverse=True)
        taken: dict[int, int] = {}
        for n, layer, e in ranked:
            scope = layer if self.scope == "layer" else None
            if taken.get(scope, 0) >= self.budget:
                continue
            taken[scope] = taken.get(scope, 0) + 1
            self.frequency[(layer, e)] = self.frequency.get((layer, e), 0) + int(n)
            self.get(layer, e)
        self.stats = CacheStats()


class CachedExperts(nn.Module):
    """Drop-in for `GroupedExperts` whose weights live in an `ExpertCache`; computes like its `loop`
    kernel (one matmul pair per expert that received tokens). `next_gate` (layer id, Router) is the next
    MoE layer's router, used to predict and prefetch that layer's experts."""

    def __init__(self, cache: ExpertCache, layer: int, n_experts: int, top_k: int,
                 next_gate: tuple[int, nn.Module] | None = None):
        super().__init__()
        self.cache, self.layer, self.n_experts, self.top_k = cache, layer, n_experts, top_k
        self.next_layer, self._next_gate = (next_gate or (None, None))
        self.impl = "cached"

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]."""
        sizes = counts.tolist()
        self.cache.observe(self.layer, sizes, x.shape[0] // self.top_k)
        used = frozenset((self.layer, e) for e, n in enumerate(sizes) if n)
        if self._next_gate is not None and x.shape[0]:
            self._predict_next(x, used)
        outs = []
        for e, xe in enumerate(x.split(sizes)):
            if sizes[e]:
                w_in, w_out = self.cache.get(self.layer, e, keep=used)
                outs.append(swiglu(xe @ w_in.to(xe.dtype).T) @ w_out.to(xe.dtype).T)
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])

    @torch.no_grad()
    def _predict_next(self, x: torch.Tensor, used: frozenset) -> None:
        # Rows are this layer's routed copies of its input (each token K times), so expert counts over the
        # rows rank the next layer's experts as counts over the tokens would.
        _, indices, _ = self._next_gate(x)
        votes = torch.bincount(indices.flatten(), minlength=self._next_gate.n_experts)
        ranked = votes.argsort(descending=True, stable=True)[:int((votes > 0).sum())]
        self.cache.prefetch(self.next_layer, ranked.tolist(), keep=used)


def moe_modules(model) -> dict[int, MoE]:
    """{checkpoint layer id: MoE} for the main model and its MTP blocks (MTP k is layer L + k)."""
    L = model.config.num_hidden_layers
    found = {i: layer.mlp for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)}
    found.update({L + k: m.block.mlp for k, m in enumerate(model.mtp) if isinstance(m.block.mlp, MoE)})
    return found


def expert_bytes(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of one routed expert (gate, up and down matrices) in `dtype` (default: the model's)."""
    experts = next(iter(moe_modules(model).values())).experts
    w = experts.gate_up_proj
    itemsize = (dtype or w.dtype).itemsize
    return (w[0].numel() + experts.down_proj[0].numel()) * itemsize


def apply_expert_cache(model, budget: int | None = None, policy: str = "lru", checkpoint: str | Path | None = None,
                       memory_bytes: int | None = None, prefetch: bool = False) -> ExpertCache:
    """Replace every routed-expert module by a cached one sharing one `ExpertCache`: `budget` experts per
    MoE layer, or as many as `memory_bytes` holds over the whole model. checkpoint: a HF-layout folder the
    experts are read from on demand (required when the model was loaded without its routed experts, see
    `load_budgeted`); None keeps the model's expert weights in CPU RAM. The model's own copies are
    released. prefetch: predict and read the next layer's experts in the background."""
    if (budget is None) == (memory_bytes is None):
        raise ConfigError("give exactly one of an expert budget (experts per layer) and an expert memory (bytes)")
    moes = moe_modules(model)
    if not moes:
        raise ConfigError("this model has no MoE layers to cache")
    sample = next(iter(moes.values())).experts
    if not isinstance(sample, GroupedExperts):
        raise ConfigError("the expert cache is already applied")
    dtype = sample.gate_up_proj.dtype
    device = next(p.device for p in model.parameters() if not p.is_meta)
    if memory_bytes is not None:
        one = expert_bytes(model)
        budget, scope = int(memory_bytes // one), "model"
        if budget < 1:
            raise ConfigError(f"expert memory of {memory_bytes / 1e9:g} GB holds no expert (one is {one / 1e6:.1f} MB)")
    else:
        scope = "layer"
    if checkpoint is not None:
        store = SafetensorsExpertStore(checkpoint)
    elif sample.gate_up_proj.is_meta:
        raise ConfigError("the model was loaded without its routed experts: give the checkpoint to read them from")
    else:
        store = MemoryExpertStore({i: m.experts for i, m in moes.items()}, pin=device.type == "cuda")
    cache = ExpertCache(store, budget, policy, device=device, dtype=dtype, scope=scope, prefetch=prefetch)
    F, D = model.config.moe_intermediate_size, model.config.hidden_size
    cache.slot_shapes = (torch.Size([2 * F, D]), torch.Size([D, F]))  # (w_in, w_out), as GroupedExperts holds them
    main = sorted(i for i in moes if i < model.config.num_hidden_layers)
    following = {a: b for a, b in zip(main, main[1:])}
    for layer, moe in moes.items():
        nxt = following.get(layer)
        moe.experts = CachedExperts(cache, layer, moe.gate.n_experts, moe.top_k,
                                    next_gate=(nxt, moes[nxt].gate) if nxt is not None else None)
    return cache


def load_budgeted(folder: str | Path, budget: int | None = None, memory_bytes: int | None = None,
                  policy: str = "lru", prefetch: bool = True, device="cpu", dtype: torch.dtype | None = None):
    """(model, cache): a Hugging Face-layout folder loaded without reading its routed experts, which the
    cache then reads on demand: the whole model is never resident."""
    from ..hf import from_pretrained

    model = from_pretrained(folder, dtype=dtype, device=device, routed_experts=False)
    cache = apply_expert_cache(model, budget, policy, checkpoint=folder, memory_bytes=memory_bytes, prefetch=prefetch)
    return model, cache
