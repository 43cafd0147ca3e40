import itertools
import json
import random

import pytest
import torch

from conftest import small_run
from moeforge.balance import RouterProbe, moe_modules
from moeforge.config import preset
from moeforge.errors import ConfigError
from moeforge.memory import ActivationCheckpointing, ActivationRecorder, build_plan, fixed_plan
from moeforge.memory.auto import Option, _knapsack
from moeforge.memory.candidates import RECAST, find_candidates
from moeforge.memory.setup import sample_batch
from moeforge.model import Transformer
from moeforge.train import Trainer


def step(model, probe, batch, names, dtype=None):
    """One forward/backward (fp32, or under `dtype` autocast) with `names` checkpointed: loss, aux loss,
    grads, token counts, kept bytes."""
    ac = ActivationCheckpointing(model, names)
    model.zero_grad(set_to_none=True)
    for moe in moe_modules(model):
        moe.tokens_per_expert.zero_()
    with ActivationRecorder(model) as rec, torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                          enabled=dtype is not None):
        out = model(batch[0], shift_labels=batch[1])
    aux = probe.pop_loss()
    (out.loss + aux).backward()
    ac.remove()
    return {"loss": out.loss.detach(), "aux": aux.detach(), "leftover": len(probe._outputs),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "counts": [m.tokens_per_expert.clone() for m in moe_modules(model)], "kept": rec.profile().total_bytes}


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    model = Transformer(preset("debug"))
    probe = RouterProbe(model, seq_alpha=1e-2, seq_len=32)
    return model, probe, sample_batch(256, 2, 32, "cpu")


def test_every_mode_is_bit_identical_to_no_checkpointing(debug_model):
    """fp32 losses, balance loss, every gradient and the MoE token counts match `none` exactly: recompute
    reproduces the forward, and it neither counts tokens twice nor feeds the balance loss twice."""
    model, probe, batch = debug_model
    ref = step(model, probe, batch, [])
    nested = ["layers.1", "layers.1.mlp", "layers.1.mlp.experts", "layers.1.self_attn", "mtp.0.block.mlp",
              "layers.1.weight_casts", "layers.2.weight_casts"]
    for mode, budget in [("full", None), ("selective", None), ("auto", 0.5), ("nested", None)]:
        if mode == "nested":  # regions inside checkpointed regions, three deep
            plan = build_plan(model, "auto", 1.0, batch, repeats=1)
            plan.names, plan.held_bytes = nested, plan_held(model, batch, nested)
        else:
            plan = build_plan(model, mode, budget, batch, repeats=1)
        probe.pop_loss()
        assert plan.names, mode
        got = step(model, probe, batch, plan.names)
        assert torch.equal(got["loss"], ref["loss"]) and torch.equal(got["aux"], ref["aux"]), mode
        assert got["leftover"] == 0  # nothing recorded during the recompute
        for name, g in ref["grads"].items():
            assert torch.equal(got["grads"][name], g), (mode, name)
        for a, b in zip(got["counts"], ref["counts"]):
            assert torch.equal(a, b), mode
        assert got["kept"] == plan.held_bytes < ref["kept"]  # the plan's estimate is what a forward keeps


def bf16_plans(model):
    """weight_casts alone, inside a checkpointed block, and around checkpointed sub-regions."""
    casts = [c.name for c in find_candidates(model) if c.kind == RECAST]
    return {"casts": casts, "casts+full": fixed_plan(model, "full") + casts,
            "casts+nested": casts + ["layers.1", "layers.1.mlp.experts", "layers.2.mlp", "mtp.0.block.self_attn"]}


def test_weight_casts_are_bit_identical_under_bf16_autocast(debug_model):
    """Recasting the bf16 weight copies in the backward gives the same bf16 values, so losses, gradients
    and token counts equal `none` exactly; the profile predicts what the forward keeps to the byte."""
    from moeforge.memory import profile_forward

    model, probe, batch = debug_model
    bf16 = torch.bfloat16
    ref = step(model, probe, batch, [], bf16)
    profile = profile_forward(model, *batch, candidates=True, autocast=torch.autocast("cpu", dtype=bf16))
    probe.pop_loss()
    for label, names in bf16_plans(model).items():
        got = step(model, probe, batch, names, bf16)
        assert torch.equal(got["loss"], ref["loss"]) and torch.equal(got["aux"], ref["aux"]), label
        for name, g in ref["grads"].items():
            assert torch.equal(got["grads"][name], g), (label, name)
        for a, b in zip(got["counts"], ref["counts"]):
            assert torch.equal(a, b), label
        assert got["kept"] == profile.held(names) < ref["kept"], label
    assert profile.held(bf16_plans(model)["casts"]) < 0.9 * profile.saved_bytes  # weights are >10% here


