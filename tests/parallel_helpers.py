"""Shared pieces of the distributed tests.

The equality claims (EP, ZeRO-2/3, TP, PP and their combinations compute what one process computes) are
checked through the trainers themselves: `fit_in_gloo_group` runs `DistributedTrainer`s in a spawned gloo
group, `fit_single` runs the plain `Trainer` on the same config, and `check_same_run` compares what they
logged (metrics.jsonl) and saved (the Hugging Face export). `Loop` is a small training loop for the tests
of library pieces the trainer does not expose (dispatch payloads, redundant experts, old checkpoints)."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from conftest import SMALL_CORPUS
from moeforge.balance import BiasBalancer, RouterProbe, gather_counts, moe_modules, reset_counts
from moeforge.config import TrainConfig, preset, resolve_run_config
from moeforge.errors import TrainingError
from moeforge.model import Transformer
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


# --- runs of the trainers ---------------------------------------------------------------------------
# The debug preset on a small real corpus, fp32. warmup_steps > steps keeps the learning rate a function of
# the step alone (not of --steps), so a run stopped at step 2 and resumed to step 6 follows the same
# schedule as 6 uninterrupted steps.
TRAIN = dict(preset="debug", data=str(SMALL_CORPUS), seq_len=32, batch_size=4, warmup_steps=100, eval_every=1,
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


def die_at(trainer, step: int) -> None:
    real = trainer.forward

    def forward(*args, **kwargs):
        if trainer.step + 1 == step:
            os._exit(0)  # no clean-up, no goodbye to the peers
        return real(*args, **kwargs)

    trainer.forward = forward


def fit_in_gloo_group(tmp_path, world: int, jobs, timeout_s: float = 60) -> None:
    """Start `world` gloo processes; each runs DistributedTrainer(train_config(**job)).fit() for the jobs in
    turn (one process group for all: starting processes is the expensive part). A job is a dict of
    TrainConfig fields plus `run_dir`, optionally `resume` (bool), `poison` ({rank: steps}: NaN losses) and
    `exit_at` ({rank: step}: that rank's process ends when the step starts, as a crashed peer's does); or a
    function(rank, world, out_dir) every rank runs. A run that fails with a TrainingError writes its message
    to <out_dir>/error-rank<r>.txt and ends the process (the group is broken)."""
    start_ranks(_fit_worker, (world, str(tmp_path / "init"), jobs, str(tmp_path), timeout_s), world)


def start_ranks(fn, args: tuple, world: int) -> None:
    """torch.multiprocessing.spawn's fn(rank, *args) in `world` processes, forked rather than spawned: a
    forked rank starts from this process's imports, where a spawned one imports torch, torch._dynamo and
    moeforge again (~6 CPU-seconds a rank, most of a small test on 2 cores). Safe as in a DataLoader
    worker: each rank runs one intra-op thread, and no object of the parent is finalised in a rank. (A
    process group the parent had left to the garbage collector, finalised in a rank whose copy has none of
    its threads, deadlocked there: the parent collects first, and the rank never collects what it inherits.)"""
    import gc

    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise RuntimeError("start_ranks: this process has a default process group; its ranks would inherit it")
    gc.collect()
    mp.start_processes(_fresh_rank, args=(fn, args), nprocs=world, join=True, start_method="fork")


def _fresh_rank(rank: int, fn, args: tuple) -> None:
    import gc

    gc.freeze()  # what the parent left stays uncollected here (see start_ranks)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    fn(rank, *args)


def _fit_worker(rank, world, init_file, jobs, out_dir, timeout_s):
    from moeforge.parallel.trainer import DistributedTrainer

    init_gloo(rank, world, init_file, timeout_s)
    for job in jobs:
        if callable(job):  # a check of its own, run by every rank between two runs
            job(rank, world, out_dir)
            continue
        job = dict(job)
        resume, poisoned, exit_at = job.pop("resume", False), job.pop("poison", {}), job.pop("exit_at", {})
        trainer = DistributedTrainer(train_config(**job), resume=resume)
        poison(trainer, poisoned.get(rank, ()))
        if rank in exit_at:
            die_at(trainer, exit_at[rank])
        try:
            trainer.fit()
        except TrainingError as e:
            Path(out_dir, f"error-rank{rank}.txt").write_text(str(e))
            os._exit(0)
    dist.destroy_process_group()


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def check_same_run(got_dir, want_dir, what: str, atol: float = 1e-5) -> None:
    """The run in got_dir logged what the run in want_dir logged for the same steps (each step's loss parts,
    gradient norm, validation loss, learning rate, skip flag and expert counts; got_dir's steps may be the
    first of want_dir's), and each of its checkpoints' Hugging Face export (its last one at its last logged step)
    holds the weights and routing biases of want_dir's checkpoint of that step, within atol."""
    from safetensors.torch import load_file

    from moeforge.checkpoint import checkpoints_dir, latest_checkpoint, list_checkpoints

    got = read_metrics(got_dir)
    want = {m["step"]: m for m in read_metrics(want_dir)}
    assert got and all(m["step"] in want for m in got), f"{what}: logged steps {[m['step'] for m in got]}"
    for a in got:
        b = want[a["step"]]
        for key in COMPARED:
            assert (key in a) == (key in b), f"{what}: step {b['step']} {key} logged in one run only"
            if key not in b:
                continue
            if isinstance(b[key], float) and math.isfinite(b[key]):
                assert abs(a[key] - b[key]) <= atol, f"{what}: step {b['step']} {key} {a[key]} != {b[key]}"
            else:  # flags, and a skipped step's NaN loss
                assert str(a[key]) == str(b[key]), f"{what}: step {b['step']} {key} {a[key]} != {b[key]}"
        assert a["expert_counts"] == b["expert_counts"], f"{what}: step {b['step']} expert counts"
    assert latest_checkpoint(got_dir).name == f"step-{got[-1]['step']:06d}", f"{what}: last checkpoint"
    for ckpt in list_checkpoints(got_dir):  # each layout's export, where want_dir has that step's checkpoint
        want_ckpt = checkpoints_dir(want_dir) / ckpt.name
        if not want_ckpt.is_dir():
            continue
        w_got, w_want = load_file(ckpt / "model.safetensors"), load_file(want_ckpt / "model.safetensors")
        assert w_got.keys() == w_want.keys(), f"{what}: {ckpt.name} exported tensor names"
        for k, v in w_want.items():
            err = (w_got[k] - v).abs().max().item()
            assert err <= atol, f"{what}: {ckpt.name} exported {k} differs by {err:.2e}"
