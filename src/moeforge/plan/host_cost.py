"""The host cost of moeforge's eager trainer on this CPU, per decoder layer and per step: Python, the
dispatcher and autograd, measured where the arithmetic is negligible.

Why: an eager step's CPU time is its kernels plus the host work that issues them. The op list prices
each kernel (a GEMM timed at its shape, an element-wise op by its bytes plus a tiny op's dispatch), but
not the Python of the modules, autograd's bookkeeping of some 500 nodes a step, views, small index
arithmetic and the trainer's own step (balancing, metrics). Measured here in December 2026: a plain debug
step at 4 x 64 tokens costs 30-40 ms more CPU than its op list; a tiny one 70-180 ms. That part does not
grow with the tokens: it is the step's alpha, as gloo's 8-byte time is a collective's alpha. So it is
measured as one, never at the run's own size:

* the run's model, one process, one sequence of `SEQ` tokens (the op list prices its kernels at a few
  ms), `REPS` trainer steps after a warm-up;
* per decoder layer (dense and MoE apart) and per MTP module, forward and backward, through module hooks;
  the rest of forward + backward (embedding, final norm, head, loss, autograd's start) as `ends`; the
  rest of the trainer's step (clipping, AdamW, bias update, expert counts) as `step`;
* each minus what the op list prices for the same operations at that shape, so that nothing is counted
  twice. Medians over the steps; a category the op list prices above its measurement costs 0.

`ops.step_blocks` lists one `host` op per layer, MTP module, pipeline end and step for the eager
implementation; `device.CPUDevice` prices them from this table (GPU devices: 0, their host work runs
ahead of the kernels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import tempfile
import time

SEQ = 8
REPS = 7


def run_key(run) -> str:
    """What the host cost depends on: the model and the precision (not the batch; recomputation is the op
    list's: it re-lists a layer's forward host op)."""
    t = run.train
    text = json.dumps([run.model.to_dict(), t.precision], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def at_alpha(run, **changes):
    """The run at SEQ tokens a sequence on the default corpus slice (the run's data may be gone; host work
    does not depend on which tokens), eager and without checkpointing (the op list re-lists recomputed
    host work), with `changes` to its train config on top."""
    t = dataclasses.replace(run.train, seq_len=SEQ, data=None, max_corpus_mb=1.0, compile=False,
                            activation_checkpointing="none", memory_budget=None, **changes)
    return dataclasses.replace(run, train=t)


def small_run(run, tmp: str):
    """The run's model and training settings on one process, one sequence of SEQ tokens."""
    return at_alpha(run, batch_size=1, grad_accum=1, nproc=1, dp=0, tp=1, pp=1, ep=1, cp=1, zero=0, run_dir=tmp,
                    device="cpu", redundant_experts=0, offload="none")


def _measured(run, reps: int) -> dict:
    """Median CPU seconds per step: {"<category>.<phase>": seconds summed over its modules, "fwd_bwd",
    "step_total"} of `run` (already small)."""
    import torch
    from rich.console import Console

    from ..train import Trainer

    trainer = Trainer(run, run_dir=run.train.run_dir, console=Console(quiet=True))
    model = trainer.model
    first_moe = run.model.first_k_dense_replace
    acc: dict[str, float] = {}
    starts: dict[int, float] = {}

    def add(key: str, seconds: float) -> None:
        acc[key] = acc.get(key, 0.0) + seconds

    def begin(module) -> None:
        starts[id(module)] = time.thread_time()

    def end(module, key: str) -> None:
        add(key, time.thread_time() - starts.pop(id(module), time.thread_time()))

    def watch(module, category: str) -> None:
        module.register_forward_pre_hook(lambda mod, *_: begin(mod))
        module.register_forward_hook(lambda mod, *_: end(mod, f"{category}.fwd"))
        module.register_full_backward_pre_hook(lambda mod, *_: begin(mod))
        module.register_full_backward_hook(lambda mod, *_: end(mod, f"{category}.bwd"))

    for i, layer in enumerate(model.layers):
        watch(layer, "moe" if i >= first_moe else "dense")
    for mtp in getattr(model, "mtp", ()):
        watch(mtp, "mtp")

    inner = trainer.forward_backward

    def timed_forward_backward():
        c0 = time.thread_time()
        out = inner()
        add("fwd_bwd", time.thread_time() - c0)
        return out

    trainer.forward_backward = timed_forward_backward
    with torch.random.fork_rng():
        for _ in range(2):  # warm-up: lazily built state (oneDNN kernels, optimizer state)
            trainer.train_step()
            trainer.step += 1
        samples = []
        for _ in range(reps):
            acc.clear()
            c0 = time.thread_time()
            trainer.train_step()
            acc["step_total"] = time.thread_time() - c0
            trainer.step += 1
            samples.append(dict(acc))
    keys = set().union(*samples)
    return {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}


