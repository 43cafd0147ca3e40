"""Context parallelism (parallel/context.py) in real gloo groups equals one process on the full sequences:
per step the loss, every gradient (after the all-reduce over the context group), the gradient norm, the
expert counts, and the parameters and routing biases after the AdamW steps, within 1e-5 (fp32); with and
without YaRN, with MTP and both balance losses. The compressed-KV all-gather moves the bytes its shapes
say, and what `moeforge plan` predicts for them; a length that does not split into 2C chunks is refused
with one line."""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from moeforge.balance import BiasBalancer, RouterProbe, gather_counts, reset_counts
from moeforge.config import TrainConfig, preset
from moeforge.errors import ConfigError
from moeforge.model import Transformer
from moeforge.parallel.context import (ContextParallelRouterProbe, apply_context_parallel, check_seq_len,
                                       load_balanced_positions)
from moeforge.train import make_optimizer
from moeforge.model import Router
from moeforge.plan.layout import Layout
from moeforge.plan.layout import TrainSettings as TrainSettings_plan
from moeforge.plan.models import load_model
from moeforge.plan.ops import step_ops
from parallel_helpers import init_gloo, one_thread, start_ranks

BATCH, SEQ, STEPS = 2, 16, 2
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}
# Targets as the trainer passes them (shift_labels) and in transformers' unshifted convention (labels).
CASES = [dict(yarn=False, seq_alpha=1e-2, batch_alpha=0.0, unshifted=False),
         dict(yarn=True, seq_alpha=1e-2, batch_alpha=1e-2, unshifted=True)]


def spread_router_model() -> Transformer:
    """The debug preset with router weights x50: at init a token's expert scores differ by ~1e-3, so fp32
    noise from another summation order (the split attention) could flip a near-tie; spread-out scores keep
    every choice far from one (the layouts are compared, not the routing)."""
    model = Transformer(preset("debug"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.weight.mul_(50)
    return model


def build(case) -> Transformer:
    torch.manual_seed(0)
    if not case["yarn"]:
        return spread_router_model()
    config = dataclasses.replace(preset("debug"), rope_scaling=YARN).validate()
    torch.manual_seed(0)
    model = Transformer(config)
    base = spread_router_model()  # the same weights, routers spread out, YaRN tables of its own
    model.load_state_dict(base.state_dict())
    return model


def data():
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 256, (STEPS, BATCH, SEQ + 1), generator=g)
    return [(s[:, :-1], s[:, 1:]) for s in t]


def train(model, probe, unshifted: bool, group=None, size: int = 1):
    """STEPS of loss + balance loss, backward, gradients averaged over `group`, clip, AdamW, bias update."""
    # AdamW's first steps move a weight by ~lr whatever the gradient's size, so fp32 noise in a tiny gradient
    # (the fused attention kernel sums in another order) shows up as ~lr x its relative error: lr 1e-4 keeps
    # that below 1e-5 while a wrong update (~lr) or bias step (1e-2) still fails the comparison.
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1))
    records = []
    for step, (x, y) in enumerate(data()):
        reset_counts(model)
        out = model(x, labels=x) if unshifted else model(x, shift_labels=y)
        loss = out.loss + probe.pop_loss()
        loss.backward()
        if group is not None:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
                    p.grad /= size
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=group)
            loss /= size
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = gather_counts(model, group=group)
        BiasBalancer(gamma=1e-2).update(model, step, group=group)
        records.append({"loss": loss.item(), "grad_norm": norm.item(), "counts": counts, "grads": grads})
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return records, state


def worker(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file)
    group = dist.group.WORLD
    for i, case in enumerate(CASES):
        model = build(case)
        cp = apply_context_parallel(model, group)
        probe = ContextParallelRouterProbe(model, cp, case["seq_alpha"], case["batch_alpha"], seq_len=SEQ)
        records, state = train(model, probe, case["unshifted"], group, world)
        gathered = cp.pop_gathered_bytes()  # of STEPS forward passes
        if rank == 0:
            torch.save({"records": records, "state": state, "gathered": gathered}, os.path.join(out_dir, f"cp{i}.pt"))
    x, y = data()[0]
    try:
        model(x[:, :SEQ - 2], shift_labels=y[:, :SEQ - 2])
        refused = None
    except ConfigError as e:
        refused = str(e)
    if rank == 0:
        torch.save(refused, os.path.join(out_dir, "refused.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def references():
    with one_thread():
        out = []
        for case in CASES:
            model = build(case)
            out.append(train(model, RouterProbe(model, case["seq_alpha"], case["batch_alpha"], seq_len=SEQ),
                             case["unshifted"]))
        return out


def check_cp(tmp_path, world, references):
    start_ranks(worker, (world, str(tmp_path / "init"), str(tmp_path)), world)
    config = preset("debug")
    attention_layers = config.num_hidden_layers + config.num_nextn_predict_layers
    for i, (case, (records, state)) in enumerate(zip(CASES, references)):
        got = torch.load(tmp_path / f"cp{i}.pt")
        for step, (g, want) in enumerate(zip(got["records"], records, strict=True)):
            what = f"cp={world} {case} step {step + 1}"
            assert abs(g["loss"] - want["loss"]) < 1e-5, what
            assert abs(g["grad_norm"] - want["grad_norm"]) < 1e-5, what
            assert torch.equal(g["counts"], want["counts"]), what
            assert g["grads"].keys() == want["grads"].keys(), what
            for name, grad in want["grads"].items():
                torch.testing.assert_close(g["grads"][name], grad, rtol=0, atol=1e-5, msg=f"{what}: grad {name}")
        for name, value in state.items():
            torch.testing.assert_close(got["state"][name], value, rtol=0, atol=1e-5, msg=f"cp={world}: {name}")
        # Per forward and attention layer: this rank's (latent + rope key) tokens, sent to the other ranks.
        per_forward = attention_layers * BATCH * (SEQ // world) * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
        assert got["gathered"] == STEPS * per_forward * (world - 1)
        assert got["gathered"] == STEPS * planned_cp_bytes(world)
    refused = torch.load(tmp_path / "refused.pt")
    assert refused == check_message(SEQ - 2, world)


def planned_cp_bytes(cp: int) -> float:
    """What `moeforge plan` predicts one rank receives by the compressed-KV all-gathers of one forward (fp32,
    this test's batch): the gathered buffers of its collectives, of which (cp - 1) / cp come from other ranks."""
    settings = TrainSettings_plan(seq_len=SEQ, global_batch=BATCH, precision="fp32", act_bytes=4)
    ops = step_ops(load_model("debug"), Layout(cp=cp, micro_batch=BATCH), settings)
    gathers = [op for op in ops if op.group == "cp" and op.phase == "fwd"]
    assert gathers and all(op.collective == "all_gather" for op in gathers)
    return sum(op.bytes * op.count for op in gathers) * (cp - 1) / cp


def check_message(seq_len, cp):
    with pytest.raises(ConfigError) as e:
        check_seq_len(seq_len, cp)
    return str(e.value)


def test_load_balanced_positions_pair_front_and_back_chunks():
    ranks = [load_balanced_positions(16, 2, r).tolist() for r in range(2)]
    assert ranks == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert sorted(sum((load_balanced_positions(24, 3, r).tolist() for r in range(3)), [])) == list(range(24))
    message = check_message(18, 2)
    assert "18" in message and "2 x cp = 4" in message and "\n" not in message


def test_two_ranks_context_parallel_match_single_process(tmp_path, references):
    check_cp(tmp_path, 2, references)


def test_four_ranks_context_parallel_match_single_process(tmp_path, references):
    check_cp(tmp_path, 4, references)