def test_recast_refuses_a_weight_changed_between_forward_and_backward(debug_model):
    model, probe, batch = debug_model
    ac = ActivationCheckpointing(model, bf16_plans(model)["casts"])
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch[0], shift_labels=batch[1])
        probe.pop_loss()
        with torch.no_grad():
            model.layers[1].mlp.experts.gate_up_proj.mul_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            out.loss.backward()
    finally:
        ac.remove()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_auto_fits_its_budget_as_measured(debug_model, fraction):
    model, probe, batch = debug_model
    plan = build_plan(model, "auto", fraction, batch, repeats=1)
    probe.pop_loss()
    kept = step(model, probe, batch, plan.names)["kept"]
    assert plan.budget_bytes == int(fraction * plan.baseline_bytes)
    assert kept + plan.transient_bytes <= plan.budget_bytes
    # Recomputing every block also fits these budgets, so the cheapest plan costs no more (same timings).
    assert plan.recompute_s <= plan.forward_s * (1 + 1e-9)


def test_auto_rejects_an_unreachable_budget(debug_model):
    model, probe, batch = debug_model
    with pytest.raises(ConfigError, match="below the least activation memory"):
        build_plan(model, "auto", 0.05, batch, repeats=1)
    probe.pop_loss()


def brute_force(groups, need):
    best = None
    for combo in itertools.product(*[[None, *opts] for opts in groups]):
        chosen = [o for o in combo if o is not None]
        if sum(o.saving for o in chosen) >= need:
            cost = sum(o.cost for o in chosen)
            best = cost if best is None else min(best, cost)
    return best


def test_knapsack_matches_brute_force():
    """Savings are rounded down to need/2000 units (at most one unit lost per group), so the DP's plan is
    feasible, no cheaper than the true optimum, and no dearer than the optimum with that slack added."""
    rng = random.Random(0)
    for _ in range(40):
        groups = [[Option((f"g{g}o{i}",), rng.randint(1, 100), rng.uniform(0.1, 5), 0)
                   for i in range(rng.randint(1, 4))] for g in range(4)]
        need = rng.randint(1, 250)
        got = _knapsack(groups, need)
        if brute_force(groups, need) is None:
            assert got is None
            continue
        slack = brute_force(groups, need + len(groups) * need / 2000)
        if got is None:
            assert slack is None
            continue
        cost = sum(o.cost for o in got)
        assert sum(o.saving for o in got) >= need
        assert brute_force(groups, need) - 1e-9 <= cost <= (slack if slack is not None else cost) + 1e-9


def plan_held(model, batch, names):
    from moeforge.memory import profile_forward

    return profile_forward(model, *batch, candidates=True).held(names)


def test_unknown_names_are_rejected(debug_model):
    model = debug_model[0]
    with pytest.raises(ConfigError, match="unknown checkpointing candidate"):
        ActivationCheckpointing(model, ["layers.9"])
    assert fixed_plan(model, "full") == ["layers.0", "layers.1", "layers.2", "mtp.0.block"]


def test_training_with_checkpointing_matches_training_without(tmp_path):
    """End to end through Trainer: same losses, gradient norms and expert counts (so the same balancing
    bias updates) with full checkpointing as without; the plan is saved with the run."""
    runs = {}
    for mode in ("none", "full"):
        trainer = Trainer(small_run(tmp_path / mode, grad_accum=2, activation_checkpointing=mode))
        metrics = trainer.train_step()  # two micro-batches, then AdamW and the balancing-bias update
        biases = [m.gate.e_score_correction_bias.clone() for m in moe_modules(trainer.model)]
        runs[mode] = (metrics, biases)
    (a, bias_a), (b, bias_b) = runs["none"], runs["full"]
    assert (a["loss"], a["aux_loss"], a["grad_norm"], a["expert_counts"]) == \
           (b["loss"], b["aux_loss"], b["grad_norm"], b["expert_counts"])
    assert all(torch.equal(x, y) for x, y in zip(bias_a, bias_b)) and any(x.abs().sum() > 0 for x in bias_a)
    plan = json.loads((tmp_path / "full" / "run" / "activation_checkpointing.json").read_text())
    assert plan["mode"] == "full" and plan["names"] == ["layers.0", "layers.1", "layers.2", "mtp.0.block"]
    assert plan["held_bytes"] < plan["baseline_bytes"]


def test_offload_is_a_no_op_on_cpu():
    from moeforge.memory.offload import apply_offload

    model = Transformer(preset("debug"))
    opt = torch.optim.AdamW(model.parameters())
    assert "no-op on cpu" in apply_offload("all", model, opt, torch.device("cpu"))
    assert "forward" not in model.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offload_on_gpu_keeps_results_and_moves_states():
    from moeforge.memory.offload import apply_offload

    torch.manual_seed(0)
    ref = Transformer(preset("debug")).cuda()
    off = Transformer(preset("debug")).cuda()
    off.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    opts = [torch.optim.AdamW(m.parameters()) for m in (ref, off)]
    apply_offload("all", off, opts[1], torch.device("cuda"))
    for _ in range(2):
        for m, o in zip((ref, off), opts):
            m(ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for a, b in zip(ref.parameters(), off.parameters()):
        torch.testing.assert_close(a, b)
    assert all(v.device.type == "cpu" for s in opts[1].state.values() for v in s.values() if v.dim())
