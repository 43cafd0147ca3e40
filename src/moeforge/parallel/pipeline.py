"""Pipeline parallelism with `torch.distributed.pipelining`: the plain Transformer cut into stages from
outside (torchtitan's manual split), run by the engine's schedules (GPipe, 1F1B, interleaved 1F1B,
DualPipeV). Shapes: B batch, T tokens, D hidden, V vocab.

Stage s holds a contiguous range of blocks; stage 0 also embeds the tokens, the last stage also holds the
final norm, the output head and the multi-token-prediction (MTP) modules, and computes the loss
(next-token + mtp_loss_weight x MTP, exactly as `Transformer.forward`).

* MTP needs the token embedding on the last stage. Every rank builds the whole model from the same seed,
  so the last stage keeps its own copy of `embed_tokens`; after each backward the copies' gradients are
  summed over the pipeline group (Megatron does the same for tied embeddings). With a V-shaped placement
  (DualPipeV) the first and last stage live on one rank and simply share the module. Tied input/output
  embeddings are handled the same way.
* Balance losses (RouterProbe) are per stage: a stage's routers' loss is attached to its output
  activation by an identity op whose backward feeds d(aux)=1 into the graph (Megatron's
  MoEAuxLossAutoScaler), so no stage needs another's routing. The sequence-wise loss is exact under
  micro-batching (micro-batches hold whole sequences); the batch-level one becomes per micro-batch.
* The balancing bias update needs nothing new: each stage counts its own layers' tokens over all
  micro-batches and `BiasBalancer.update(stage_module, step)` moves its own biases.

The engine scales gradients by 1/n_microbatches (mean of the micro-batch losses = the global loss when
micro-batches are equal and no label is ignored).

Pipeline x data parallelism (`dp_group`): every pipeline rank is replicated over a data-parallel group
(ranks holding the same stages and seeing different rows of the batch). After the schedule, each
stage's gradients are averaged over that group with one all-reduce of all gradients flattened together
(DDP-like; parameters, gradients and optimizer state stay replicated, no ZeRO sharding), so every
replica clips and steps identically. Simpler than FSDP2 stage modules here: the last stage runs its
head and MTP outside the stage module's forward, and the shared-embedding gradient sum and the
cross-stage norm work on plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)

from ..config import PP_SCHEDULES
from ..errors import ConfigError
from ..model.moe import MoE
from .expert import ExpertParallelExperts
from .grads import clip_grad_norm
from .tensor import local_tensor as _local
from ..model.transformer import Transformer, cross_entropy, mtp_losses

# name -> (schedule class, stages per rank, stage placement: "loop" = rank r holds r, r+pp, ...;
# "v" = rank r holds r and 2pp-1-r, so the first and last stage share rank 0)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, 1, "loop"),
    "1f1b": (Schedule1F1B, 1, "loop"),
    "interleaved-1f1b": (ScheduleInterleaved1F1B, 2, "loop"),
    "dualpipev": (ScheduleDualPipeV, 2, "v"),
}
assert {k: v[1] for k, v in SCHEDULES.items()} == PP_SCHEDULES  # what the config validates against


class StageModule(nn.Module):
    """Blocks [start, end) of a Transformer, plus the embedding (first stage) or the head (last stage).

    forward: first stage input_ids [B, T] -> h [B, T, D]; other stages h -> h. The last stage returns the
    final hidden state before the norm (MTP starts from it); `loss(h, input_ids, shift_labels)` turns it
    into the loss.
    Parameter names are those of the full model (layers keep their global index).
    """

    def __init__(self, model: Transformer, start: int, end: int, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self.embed_tokens = model.embed_tokens if is_first else None
        self.lm_head = model.lm_head if is_last else None
        if is_last and not is_first and reads_embedding_at_end(model):
            # The last stage's own copy (summed gradients, see Pipeline): a parameter shared by two stages
            # of one rank would be scaled twice by the engine.
            self.embed_tokens = copy.deepcopy(model.embed_tokens)
            if model.config.tie_word_embeddings:
                self.lm_head = copy.deepcopy(model.lm_head)
                self.lm_head.weight = self.embed_tokens.weight
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, end)})
        self.norm = model.norm if is_last else None
        self.mtp = model.mtp if is_last else nn.ModuleList()
        self.rotary = model.rotary
        self.aux_loss = None  # optional callable -> loss of this stage's routers (see attach_aux_loss)
        self.aux_values: list[torch.Tensor] = []  # detached, one per micro-batch, for the logged loss
        self.loss_parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # detached (lm, mtp) per micro-batch
        self.stage_id = 0  # the global stage index (build_pipeline sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.is_first else x
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.aux_loss is not None:
            aux = self.aux_loss()
            if aux is not None:
                self.aux_values.append(aux.detach())
                h = attach_aux_loss(h, aux)
        return h

    def loss(self, h: torch.Tensor, input_ids: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """Next-token loss + mtp_loss_weight x mean MTP loss, as `Transformer.forward(input_ids,
        shift_labels=...)` computes them (last stage; MTP embeds tokens of input_ids)."""
        lm_loss = self.lm_loss(h, shift_labels)
        if not self.mtp:
            self.loss_parts.append((lm_loss.detach(), None))
            return lm_loss
        T = h.shape[1]
        cos, sin = self.rotary(torch.arange(T, device=h.device))
        mtp_loss = mtp_losses(self, h, input_ids, shift_labels, T, cos, sin)
        self.loss_parts.append((lm_loss.detach(), mtp_loss.detach()))
        return lm_loss + self.config.mtp_loss_weight * mtp_loss

    def lm_loss(self, h: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """The next-token loss alone (what evaluation reports), last stage."""
        return cross_entropy(self.lm_head(self.norm(h)), shift_labels)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer id, MoE) of this stage's main-model blocks (what RouterProbe listens to)."""
        return [(int(i), layer.mlp) for i, layer in self.layers.items() if isinstance(layer.mlp, MoE)]


