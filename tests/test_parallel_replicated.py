"""Redundant experts across expert-parallel ranks (moeforge.parallel.replicated), in a real 2-process gloo
group: E=8 experts in 12 slots per MoE layer, 6 slots per rank, hot experts with replicas on both ranks
(and, in one layer, two replicas on the same rank). Against one process running the plain model on the
same global batch (seq-aux loss, bias balancing, clipping at 0.5, AdamW) for 3 steps, within 1e-5 (fp32):
losses, gradient norms, expert counts, the first step's gradients (every slot = its logical expert's), and
every weight after 3 steps (every slot = its logical expert's, replicas bitwise identical). The rows of a
replicated expert are split between its replicas (checked per step from the slots' row counts), and the
logical checkpoint view gathers and scatters back exactly. Bad placements fail with one-line errors.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moeforge.balance import gather_counts, reset_counts
from moeforge.balance.placement import plan_placement
from moeforge.errors import ConfigError
from moeforge.parallel import ParallelLayout, build_mesh, clip_grad_norm
from moeforge.parallel.replicated import (apply_replicated_expert_parallel, check_placement,
                                          load_logical_expert_state, load_placement, logical_expert_state,
                                          pop_slot_counts, replica_grad_sq, replicated_modules, slot_parameters,
                                          sync_replica_grads)
from parallel_helpers import Loop, batches, build_model, init_gloo, one_thread, start_ranks

E, SLOTS, EP = 8, 12, 2
# Layer 1 (hand-written): expert 0 has 3 replicas (two on rank 0, one on rank 1), experts 1 and 2 one on each.
LAYER1 = [0, 1, 2, 3, 0, 5] + [4, 0, 6, 7, 1, 2]
# Layer 2: the planner's placement for a hot expert 5 on 2 devices.
LAYER2 = plan_placement(np.array([[1, 1, 1, 1, 1, 12, 1, 1]], dtype=float), SLOTS, n_devices=EP).phy2log[0].tolist()
PHY2LOG = [LAYER1, LAYER2]
LOGCNT = [np.bincount(row, minlength=E).tolist() for row in PHY2LOG]


class ReplicaLoop(Loop):
    """Loop.train_step with the gradient handling of replicated EP without FSDP: dense gradients averaged
    over dp, replica gradients summed per logical expert (/ dp), the norm counting each expert once."""

    def train_step(self, x, y) -> dict:
        reset_counts(self.model)
        out = self.model(self.shard(x), shift_labels=self.shard(y))
        loss = out.loss + self.probe.pop_loss()
        loss.backward()
        slots = slot_parameters(self.model)
        skip = {id(p) for p in slots}
        for p in self.model.parameters():
            if id(p) not in skip:
                assert p.grad is not None
                dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.dp
        sync_replica_grads(self.model, divide_by=self.dp)
        norm = clip_grad_norm(self.model.parameters(), 0.5, uncounted=slots, extra_sq=replica_grad_sq(self.model))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = gather_counts(self.model, group=self.group)
        self.balancer.update(self.model, self.step, group=self.group)
        self.step += 1
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=self.group)
        return {"loss": loss.item() / self.dp, "grad_norm": float(norm), "counts": counts}


def capture_first_grads(loop, out: dict):
    def hook(optimizer, args, kwargs):
        if not out:
            for name, p in loop.model.named_parameters():
                if p.grad is not None:
                    out[name] = p.grad.detach().clone()
    loop.optimizer.register_step_pre_hook(hook)


def worker(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file)
    layout = ParallelLayout.resolve(world, ep=EP, zero=2)
    mesh = build_mesh(layout, "cpu")
    model = apply_replicated_expert_parallel(build_model(), mesh["ep"], PHY2LOG, LOGCNT)
    names = {id(m): n for n, m in model.named_modules()}
    loop = ReplicaLoop(model, group=mesh["dp"].get_group(), rank=mesh["dp"].get_local_rank(), dp=layout.dp)
    grads, records, slot_counts = {}, [], []
    capture_first_grads(loop, grads)
    for x, y in batches():
        records.append(loop.train_step(x, y))
        slot_counts.append(dict(zip([names[id(m)] for m in replicated_modules(model)], pop_slot_counts(model))))
    mine = {"slots": {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n},
            "grads": grads, "slot_counts": slot_counts}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    logical = logical_expert_state(model)
    # Scatter the logical view into a freshly built replicated model: its slots must equal the trained ones.
    fresh = apply_replicated_expert_parallel(build_model(), mesh["ep"], PHY2LOG, LOGCNT)
    load_logical_expert_state(fresh, logical)
    reloaded = all(torch.equal(getattr(a, w), getattr(b, w)) for a, b in
                   zip(replicated_modules(model), replicated_modules(fresh)) for w in ("gate_up_proj", "down_proj"))
    if rank == 0:
        state = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." not in n}
        torch.save({"records": records, "ranks": gathered, "state": state, "logical": logical,
                    "reloaded": reloaded}, os.path.join(out_dir, "replicated.pt"))
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def slot_tensor(ranks, key, name):
    """The [S, ...] tensor of all slots (rank 0's first) of one weight, from every rank's local slots."""
    return torch.cat([r[key][name] for r in ranks])


def test_replicated_ep_matches_single_process(tmp_path):
    for row in PHY2LOG:
        ranks_of = {e: {s // (SLOTS // EP) for s, x in enumerate(row) if x == e} for e in range(E)}
        assert any(len(r) == 2 for r in ranks_of.values()), row
    start_ranks(worker, (2, str(tmp_path / "init"), str(tmp_path)), 2)
    got = torch.load(tmp_path / "replicated.pt")

    ref = Loop(build_model())
    ref_grads, ref_records = {}, []
    capture_first_grads(ref, ref_grads)
    for x, y in batches():
        ref_records.append(ref.train_step(x, y))
    ref_state = {n: p.detach() for n, p in ref.model.named_parameters()}

    for step, (a, b) in enumerate(zip(got["records"], ref_records, strict=True)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, f"loss at step {step + 1}"
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5, f"grad norm at step {step + 1}"
        assert torch.equal(a["counts"], b["counts"]), f"expert counts at step {step + 1}"
    # Dense parameters: gradients (step 1) and weights (after 3 steps).
    for name, p in got["state"].items():
        torch.testing.assert_close(got["ranks"][0]["grads"][name], ref_grads[name], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(p, ref_state[name], rtol=0, atol=1e-5, msg=name)
    # Expert slots: every slot holds its logical expert's gradient and weights; replicas bitwise identical.
    placements = {"layers.1.": PHY2LOG[0], "layers.2.": PHY2LOG[1],
                  "mtp.0.": list(range(E))}  # the MTP block's MoE keeps one copy per expert
    expert_names = sorted(got["ranks"][0]["slots"])
    assert len(expert_names) == 2 * len(placements)
    for name in expert_names:
        row = next(p for prefix, p in placements.items() if name.startswith(prefix))
        weights, grads = slot_tensor(got["ranks"], "slots", name), slot_tensor(got["ranks"], "grads", name)
        for s, e in enumerate(row):
            torch.testing.assert_close(grads[s], ref_grads[name][e], rtol=0, atol=1e-5, msg=f"{name} slot {s}")
            torch.testing.assert_close(weights[s], ref_state[name][e], rtol=0, atol=1e-5, msg=f"{name} slot {s}")
            first = row.index(e)
            assert torch.equal(weights[s], weights[first]), f"{name}: replicas of expert {e} differ"
        torch.testing.assert_close(got["logical"][name], ref_state[name], rtol=0, atol=1e-5, msg=name)
    assert got["reloaded"]

    # Rows per slot: each expert's replicas together got exactly its routed rows; replicas got within
    # one row per source rank of each other, and both ranks' replicas of a replicated expert got some.
    for step in range(len(ref_records)):
        counts = got["records"][step]["counts"]  # [layers, E], summed over ranks
        for layer, (prefix, row) in enumerate((("layers.1.", PHY2LOG[0]), ("layers.2.", PHY2LOG[1]))):
            key = next(k for k in got["ranks"][0]["slot_counts"][step] if k.startswith(prefix))
            per_slot = torch.cat([r["slot_counts"][step][key] for r in got["ranks"]])
            for e in range(E):
                slots = [s for s, x in enumerate(row) if x == e]
                rows = per_slot[slots]
                assert int(rows.sum()) == int(counts[layer, e]), (step, layer, e)
                assert int(rows.max() - rows.min()) <= EP, (step, layer, e, rows.tolist())
                if len({s // (SLOTS // EP) for s in slots}) == 2 and counts[layer, e] >= 2 * EP:
                    assert (rows > 0).all(), (step, layer, e, rows.tolist())
    # The hand-placed hot expert 0 of layer 1 really was shared: its three slots all computed rows.
    assert all(torch.cat([r["slot_counts"][s][k] for r in got["ranks"]])[[0, 4, 7]].min() > 0
               for s in range(len(ref_records)) for k in got["ranks"][0]["slot_counts"][s] if k.startswith("layers.1."))


@pytest.mark.parametrize("phy2log, logcnt, message", [
    ([LAYER1], None, r"^expert placement has 1 layers, the model has 2 MoE layers$"),
    ([LAYER1, LAYER1[:11]], None, r"^expert placement layer 1: 11 slots do not divide over ep=2 ranks$"),
    ([LAYER1, list(range(6))], None, r"^expert placement layer 1: 6 slots for 8 experts$"),
    ([LAYER1, [9] + LAYER1[1:]], None, r"^expert placement layer 1: expert id 9 outside 0\.\.7$"),
    ([LAYER1, LAYER1[:9] + [0] + LAYER1[10:]], None, r"^expert placement layer 1: expert 7 has no slot$"),
    ([LAYER1, LAYER2], [LOGCNT[0], [1] * 8], r"^expert placement layer 1: logcnt \[1, 1, 1, 1, 1, 1, 1, 1\] "
                                              r"does not match phy2log \(replica counts \[.*\]\)$"),
    ("nonsense", None, r"^expert placement: phy2log must be a \[layers\]\[slots\] list of expert ids$"),
])
def test_bad_placements_fail_in_one_line(phy2log, logcnt, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_placement(phy2log, logcnt, n_layers=2, n_experts=E, ep=EP)
    assert "\n" not in str(err.value)


def test_placement_json_from_balance_plan(tmp_path):
    path = tmp_path / "placement.json"
    loads = np.array([[1, 1, 1, 1, 1, 12, 1, 1], [9, 1, 1, 1, 1, 1, 1, 1]], dtype=float)
    path.write_text(json.dumps(plan_placement(loads, SLOTS, n_devices=EP).to_json()))
    phy2log, logcnt = load_placement(path)
    assert check_placement(phy2log, logcnt, 2, E, EP)[0] == LAYER2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no 'phy2log' \(write it with moeforge balance plan --json\)$"):
        load_placement(tmp_path / "bad.json")