def _priced(run, device) -> dict:
    """The op list's CPU seconds for the same small step, by the same categories (host ops left out)."""
    from .against import run_layout
    from .models import from_moe
    from .ops import EAGER, step_blocks

    lo, s = run_layout(run, 1)
    model = from_moe(run.model, run.train.preset)
    out: dict[str, float] = {}
    for block in step_blocks(model, lo, s, EAGER, 0):
        for op in block:
            if op.kind in ("collective", "host"):
                continue
            t = device.op_time(op) * op.count
            if op.phase == "step":
                key = "step"
            else:
                cat = op.name.split(".")[0]
                cat = "mtp" if cat.startswith("mtp") else cat if cat in ("dense", "moe") else "ends"
                key = f"{cat}.{op.phase}"
            out[key] = out.get(key, 0.0) + t
    return out


STATE_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two AdamW moments: the whole model on one process


def measure_host_cost(run, device, reps: int = REPS) -> dict:
    """{"dense.fwd", "dense.bwd", "moe.fwd", ..., "ends.fwd", "ends.bwd", "step"}: host CPU seconds per
    layer (per MTP module; per micro-batch for the ends; per optimizer step for "step") of `run`'s model
    in moeforge's trainer on this machine. `device`: a CPUDevice whose op prices are subtracted. Refused
    (ValueError) for a model whose training state would not fit in half this machine's memory on one
    process (a run sharded over ranks can train one)."""
    from .calibrate import _ram_gb
    from .device import _threads
    from .models import from_moe

    need_gb = from_moe(run.model, run.train.preset).total_params * STATE_BYTES_PER_PARAM / 1e9
    if need_gb > _ram_gb() / 2:
        raise ValueError(f"the whole model needs {need_gb:.1f} GB on one process, more than half of this "
                         f"machine's {_ram_gb():.0f} GB")
    with tempfile.TemporaryDirectory() as tmp, _threads(device.threads):
        small = small_run(run, tmp)
        measured = _measured(small, reps)
    solo = dataclasses.replace(device, ranks=1, run_share=1.0, host=None,
                               rates={**device.rates, "elementwise_bw": device.rates.get(
                                   "elementwise_bw_alone", device.rates["elementwise_bw"])})
    priced = _priced(small, solo)
    m = run.model
    counts = {"dense": min(m.first_k_dense_replace, m.num_hidden_layers),
              "moe": max(0, m.num_hidden_layers - m.first_k_dense_replace),
              "mtp": m.num_nextn_predict_layers, "ends": 1}
    out: dict[str, float] = {}
    blocks = {"fwd": 0.0, "bwd": 0.0}
    for cat in ("dense", "moe", "mtp"):
        for phase in ("fwd", "bwd"):
            key = f"{cat}.{phase}"
            seconds = measured.get(key, 0.0)
            blocks[phase] += seconds
            out[key] = max(0.0, seconds - priced.get(key, 0.0)) / counts[cat] if counts[cat] else 0.0
    rest = max(0.0, measured.get("fwd_bwd", 0.0) - blocks["fwd"] - blocks["bwd"])
    ends_priced = priced.get("ends.fwd", 0.0) + priced.get("ends.bwd", 0.0)
    # forward and backward of the ends are not told apart by hooks: the split follows the op list's
    ends_host = max(0.0, rest - ends_priced)
    share_fwd = priced.get("ends.fwd", 0.0) / ends_priced if ends_priced else 0.5
    out["ends.fwd"], out["ends.bwd"] = ends_host * share_fwd, ends_host * (1 - share_fwd)
    out["step"] = max(0.0, measured.get("step_total", 0.0) - measured.get("fwd_bwd", 0.0) - priced.get("step", 0.0))
    out["measured_step_s"] = measured.get("step_total", 0.0)
    out["priced_step_s"] = sum(priced.values())
    return out