def reads_embedding_at_end(model: Transformer) -> bool:
    """MTP embeds the next tokens, and a tied output head is the embedding: both need it on the last stage."""
    return bool(model.mtp) or model.config.tie_word_embeddings


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on h; backward also sends gradient 1 into `aux`, so aux joins the loss of this micro-batch."""

    @staticmethod
    def forward(ctx, h, aux):
        ctx.save_for_backward(aux)
        return h.clone()  # not a view: the engine detaches stage outputs in place (split backward)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


def attach_aux_loss(h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    return _AttachAuxLoss.apply(h, aux)


def layer_ranges(num_layers: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """Blocks per stage: given, or as even as possible with the extra blocks on the *early* stages (the
    last one also carries the head and MTP)."""
    if layers_per_stage is None:
        base, extra = divmod(num_layers, n_stages)
        layers_per_stage = [base + (s < extra) for s in range(n_stages)]
    if len(layers_per_stage) != n_stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 0:
        raise ConfigError(f"layers_per_stage {layers_per_stage} must be {n_stages} non-negative counts "
                          f"summing to num_hidden_layers={num_layers}")
    starts = [sum(layers_per_stage[:s]) for s in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, layers_per_stage)]


def stage_ids(pp_rank: int, pp: int, per_rank: int, style: str) -> list[int]:
    """Which global stages a pipeline rank runs (in execution order of its first micro-batch)."""
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


@dataclass
class Pipeline:
    """This rank's share of a pipelined model: its stage modules (e.g. for the optimizer) and a schedule.

    `step(input_ids, shift_labels)` (targets already shifted, as `Transformer.forward` takes them)
    runs forward and backward of the whole batch over all micro-batches, then
    sums the shared-embedding gradients; it returns the global loss (mean over micro-batches) on every
    rank of the pipeline group. Gradients are left in the stage modules for the optimizer.
    """

    modules: list[StageModule]
    schedule: object
    group: dist.ProcessGroup
    shares_embedding: bool  # the first and last stage each hold a copy of embed_tokens
    ends_on_one_rank: bool  # ... and those two stages run on the same rank (DualPipeV's V)
    n_microbatches: int
    batch_shape: tuple[int, int]
    dp_group: dist.ProcessGroup | None = None  # replicas of this pipeline rank (None or 1 rank: no dp)
    expert_dp_group: dist.ProcessGroup | None = None  # ... holding the same EP experts (edp; None: no EP)
    embedding_shard_shape: tuple[int, ...] = ()  # this rank's share of embed_tokens.weight (TP: vocab rows)
    _stages: list[PipelineStage] = field(default_factory=list)
    stage_ranks: list[int] = field(default_factory=list)  # pipeline rank of each global stage
    hidden_dtype: torch.dtype = torch.float32  # activations passed between stages
    # The last step's logged values (loss, lm_loss, mtp_loss, aux_loss), the same on every pipeline rank.
    metrics: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:  # collectives need tensors on it (NCCL: the GPU)
        return self.modules[0].rotary.inv_freq.device

    @property
    def has_first(self) -> bool:
        return any(m.is_first for m in self.modules)

    @property
    def has_last(self) -> bool:
        return any(m.is_last for m in self.modules)

    def parameters(self):
        seen = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def step(self, input_ids: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        if tuple(input_ids.shape) != self.batch_shape:
            raise ConfigError(f"pipeline was built for batches of shape {self.batch_shape}, got "
                              f"{tuple(input_ids.shape)}")
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        # The last stage's MTP embeds tokens of input_ids: the schedule's target carries both, [B, 2, T].
        target = torch.stack((input_ids, shift_labels), dim=1) if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None,
                           return_outputs=False)
        self._make_grads_contiguous()
        self._sum_shared_embedding_grads()
        self._average_grads_over_dp()
        # Logged loss = last stage's mean (next-token + MTP) + every stage's balance loss per micro-batch;
        # values = [loss, lm_loss, mtp_loss, aux_loss], summed over the pipeline group in one all-reduce.
        values = torch.zeros(4, device=self.device)
        if self.has_last:
            values[0] = torch.stack(losses).mean().detach().float()
        for m in self.modules:
            if m.loss_parts:
                values[1] = torch.stack([lm for lm, _ in m.loss_parts]).float().mean()
                mtp = [x for _, x in m.loss_parts if x is not None]
                if mtp:
                    values[2] = torch.stack(mtp).float().mean()
            if m.aux_values:
                aux = torch.stack(m.aux_values).sum().float() / self.n_microbatches
                values[0] += aux
                values[3] += aux
            m.aux_values.clear()
            m.loss_parts.clear()
        dist.all_reduce(values, group=self.group)
        self.metrics = dict(zip(("loss", "lm_loss", "mtp_loss", "aux_loss"), values.tolist()))
        return values[0]

    @torch.no_grad()
    def forward_loss(self, input_ids: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """Forward only, the whole batch at once through the stages in order (activations sent to the next
        stage's rank): the next-token loss on every rank of the pipeline group. For evaluation."""
        me, n = dist.get_rank(self.group), len(self.stage_ranks)
        here = {m.stage_id: m for m in self.modules}
        loss = torch.zeros((), device=self.device)
        h = None
        for s in range(n):
            owner = self.stage_ranks[s]
            if owner == me:
                h = here[s](input_ids if s == 0 else h)
                if s == n - 1:
                    loss = here[s].lm_loss(h, shift_labels).float()
            nxt = self.stage_ranks[s + 1] if s + 1 < n else owner
            if nxt != owner and me == owner:
                dist.send(h.to(self.hidden_dtype).contiguous(), dst=dist.get_global_rank(self.group, nxt),
                          group=self.group)
            elif nxt != owner and me == nxt:
                h = torch.empty(*input_ids.shape, self.modules[0].config.hidden_size, dtype=self.hidden_dtype,
                                device=self.device)
                dist.recv(h, src=dist.get_global_rank(self.group, owner), group=self.group)
        dist.all_reduce(loss, group=self.group)
        return loss

    def _make_grads_contiguous(self) -> None:
        """The split backward (DualPipeV, zero-bubble) stores weight gradients with the strides they were
        computed in (e.g. transposed), and torch 2.13's fused CPU AdamW then updates the wrong elements
        (measured: 2*lr off). Give every gradient its parameter's layout, as autograd's accumulation does."""
        for p in self.parameters():
            if p.grad is None:
                continue
            g, lp = _local(p.grad), _local(p)
            if g.stride() != lp.stride():
                g = g.contiguous() if lp.is_contiguous() else g.clone().as_strided_(lp.shape, lp.stride())
                p.grad = g if not isinstance(p.grad, DTensor) else DTensor.from_local(
                    g, p.grad.device_mesh, p.grad.placements, run_check=False, shape=p.grad.shape,
                    stride=p.grad.stride())

    def _embedding_copies(self) -> list[torch.Tensor]:
        """This rank's copies of the shared embedding weight: first stage's, then last stage's."""
        firsts = [m.embed_tokens.weight for m in self.modules if m.is_first]
        lasts = [m.embed_tokens.weight for m in self.modules if m.is_last and not m.is_first]
        return firsts + lasts

    def _sum_shared_embedding_grads(self) -> None:
        """The first and last stage each hold the embedding: each copy's gradient becomes the sum of both,
        so the copies stay equal. Across ranks one all-reduce over the pipeline group (middle ranks add
        zeros: simple, one [V, D] all-reduce per step); on one rank an add."""
        if not self.shares_embedding:
            return
        copies = self._embedding_copies()
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in copies]
        if self.ends_on_one_rank:
            if len(grads) == 2:
                total = grads[0] + grads[1]
                for w in copies:
                    w.grad = total.clone()
            return
        # Across ranks on the local shards (under TP each rank holds its rows of the vocabulary).
        total = grads[0] if grads else None
        local = _local(total) if grads else torch.zeros(self.embedding_shard_shape, device=self.device)
        dist.all_reduce(local, group=self.group)
        for w in copies:
            w.grad = total

    @torch.no_grad()
    def _average_grads_over_dp(self) -> None:
        """Mean of each gradient over the data-parallel replicas (DDP-like): one all-reduce of all gradients
        flattened per group of replicas. Dense weights (plain, or TP shards: each rank its local shard) are
        summed over dp; EP expert shards over the ranks holding the same experts (edp), since every dp rank's
        tokens already reached them through the all-to-all; both are divided by dp (the mean of the dp ranks'
        losses). One flag per parameter goes along: a gradient missing on every replica stays None, as in one
        process; missing on some replicas only, it counts as zeros there."""
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return
        params = [p for p in self.parameters() if p.requires_grad]
        experts = {id(p) for p in self.expert_parameters()}
        dp = dist.get_world_size(self.dp_group)
        for group, members in ((self.dp_group, [p for p in params if id(p) not in experts]),
                               (self.expert_dp_group, [p for p in params if id(p) in experts])):
            if members:
                _mean_grads(members, group, dp, self.device)

    def expert_parameters(self) -> list[torch.Tensor]:
        """The EP-sharded expert weights of this rank's stages (each rank holds other experts)."""
        return [p for m in self.modules for e in m.modules() if isinstance(e, ExpertParallelExperts)
                for p in e.parameters()]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over the whole model (all stages; the shared embedding counted once)."""
        second_copy = [self._embedding_copies()[-1]] if self.shares_embedding and self.has_last else []
        return clip_grad_norm(list(self.parameters()), max_norm, group=self.group, uncounted=second_copy)

    def rank_module(self) -> "PipelineRank":
        """This rank's stages as one module under the full model's parameter names (for the optimizer,
        checkpoints and token counts)."""
        return PipelineRank(self.modules)


@torch.no_grad()
def _mean_grads(params: list[torch.Tensor], group: dist.ProcessGroup | None, divide_by: int, device) -> None:
    """Sum every gradient's local shard over `group` (one flattened all-reduce, plus a has-gradient flag per
    parameter), divide by `divide_by`, in place. A group of None or one rank only divides."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    local = [_local(g) for g in grads]
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([g.detach().reshape(-1).float() for g in local] + [flags])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat[:-len(params)] /= divide_by
    offset = 0
    for p, g, lg, flag in zip(params, grads, local, flat[-len(params):].tolist()):
        n = lg.numel()
        if flag > 0:
            lg.copy_(flat[offset:offset + n].view(lg.shape))  # in place: keeps the gradient's strides
            p.grad = g
        offset += n


