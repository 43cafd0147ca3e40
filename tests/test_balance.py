"""Balancing from outside the model: bias updates, balance losses, balanced routing, monitoring."""

import pytest
import torch

from conftest import small_run
from moeforge.balance import (BiasBalancer, RouterProbe, balance_loss, balanced_assignment, device_load,
                              install_balanced_routing, max_vio, moe_modules, reset_counts)
from moeforge.config import preset
from moeforge.model import Transformer
from moeforge.train import Trainer


def test_max_vio():
    assert max_vio(torch.tensor([[1.0, 1, 1, 1], [4.0, 0, 0, 0]])).tolist() == [0.0, 3.0]


def test_bias_moves_towards_balance_and_freezes():
    model = Transformer(preset("debug"))
    model(torch.randint(0, 256, (4, 32)))
    moe = moe_modules(model)[0]
    load = moe.tokens_per_expert.clone()
    BiasBalancer(gamma=0.01).update(model, step=0)
    bias = moe.gate.e_score_correction_bias
    assert torch.equal(bias, 0.01 * torch.sign(load.mean() - load))
    BiasBalancer(gamma=0.01, freeze_after=5).update(model, step=5)
    assert torch.equal(bias, 0.01 * torch.sign(load.mean() - load))  # frozen: unchanged


def test_bias_speed_decays_geometrically_to_its_final_value():
    b = BiasBalancer(gamma=1e-2, final_gamma=1e-3, total_steps=101)
    assert b.speed(0) == pytest.approx(1e-2) and b.speed(100) == pytest.approx(1e-3)
    assert b.speed(50) == pytest.approx(10 ** -2.5)  # halfway in log space
    assert BiasBalancer(gamma=1e-2, final_gamma=1e-3, total_steps=101, freeze_after=60).speed(60) == 0.0
    assert BiasBalancer(gamma=1e-2).speed(10**6) == 1e-2  # no final value: constant


def test_bias_never_changes_gate_weights_only_selection():
    model = Transformer(preset("debug")).eval()
    router = moe_modules(model)[0].gate
    x = torch.randn(50, model.config.hidden_size)
    _, _, scores = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.5)
    weights, indices, scores2 = router(x)
    assert torch.equal(scores, scores2)
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(1, keepdim=True) * router.routed_scaling_factor)


def test_balance_loss_is_one_when_perfectly_balanced_and_larger_when_skewed():
    N, E, K = 64, 8, 2
    uniform = torch.full((N, E), 0.5)
    assert balance_loss(uniform, balanced_assignment(N, E, K), group_size=16).item() == pytest.approx(1.0)
    skewed_scores = torch.full((N, E), 0.1)
    skewed_scores[:, :2] = 0.9
    skewed = torch.tensor([[0, 1]]).expand(N, K)
    assert balance_loss(skewed_scores, skewed, group_size=16).item() > 3.0


def test_probe_adds_sequence_loss_and_its_gradient_reaches_routers():
    model = Transformer(preset("debug"))
    probe = RouterProbe(model, seq_alpha=0.1, seq_len=16)
    ids = torch.randint(0, 256, (3, 16))
    out = model(ids, labels=ids)
    aux = probe.pop_loss()
    assert aux is not None and aux.item() > 0
    (out.loss + aux).backward()
    assert moe_modules(model)[0].gate.weight.grad.abs().sum() > 0
    assert probe.pop_loss() is None  # consumed
    with torch.no_grad():
        model(ids)
    assert probe.pop_loss() is None  # evaluation is not recorded


def test_balanced_routing_gives_every_expert_the_same_load():
    model = Transformer(preset("debug"))
    install_balanced_routing(model)
    model(torch.randint(0, 256, (2, 32)))
    for _, moe in model.moe_layers():  # (MTP blocks see 31 tokens: as even as 62 / 8 allows)
        counts = moe.tokens_per_expert
        assert counts.min() == counts.max() and counts.sum() > 0
    reset_counts(model)
    assert all(m.tokens_per_expert.sum() == 0 for m in moe_modules(model))


def test_device_load_splits_experts_over_replicas():
    load = torch.tensor([[8.0, 2, 2, 4]])
    phy2log = torch.tensor([[0, 1, 0, 2, 3, 3]])  # expert 0 and 3 replicated; 3 devices of 2 slots
    logcnt = torch.tensor([[2, 1, 1, 2]])
    assert device_load(load, phy2log, logcnt, 3).tolist() == [[6.0, 6.0, 4.0]]


def test_training_with_aux_free_balancing_lowers_imbalance(tmp_path):
    common = dict(steps=60, eval_every=0, seq_len=32, batch_size=8, lr=3e-3, seq_aux_alpha=0.0)
    Trainer(small_run(tmp_path / "off", bias_update_speed=0.0, **common)).fit()
    Trainer(small_run(tmp_path / "on", bias_update_speed=0.003, **common)).fit()
    import json

    def late_vio(run):
        lines = (run / "run" / "metrics.jsonl").read_text().splitlines()[-20:]
        return sum(json.loads(line)["max_vio"] for line in lines) / 20

    assert late_vio(tmp_path / "on") < 0.8 * late_vio(tmp_path / "off")
