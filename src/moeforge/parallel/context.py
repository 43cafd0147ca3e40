"""Context (sequence) parallelism for MLA, applied to the plain model from outside.

Each sequence of T tokens is cut into 2C chunks; rank r of the C-rank context group keeps chunks r and
2C-1-r, so every rank holds one early and one late chunk and the causal attention work is even. What
ranks exchange is MLA's compressed KV: per token the normed latent c_kv [kv_lora_rank] and the roped
shared key [rope_dim] (V3: 512 + 64 numbers), all-gathered over the group. Each rank rebuilds per-head
keys and values from the gathered latents with its own kv_b_proj and attends with its local queries,
masked by the real positions. A ring of full per-head K and V would move H x (N + R + V) numbers per
token instead (V3: 40960); see docs/long-context.md.

Backward: the all-gather's gradient is reduce-scattered back to each latent's owner (autograd), and the
parameter gradients are averaged over the group like data parallelism. For that, each rank's loss is
C x (its tokens' summed loss) / (the whole sequences' token count): the mean over the group of these is
the full-sequence loss, whatever the split of ignored labels. The sequence-wise balance loss sums its
per-sequence statistics over the group (`ContextParallelRouterProbe`), and the expert counts are summed
over the group by the caller, as over data-parallel ranks.

Targets are shifted on the full sequence (unshifted `labels` as the model shifts them, or `shift_labels`)
and split with the same indices as the tokens, so no shift crosses a chunk boundary; MTP depth k's input
tokens and targets are shifted on the full sequence too, before splitting.

    cp = apply_context_parallel(model, group)   # then model(input_ids, shift_labels=...) takes full sequences
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..balance.losses import RouterProbe
from ..errors import ConfigError
from ..model.mla import MLA
from ..model.moe import MoE
from ..model.rope import rope_halves
from ..model.transformer import IGNORE_INDEX, ModelOutput, shifted_targets


def check_seq_len(seq_len: int, cp: int) -> None:
    if seq_len % (2 * cp):
        raise ConfigError(f"sequence length {seq_len} must be a multiple of 2 x cp = {2 * cp}: context "
                          "parallelism cuts each sequence into 2 x cp equal chunks (padding is not supported)")


def load_balanced_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions rank `rank` holds: chunk `rank` and chunk 2cp-1-rank of 2cp equal chunks."""
    check_seq_len(seq_len, cp)
    chunk = seq_len // (2 * cp)
    front = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    back = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat((front, back))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 (rank order); backward reduce-scatters the gradient to each part's owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: "ContextParallel") -> torch.Tensor:
        ctx.cp = cp
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x, group=cp.group)
        cp.gathered_bytes += x.numel() * x.element_size() * (cp.size - 1)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = ctx.cp
        chunks = [c.contiguous() for c in grad.chunk(cp.size, dim=1)]
        if dist.get_backend(cp.group) == "gloo":  # gloo has no reduce-scatter: all-reduce, keep our part
            full = grad.contiguous()
            dist.all_reduce(full, group=cp.group)
            return full.chunk(cp.size, dim=1)[cp.rank].contiguous(), None
        out = torch.empty_like(chunks[cp.rank])
        dist.reduce_scatter(out, chunks, group=cp.group)
        return out, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradient: each rank's statistic feeds every
    rank's copy of the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ContextParallel:
    """The context group of this rank and what its forward passes exchanged."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.gathered_bytes = 0  # bytes this rank received by compressed-KV all-gathers (forward)
        self.active = False  # inside a context-parallel forward (set by the model's replaced forward)

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        return load_balanced_positions(seq_len, self.size, self.rank, device)

    def key_positions(self, seq_len: int, device=None) -> torch.Tensor:
        """Positions of the gathered sequence, in rank order."""
        return torch.cat([load_balanced_positions(seq_len, self.size, r, device) for r in range(self.size)])

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of full sequences t [B, T, ...]."""
        return t[:, self.positions(t.shape[1], t.device)]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(x, self)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _SumOverGroup.apply(x, self.group)

    def pop_gathered_bytes(self) -> int:
        sent, self.gathered_bytes = self.gathered_bytes, 0
        return sent

    @contextmanager
    def running(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def loss_share(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """C x this rank's summed cross-entropy / the token count of the whole sequences."""
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        count = (labels != IGNORE_INDEX).sum().to(losses.dtype)
        dist.all_reduce(count, group=self.group)
        return self.size * losses / count  # 0/0 = nan where no label counts, as the plain model's mean


def context_parallel_attention(mla: MLA, cp: ContextParallel, plain_forward, x: torch.Tensor,
                               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA over this rank's tokens x [B, Tl, D] (cos/sin at their real positions) against the whole
    sequences' keys and values, rebuilt from the all-gathered compressed KV."""
    if not cp.active:
        return plain_forward(x, cos, sin)
    B, Tl, _ = x.shape
    H, N, R, V, L = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.v_dim, mla.kv_lora_rank
    interleave = mla.config.rope_interleave
    q = mla.project_q(x).view(B, Tl, H, N + R).transpose(1, 2)  # [B, H, Tl, N+R]
    q_nope, q_rope = q.split([N, R], dim=-1)
    q = torch.cat((q_nope, *rope_halves(q_rope, cos, sin, interleave, seq_dim=2)), dim=-1)

    latent, k_rope = mla.kv_a_proj_with_mqa(x).split([L, R], dim=-1)
    k_rope = torch.cat(rope_halves(k_rope, cos, sin, interleave, seq_dim=1), dim=-1)  # roped at local positions
    compressed = cp.gather(torch.cat((mla.kv_a_layernorm(latent), k_rope), dim=-1))  # [B, T, L+R]
    latent, k_rope = compressed.split([L, R], dim=-1)
    T = compressed.shape[1]
    kv = mla.kv_b_proj(latent).view(B, T, H, N + V).transpose(1, 2)
    k_nope, v = kv.split([N, V], dim=-1)
    k = torch.cat((k_nope, k_rope[:, None].expand(B, H, T, R)), dim=-1)
    # Softmax does not care about key order: mask by real positions instead of reordering the gather.
    mask = cp.key_positions(T, x.device)[None, :] <= cp.positions(T, x.device)[:, None]  # [Tl, T]
    pad = q.shape[-1] - V  # equal qk and v head dims let SDPA take a fused kernel (as MLA.attention_core)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask,
                                         scale=mla.softmax_scale)[..., :V]
    return mla.o_proj(out.transpose(1, 2).reshape(B, Tl, H * V))


def context_parallel_forward(model, cp: ContextParallel, plain_forward, input_ids: torch.Tensor,
                             labels: torch.Tensor | None = None,
                             shift_labels: torch.Tensor | None = None) -> ModelOutput:
    """The model's forward over full sequences [B, T] with this rank's share of the tokens; targets as the
    model takes them (unshifted `labels` or `shift_labels`), shifted on the full sequence before the split.
    Losses are this rank's shares (their mean over the group is the plain model's loss). Without targets
    (generation) the plain forward runs on the whole input."""
    targets, known = shifted_targets(input_ids, labels, shift_labels)
    if targets is None:
        return plain_forward(input_ids)
    B, T = input_ids.shape
    if T > model.config.max_position_embeddings:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings {model.config.max_position_embeddings}")
    check_seq_len(T, cp.size)
    positions = cp.positions(T, input_ids.device)
    cos, sin = model.rotary(positions)
    with cp.running():
        h = model.embed_tokens(cp.split(input_ids))
        for layer in model.layers:
            h = layer(h, cos, sin)
        logits = model.lm_head(model.norm(h))
        lm_loss = cp.loss_share(logits, cp.split(targets))
        if not model.mtp:
            return ModelOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss)
        # Depth k at position i < known - k reads token i+k and is scored on targets[i+k] (as `mtp_losses`),
        # both shifted on the full sequence; later positions get no target (and, causal, never reach earlier
        # ones), and their routing is not counted.
        mtp = []
        for k, module in enumerate(model.mtp, start=1):
            n = known - k
            if n <= 0:
                break
            nxt = F.pad(input_ids[:, k:], (0, k), value=0)
            target = F.pad(targets[:, k:], (0, k), value=IGNORE_INDEX)
            target[:, n:] = IGNORE_INDEX
            with uncounted_tail(module, positions >= n):
                h = module(h, model.embed_tokens(cp.split(nxt)), cos, sin)
            mtp.append(cp.loss_share(model.lm_head(module.norm(h)), cp.split(target)))
    mtp_loss = torch.stack(mtp).mean() if mtp else lm_loss.new_zeros(())
    loss = lm_loss + model.config.mtp_loss_weight * mtp_loss
    return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss)