class PipelineRank(nn.Module):
    """The stage modules of one pipeline rank as one module whose parameter and buffer names are the full
    Transformer's (`layers.<global index>...`, `embed_tokens`, `norm`, `lm_head`, `mtp`): a checkpoint of
    all ranks' PipelineRanks is a checkpoint of the model. The last stage's embedding copy is
    `embed_tokens` when the rank does not also run the first stage, else `LAST_STAGE_COPY` (DualPipeV's
    rank 0). Not callable: the pipeline's schedule runs the stages."""

    LAST_STAGE_COPY = "last_stage_embed_tokens"

    def __init__(self, modules: list[StageModule]):
        super().__init__()
        first = next((m for m in modules if m.is_first), None)
        last = next((m for m in modules if m.is_last), None)
        self.config = modules[0].config
        self.embed_tokens = first.embed_tokens if first is not None else (last.embed_tokens if last else None)
        if first is not None and last is not None and last.embed_tokens is not None \
                and last.embed_tokens is not first.embed_tokens:
            setattr(self, self.LAST_STAGE_COPY, last.embed_tokens)
        layers = {k: v for m in modules for k, v in m.layers.items()}
        self.layers = nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
        self.norm = last.norm if last is not None else None
        self.lm_head = last.lm_head if last is not None else None
        self.mtp = last.mtp if last is not None else nn.ModuleList()
        self.rotary = modules[0].rotary
        self.full_model_parameters = sum(p.numel() for p in self.parameters())  # build_pipeline sets the total

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline rank's stages run through Pipeline.step / Pipeline.forward_loss")

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(int(i), layer.mlp) for i, layer in self.layers.items() if isinstance(layer.mlp, MoE)]

    def num_parameters(self) -> int:
        """Of the whole model (all stages), as `Transformer.num_parameters`."""
        return self.full_model_parameters


