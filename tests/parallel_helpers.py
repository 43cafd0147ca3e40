"""Shared pieces of the distributed tests: a tiny deterministic training loop that runs the same way in
one process and in a spawned gloo group, so the two can be compared number for number."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from moeforge.balance import BiasBalancer, RouterProbe, gather_counts, moe_modules, reset_counts
from moeforge.config import TrainConfig, preset
from moeforge.model import Router, Transformer
from moeforge.parallel import clip_grad_norm
from moeforge.train import make_optimizer

GLOBAL_BATCH, SEQ = 4, 16
STEPS = 3
LR = 1e-3  # AdamW divides by sqrt(v): a relative gradient error e moves a weight by about lr x e


def build_model(impl: str = "bmm") -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("debug"))
    for m in model.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return model


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        t = torch.randint(0, 256, (GLOBAL_BATCH, SEQ + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


class Loop:
    """model + AdamW + clipping + seq-aux loss + bias balancing; `group` = the data-parallel group."""

    def __init__(self, model, group=None, rank: int = 0, dp: int = 1):
        self.model, self.group, self.rank, self.dp = model, group, rank, dp
        self.optimizer = make_optimizer(model, TrainConfig(lr=LR, weight_decay=0.1))
        self.probe = RouterProbe(model, seq_alpha=1e-2, seq_len=SEQ)
        self.balancer = BiasBalancer(gamma=1e-2)
        self.step = 0

    def shard(self, t):
        rows = t.shape[0] // self.dp
        return t[self.rank * rows:(self.rank + 1) * rows]

    def train_step(self, x, y) -> dict:
        reset_counts(self.model)
        out = self.model(self.shard(x), shift_labels=self.shard(y))
        loss = out.loss + self.probe.pop_loss()
        loss.backward()
        norm = clip_grad_norm(self.model.parameters(), 0.5)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = gather_counts(self.model, group=self.group)
        self.balancer.update(self.model, self.step, group=self.group)
        self.step += 1
        loss = loss.detach().clone()
        if self.group is not None:
            dist.all_reduce(loss, group=self.group)
            loss /= self.dp
        return {"loss": loss.item(), "grad_norm": float(norm), "counts": counts}


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and routing bias as a full tensor (DTensors gathered), keyed by plain names."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    for i, moe in enumerate(moe_modules(model)):
        out[f"bias{i}"] = moe.gate.e_score_correction_bias.clone()
    return out


def single_process_run(n: int = STEPS, snapshot_at: int | None = None):
    """Records of n steps and the full state after them (and after `snapshot_at` steps, if given)."""
    loop = Loop(build_model())
    records, snapshot = [], None
    for x, y in batches(n):
        records.append(loop.train_step(x, y))
        if loop.step == snapshot_at:
            snapshot = full_state(loop.model)
    return records, full_state(loop.model), snapshot


def init_gloo(rank: int, world: int, init_file: str, timeout_s: float = 60):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


@contextmanager
def one_thread():
    """Tiny models on a shared machine: more intra-op threads only contend (measured 0.3 s vs 11-20 s for
    5 debug steps on 2 busy cores); spawned ranks use one thread each too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spread_router_model() -> Transformer:
    """The debug preset with router weights x50. Routing is discrete: at init the expert scores of a token
    differ by ~1e-3, so fp32 noise from summing in another order (heads split by TP, micro-batches in PP) can
    flip a near-tie and the runs part ways by O(1e-4). Spread-out scores keep every choice far from a tie
    (the layouts are compared, not the routing)."""
    model = Transformer(preset("debug"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.weight.mul_(50)
    return model


def reference_steps(model, opt, batch, steps: int, seq_len: int, clip=None, seq_alpha: float = 1e-2) -> list[float]:
    """`steps` of the trainer's loop in one process: loss + sequence balance loss, clip to 1.0, AdamW, bias
    update; the reference the TP and PP runs are compared with. batch(step) -> (input_ids, shift_labels)."""
    clip = clip or torch.nn.utils.clip_grad_norm_
    probe = RouterProbe(model, seq_alpha=seq_alpha, seq_len=seq_len)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = model(x, shift_labels=y).loss + probe.pop_loss()
        loss.backward()
        clip(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        BiasBalancer(0.01).update(model, step)
        losses.append(loss.item())
    return losses