@contextmanager
def uncounted_tail(mtp_module, tail: torch.Tensor):
    """Take the tokens at `tail` (local positions past the last target of an MTP depth, which one process
    never routes: its depth k runs on T-k tokens) out of the MTP MoE's expert counts."""
    moe = mtp_module.block.mlp
    if not isinstance(moe, MoE) or not bool(tail.any()):
        yield
        return
    routed = []
    handle = moe.gate.register_forward_hook(lambda module, inputs, output: routed.append(output[1]))
    try:
        yield
    finally:
        handle.remove()
    for indices in routed:  # [B * Tl, K] expert ids, tokens in [B, Tl] order
        rows = tail.repeat(indices.shape[0] // tail.numel())
        moe.tokens_per_expert -= torch.bincount(indices[rows].flatten(), minlength=moe.tokens_per_expert.numel()
                                                ).to(moe.tokens_per_expert.dtype)


def apply_context_parallel(model, group) -> ContextParallel:
    """Make `model(input_ids, labels)` context-parallel over `group` (every rank passes the same full
    sequences); every MLA (main layers and MTP blocks) attends over the gathered compressed KV."""
    cp = ContextParallel(group)
    for module in model.modules():
        if isinstance(module, MLA):
            module.forward = partial(context_parallel_attention, module, cp, module.forward)
    model.forward = partial(context_parallel_forward, model, cp, model.forward)
    model.context_parallel = cp
    return cp


class ContextParallelRouterProbe(RouterProbe):
    """The balance losses with each sequence's statistics (token choices f, mean scores P) summed over the
    context group: every rank computes the whole sequences' loss (their mean over the group is that loss)."""

    def __init__(self, model, cp: ContextParallel, seq_alpha: float = 0.0, batch_alpha: float = 0.0,
                 seq_len: int | None = None):
        super().__init__(model, seq_alpha, batch_alpha, seq_len)
        self.cp = cp

    def group_loss(self, scores: torch.Tensor, indices: torch.Tensor, tokens_per_group: int | None) -> torch.Tensor:
        """A sequence's tokens are spread over the CP ranks: this rank holds 1/C of each group."""
        local = tokens_per_group // self.cp.size if tokens_per_group else scores.shape[0]
        return self._loss(scores, indices, local)

    def _loss(self, scores: torch.Tensor, indices: torch.Tensor, local_group: int) -> torch.Tensor:
        """sum_i f_i P_i per group of tokens (a sequence, or the batch), the group's tokens spread over ranks."""
        N, E = scores.shape
        K, groups = indices.shape[1], N // local_group
        probs = scores / scores.sum(dim=-1, keepdim=True)
        P = self.cp.sum(probs.view(groups, local_group, E).sum(dim=1)) / (local_group * self.cp.size)
        chosen = torch.zeros(N, E, device=scores.device).scatter_(1, indices, 1.0)
        counts = chosen.view(groups, local_group, E).sum(dim=1)
        dist.all_reduce(counts, group=self.cp.group)
        f = counts * (E / (K * local_group * self.cp.size))
        return (f * P).sum(dim=-1).mean()
