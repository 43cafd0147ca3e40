"""Shared pieces of the distributed tests.

The equality claims (EP, ZeRO-2/3, TP, PP and their combinations compute what one process computes) are
checked through the trainers themselves: `fit_in_gloo_group` runs `DistributedTrainer`s in a spawned gloo
group, `fit_single` runs the plain `Trainer` on the same config, and `check_same_run` compares what they
logged (metrics.jsonl) and saved (the Hugging Face export). `Loop` is a small training loop for the tests
of library pieces the trainer does not expose (dispatch payloads, redundant experts, old checkpoints)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from conftest import SMALL_CORPUS
from moeforge.balance import BiasBalancer, RouterProbe, gather_counts, moe_modules, reset_counts
from moeforge.config import TrainConfig, preset, resolve_run_config
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
        out = self.model(self.shard(x), labels=self.shard(y))
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
    update; the reference the TP and PP runs are compared with. batch(step) -> (input_ids, labels)."""
    clip = clip or torch.nn.utils.clip_grad_norm_
    probe = RouterProbe(model, seq_alpha=seq_alpha, seq_len=seq_len)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = model(x, y).loss + probe.pop_loss()
        loss.backward()
        clip(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        BiasBalancer(0.01).update(model, step)
        losses.append(loss.item())
    return losses


# --- runs of the trainers ---------------------------------------------------------------------------
# The debug preset on a small real corpus, fp32. warmup_steps > steps keeps the learning rate a function of
# the step alone (not of --steps), so a run stopped at step 2 and resumed to step 6 follows the same
# schedule as 6 uninterrupted steps.
TRAIN = dict(preset="debug", data=str(SMALL_CORPUS), seq_len=32, batch_size=4, warmup_steps=100, eval_every=2,
             eval_batches=2, sample_tokens=0, precision="fp32", device="cpu", keep_checkpoints=20)
COMPARED = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "val_loss", "max_vio", "lr", "skipped")


def train_config(run_dir, **train):
    return resolve_run_config({}, {**TRAIN, "run_dir": str(run_dir), **train})


def fit_single(run_dir, poison_steps=(), **train) -> Path:
    """The plain single-process Trainer: the reference every layout is compared with."""
    from moeforge.train import Trainer

    with one_thread():
        trainer = Trainer(train_config(run_dir, **train))
        poison(trainer, poison_steps)
        trainer.fit()
    return Path(run_dir)


def poison(trainer, steps) -> None:
    """Make this process's loss NaN on the given (1-based) steps (an overflow on this rank only)."""
    if not steps:
        return
    real = trainer.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.step + 1 in steps:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = forward


def fit_in_gloo_group(tmp_path, world: int, jobs, after=None, timeout_s: float = 60) -> None:
    """Spawn `world` gloo processes; each runs DistributedTrainer(train_config(**job)).fit() for the jobs in
    turn (one process group for all: starting processes is the expensive part). A job is a dict of
    TrainConfig fields plus `run_dir`, optionally `resume` (bool) and `poison` ({rank: steps}).
    after(rank, world, out_dir), if given, runs last in every rank (it may break the group)."""
    import torch.multiprocessing as mp

    mp.spawn(_fit_worker, args=(world, str(tmp_path / "init"), jobs, after, str(tmp_path), timeout_s),
             nprocs=world, join=True)


def _fit_worker(rank, world, init_file, jobs, after, out_dir, timeout_s):
    from moeforge.parallel.trainer import DistributedTrainer

    init_gloo(rank, world, init_file, timeout_s)
    for job in jobs:
        job = dict(job)
        resume, poisoned = job.pop("resume", False), job.pop("poison", {})
        trainer = DistributedTrainer(train_config(**job), resume=resume)
        poison(trainer, poisoned.get(rank, ()))
        trainer.fit()
    if after is not None:
        after(rank, world, out_dir)
    dist.destroy_process_group()


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def check_same_run(got_dir, want_dir, what: str, atol: float = 1e-5, weights: bool = True) -> None:
    """The run in got_dir logged what the run in want_dir logged (each step's loss parts, gradient norm,
    validation loss, learning rate, skip flag and expert counts), and its last checkpoint's Hugging Face
    export holds the same weights, within atol."""
    from safetensors.torch import load_file

    from moeforge.checkpoint import latest_checkpoint

    got, want = read_metrics(got_dir), read_metrics(want_dir)
    assert [m["step"] for m in got] == [m["step"] for m in want], f"{what}: logged steps"
    for a, b in zip(got, want):
        for key in COMPARED:
            assert (key in a) == (key in b), f"{what}: step {b['step']} {key} logged in one run only"
            if key in b and isinstance(b[key], float) and b[key] == b[key]:  # NaN: a skipped step's loss
                assert abs(a[key] - b[key]) <= atol, f"{what}: step {b['step']} {key} {a[key]} != {b[key]}"
            elif key in b:
                assert (a[key] == b[key]) or (a[key] != a[key] and b[key] != b[key]), \
                    f"{what}: step {b['step']} {key} {a[key]} != {b[key]}"
        assert a["expert_counts"] == b["expert_counts"], f"{what}: step {b['step']} expert counts"
    if weights:
        w_got = load_file(latest_checkpoint(got_dir) / "model.safetensors")
        w_want = load_file(latest_checkpoint(want_dir) / "model.safetensors")
        assert w_got.keys() == w_want.keys(), f"{what}: exported tensor names"
        for k, v in w_want.items():
            err = (w_got[k] - v).abs().max().item()
            assert err <= atol, f"{what}: exported {k} differs by {err:.2e}"
