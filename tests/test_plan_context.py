"""`moeforge plan` knows context parallelism (`cp` in --layout): activations per rank shrink with C (by less
than 1/C: every rank keeps K and V of the whole sequence), the compressed-KV all-gathers appear among the
collectives of every attention layer and in the step time, and bad cp layouts are refused in one line. (That
the planned bytes equal what the CP code exchanges is checked in test_parallel_context.py, against the bytes
the real module's all-gather moves.)"""

import json

import pytest

from moeforge.cli import main
from moeforge.errors import ConfigError
from moeforge.plan.layout import Layout, TrainSettings, check_layout
from moeforge.plan.memory import memory_per_rank, stage_layers
from moeforge.plan.models import load_model
from moeforge.plan.ops import step_ops

V3 = load_model("deepseek-v3")
LONG = TrainSettings(seq_len=131072, global_batch=8)


def test_activation_memory_shrinks_with_cp_but_keeps_the_whole_sequences_keys():
    layout = dict(dp=1, tp=8, pp=16, ep=8)
    acts = {cp: memory_per_rank(V3, Layout(cp=cp, **layout), LONG).activations for cp in (1, 2, 4, 8)}
    assert acts[1] > acts[2] > acts[4] > acts[8]
    for cp in (2, 4, 8):
        assert acts[cp] > acts[1] / cp  # K and V of all positions stay on every rank
    weights = {cp: memory_per_rank(V3, Layout(cp=cp, zero=1, **layout), LONG).optimizer for cp in (1, 2)}
    assert weights[2] < weights[1]  # ZeRO shards over dp x cp (the ranks averaging gradients)


def test_kv_all_gather_is_a_collective_of_every_attention_layer_and_costs_time():
    lo = Layout(dp=1, cp=8, tp=8, pp=16, ep=8)
    last = lo.pp - 1
    ops = [op for op in step_ops(V3, lo, LONG, stage=last) if op.group == "cp"]
    c = V3.moe_config
    gathered = LONG.seq_len * (c.kv_lora_rank + c.qk_rope_head_dim) * LONG.act_bytes  # one whole sequence
    assert {(op.collective, op.phase) for op in ops} == {("all_gather", "fwd"), ("reduce_scatter", "bwd")}
    assert all(op.bytes == gathered for op in ops)
    attention_layers = len(stage_layers(V3.num_layers, lo.pp)[last]) + c.num_nextn_predict_layers  # + MTP
    assert sum(op.count for op in ops if op.phase == "fwd") == attention_layers


def test_plan_cli_takes_cp_in_the_layout_and_refuses_bad_ones(capsys):
    args = ["plan", "--model", "deepseek-v3", "--gpus", "2048", "--seq", "131072", "--global-batch", "16", "--json"]
    assert main([*args, "--layout", "dp=2,cp=8,tp=8,pp=16,ep=16,zero=1,recompute=full"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["cp"] == 8 and out["breakdown_s"]["CP KV all-gather"] > 0
    assert main([*args, "--layout", "dp=2,cp=8,tp=8,pp=8,ep=16"]) == 2
    err = capsys.readouterr().err
    assert "dp*cp*tp*pp = 2*8*8*8 = 1024 ranks, but there are 2048 GPUs" in err and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match="multiple of 2 x cp = 6"):
        check_layout(V3, Layout(dp=1, cp=3, tp=8, pp=16, ep=8), 3 * 8 * 16, TrainSettings(seq_len=4096, global_batch=8))
