"""Balance losses and a diagnostic routing mode, attached to the routers with forward hooks.

The model never computes these: `RouterProbe` listens to each main-model router's output
(weights [N, K], expert ids [N, K], scores [N, E]) and turns it into a loss for the trainer to add.

* Sequence-wise balance loss (DeepSeek-V3 eq. 17-20): per sequence of T tokens,
  f_i = E / (K T) * #tokens choosing i, P_i = mean over tokens of the normalised score s_i / sum_j s_j,
  L = alpha * sum_i f_i P_i, averaged over sequences and summed over layers.
* Batch-level auxiliary loss (GShard/Switch style): the same formula with the whole batch as one
  "sequence"; kept for comparison.
* Balanced routing (`install_balanced_routing`): every expert receives exactly N K / E tokens, to
  measure best-case throughput and memory of a layout, separating imbalance from other slowness.
* Hot routing (`install_hot_routing`, `--routing hot:F`): expert 0 of every MoE layer (on EP rank 0)
  receives F x the mean load, the other experts share the rest evenly, to measure a layout under skew
  (the straggler the hot expert's rank becomes). 1 < F <= E / K: a token picks an expert at most once.
Both override the router's choice (group limits included); the weights are the router's scores of the
chosen experts, normalised as the router would.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..memory.recompute import recomputing
from ..model import Router


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """sum_i f_i P_i averaged over groups of `group_size` consecutive tokens.

    scores [N, E] (sigmoid or softmax), indices [N, K]; N must be a multiple of group_size.
    """
    N, E = scores.shape
    K = indices.shape[1]
    groups = N // group_size
    probs = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}
    P = probs.view(groups, group_size, E).mean(dim=1)  # [G, E]
    chosen = torch.zeros(N, E, device=scores.device).scatter_(1, indices, 1.0)
    f = chosen.view(groups, group_size, E).sum(dim=1) * (E / (K * group_size))  # [G, E]
    return (f * P).sum(dim=-1).mean()


class RouterProbe:
    """Collects routing outputs of the main model's routers during a forward and returns the loss.

    `seq_alpha` weights the sequence-wise loss, `batch_alpha` the batch-level one; `seq_len` is the
    length of the sequences being routed (the trainer sets it).
    """

    def __init__(self, model, seq_alpha: float = 0.0, batch_alpha: float = 0.0, seq_len: int | None = None):
        self.seq_alpha, self.batch_alpha, self.seq_len = seq_alpha, batch_alpha, seq_len
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = [moe.gate.register_forward_hook(self._record) for _, moe in model.moe_layers()]

    @property
    def active(self) -> bool:
        return self.seq_alpha > 0 or self.batch_alpha > 0

    def _record(self, module, inputs, output) -> None:
        if self.active and torch.is_grad_enabled() and not recomputing():  # a checkpoint recompute: seen already
            _, indices, scores = output
            self._outputs.append((scores, indices))

    def pop_loss(self) -> torch.Tensor | None:
        """The balance loss of the routing seen since the last call (None if nothing was recorded)."""
        outputs, self._outputs = self._outputs, []
        if not outputs:
            return None
        total = 0.0
        for scores, indices in outputs:
            if self.seq_alpha > 0:
                total = total + self.seq_alpha * self.group_loss(scores, indices, self.seq_len)
            if self.batch_alpha > 0:
                total = total + self.batch_alpha * self.group_loss(scores, indices, None)
        return total

    def group_loss(self, scores: torch.Tensor, indices: torch.Tensor, tokens_per_group: int | None) -> torch.Tensor:
        """The balance loss over groups of `tokens_per_group` tokens (None: the whole batch is one group); a
        wrapper that splits sequences over ranks overrides this (parallel.context)."""
        return balance_loss(scores, indices, tokens_per_group or scores.shape[0])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def balanced_assignment(n_tokens: int, n_experts: int, top_k: int, device=None) -> torch.Tensor:
    """Expert ids [N, K] with token n's k-th expert = (n K + k) mod E: every expert gets N K / E tokens
    (exactly, when E divides N K) and a token's K experts are distinct."""
    flat = torch.arange(n_tokens * top_k, device=device) % n_experts
    return flat.view(n_tokens, top_k)


def hot_assignment(n_tokens: int, n_experts: int, top_k: int, factor: float, device=None) -> torch.Tensor:
    """Expert ids [N, K] where expert 0 gets round(F N K / E) tokens (F x the mean; the first ones) and
    experts 1..E-1 share the other slots in turn (so a token's K experts are distinct)."""
    hot = min(n_tokens, round(factor * n_tokens * top_k / n_experts))
    has_hot = torch.arange(n_tokens, device=device) < hot
    slot = torch.arange(top_k, device=device)
    takes_hot = has_hot[:, None] & (slot[None, :] == 0)  # [N, K]: slot 0 of the first `hot` tokens
    rest = torch.cumsum((~takes_hot).flatten().long(), 0).view(n_tokens, top_k) - 1  # running count of cold slots
    return torch.where(takes_hot, 0, 1 + rest % (n_experts - 1))


def parse_routing(routing: str) -> tuple[str, float | None]:
    """'learned' | 'balanced' | 'hot:F' -> (mode, F); a one-line ConfigError otherwise."""
    if routing in ("learned", "balanced"):
        return routing, None
    mode, sep, value = routing.partition(":")
    if mode == "hot" and sep:
        try:
            return "hot", float(value)
        except ValueError:
            pass
    raise ConfigError(f"routing must be learned, balanced or hot:F (F x the mean load on one expert), got {routing!r}")


def check_hot_factor(factor: float, n_experts: int, top_k: int) -> None:
    """1 < F <= E / K and F < E: a token picks an expert at most once, so one expert gets at most every token."""
    top = n_experts / top_k
    if not (1 < factor <= top and factor < n_experts):
        raise ConfigError(f"routing hot:{factor:g} needs 1 < F <= n_routed_experts / num_experts_per_tok = "
                          f"{n_experts}/{top_k} = {top:g} (and F < {n_experts}): a token picks an expert at most once")


def _override_choice(router: Router, scores: torch.Tensor, indices: torch.Tensor):
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, indices, scores


def _balanced_hook(router: Router, inputs, output):
    _, _, scores = output
    indices = balanced_assignment(scores.shape[0], router.n_experts, router.top_k, scores.device)
    return _override_choice(router, scores, indices)


def install_balanced_routing(model) -> list:
    """Override every router's choice with the perfectly even assignment; returns removable handles."""
    return [m.register_forward_hook(_balanced_hook) for m in model.modules() if isinstance(m, Router)]


def install_hot_routing(model, factor: float) -> list:
    """Override every router's choice with `hot_assignment` (expert 0 at F x the mean); removable handles."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        check_hot_factor(factor, router.n_experts, router.top_k)

    def hook(router: Router, inputs, output):
        _, _, scores = output
        indices = hot_assignment(scores.shape[0], router.n_experts, router.top_k, factor, scores.device)
        return _override_choice(router, scores, indices)

    return [router.register_forward_hook(hook) for router in routers]


def install_routing(model, routing: str) -> list:
    """`--routing`: learned (nothing to do), balanced or hot:F, installed on the routers from outside."""
    mode, factor = parse_routing(routing)
    if mode == "balanced":
        return install_balanced_routing(model)
    if mode == "hot":
        return install_hot_routing(model, factor)
    return []