def build_pipeline(model: Transformer, pp_mesh: DeviceMesh, batch_shape: tuple[int, int], n_microbatches: int,
                   schedule: str = "1f1b", layers_per_stage: list[int] | None = None,
                   aux_loss_factory=None, dp_group: dist.ProcessGroup | None = None,
                   expert_dp_group: dist.ProcessGroup | None = None) -> Pipeline:
    """Cut `model` (the same weights on every rank) into this rank's stages and build the schedule.

    Args:
        pp_mesh: 1-D mesh of the pipeline ranks.
        batch_shape: (B, T) of every step's input_ids. Stages are built with these shapes given, so the
            engine does not run a shape-inference forward (which would count routed tokens and route
            uninitialised activations).
        n_microbatches: micro-batches per step (>= number of stages for interleaved/DualPipeV).
        schedule: one of SCHEDULES.
        layers_per_stage: blocks per global stage (default: even split).
        aux_loss_factory: optional `StageModule -> callable returning its balance loss` (e.g.
            `lambda m: RouterProbe(m, seq_alpha, seq_len=T).pop_loss`).
        dp_group: the data-parallel replicas of this pipeline rank (same stages, other rows): gradients
            are averaged over it after each step. batch_shape is then one replica's share.
        expert_dp_group: with expert parallelism (the model already `apply_expert_parallel`-ed over the
            ep ranks of dp_group), the ranks of dp_group holding the same experts (the edp group): expert
            gradients are summed over it instead, then divided by dp too.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if pp_mesh.ndim != 1:
        raise ConfigError(f"build_pipeline wants a 1-D pipeline mesh, got {pp_mesh.ndim}-D")
    cls, per_rank, style = SCHEDULES[schedule]
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages = pp * per_rank
    if per_rank > 1 and n_microbatches < n_stages:
        raise ConfigError(f"schedule {schedule} needs at least {n_stages} micro-batches (one per stage), "
                          f"got {n_microbatches}")
    B, T = batch_shape
    if B % n_microbatches:
        raise ConfigError(f"batch size {B} must be a multiple of the {n_microbatches} pipeline micro-batches")
    ranges = layer_ranges(model.config.num_hidden_layers, n_stages, layers_per_stage)
    group = pp_mesh.get_group()
    device = model.embed_tokens.weight.device
    tokens = torch.empty(B // n_microbatches, T, dtype=torch.long, device="meta")
    hidden = torch.empty(B // n_microbatches, T, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype,
                         device="meta", requires_grad=True)
    modules, stages = [], []
    for s in stage_ids(pp_rank, pp, per_rank, style):
        module = StageModule(model, ranges[s].start, ranges[s].stop, s == 0, s == n_stages - 1)
        module.stage_id = s
        if aux_loss_factory is not None:
            module.aux_loss = aux_loss_factory(module)
        modules.append(module)
        stages.append(PipelineStage(module, s, n_stages, device, group=group,
                                    input_args=tokens if s == 0 else hidden, output_args=hidden,
                                    input_grads=None if s == 0 else hidden,
                                    output_grads=None if s == n_stages - 1 else hidden))
    last_module = next((m for m in modules if m.is_last), None)

    def loss_fn(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if last_module is None:
            raise RuntimeError("pipeline loss requested on a rank without the last stage")
        return last_module.loss(h, target[:, 0], target[:, 1])  # target: (input_ids, shift_labels)

    sched = cls(stages if per_rank > 1 else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    # The last stage holds a copy of the embedding when the model reads it at both ends (StageModule).
    first_rank = next(r for r in range(pp) if 0 in stage_ids(r, pp, per_rank, style))
    last_rank = next(r for r in range(pp) if n_stages - 1 in stage_ids(r, pp, per_rank, style))
    shares = reads_embedding_at_end(model) and n_stages > 1
    owners = [next(r for r in range(pp) if s in stage_ids(r, pp, per_rank, style)) for s in range(n_stages)]
    return Pipeline(modules, sched, group, shares, first_rank == last_rank, n_microbatches, (B, T), dp_group,
                    expert_dp_group, tuple(_local(model.embed_tokens.weight).shape), stages, stage_ranks=owners,
                    hidden_dtype=hidden.dtype)
