"""Replicated experts compute exactly what the unreplicated model computes, forward and backward."""

import copy

import numpy as np
import torch

from moeforge.balance.placement import plan_placement
from moeforge.balance.replicas import ReplicatedExperts, replicate_experts, sync_replica_grads, unreplicate_experts
from moeforge.config import preset
from moeforge.model import Transformer


def make_pair():
    torch.manual_seed(0)
    plain = Transformer(preset("debug"))
    replicated = copy.deepcopy(plain)
    E = plain.config.n_routed_experts
    loads = np.array([[50.0, 1, 1, 1, 9, 1, 1, 1], [1, 1, 30, 1, 1, 1, 1, 1]])  # hot experts per layer
    placement = plan_placement(loads, n_slots=E + 4, n_devices=4)
    assert placement.logcnt[0][0] > 1
    replicate_experts(replicated, placement.phy2log, placement.logcnt)
    return plain, replicated


def test_outputs_and_gradients_match_the_unreplicated_model():
    plain, replicated = make_pair()
    ids = torch.randint(0, 256, (4, 24))
    a, b = plain(ids, labels=ids), replicated(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    sync_replica_grads(replicated)
    rep = replicated.layers[1].mlp.experts
    assert isinstance(rep, ReplicatedExperts)
    ref = plain.layers[1].mlp.experts
    for slot, expert in enumerate(rep.phy2log.tolist()):
        torch.testing.assert_close(rep.physical.gate_up_proj.grad[slot], ref.gate_up_proj.grad[expert],
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rep.physical.down_proj.grad[slot], ref.down_proj.grad[expert],
                                   atol=1e-6, rtol=1e-5)
    # Tokens of the hot expert really were spread over its replicas.
    assert (rep.logcnt > 1).any()


def test_training_steps_keep_replicas_identical_and_equal_to_plain():
    plain, replicated = make_pair()
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(replicated.parameters(), lr=1e-2)
    for step in range(3):
        ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(step))
        for model, opt in ((plain, opt_a), (replicated, opt_b)):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            sync_replica_grads(model)
            opt.step()
    unreplicate_experts(replicated)
    for (name, p), q in zip(plain.named_parameters(), replicated.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
