"""The per-operation step model: the op list against an independent count (costs.py; the traced real step
is in test_plan_cli.py),
the device models' shape dependence, and the schedules and precisions of issue 17 item 4."""

import dataclasses

import pytest

from moeforge.costs import training_flops_per_token
from moeforge.errors import ConfigError
from moeforge.plan.catalog import get_hardware
from moeforge.plan.device import GPUDevice
from moeforge.plan.layout import Layout, TrainSettings, check_layout
from moeforge.plan.memory import activation_bytes
from moeforge.plan.models import load_model
from moeforge.plan.network import topology_for
from moeforge.plan.ops import FUSED, Op, step_ops, summarize
from moeforge.plan.steptime import bubble_time, step_time

V3 = load_model("deepseek-v3")


def test_op_list_flops_equal_the_analytic_count_with_mtp():
    """One rank, no sharding: the GEMMs and (causal) attention of the op list are exactly
    `costs.training_flops_per_token` with the MTP module (costs.py is tested against a built model)."""
    s = TrainSettings(seq_len=4096, global_batch=1)
    ops = step_ops(V3, Layout(), s, FUSED)
    expected = training_flops_per_token(V3.moe_config, 4096, include_mtp=True) * 4096
    assert summarize(ops, 1)["flops"] == pytest.approx(expected, rel=1e-9)


def test_sharded_ranks_split_the_routed_and_head_work():
    s = TrainSettings(seq_len=4096, global_batch=64)
    one = {o.name: o for o in step_ops(V3, Layout(dp=64), s, FUSED)}
    ep = {o.name: o for o in step_ops(V3, Layout(dp=64, ep=64), s, FUSED)}
    a, b = one["moe.experts.gate_up"], ep["moe.experts.gate_up"]
    assert a.groups == 256 and b.groups == 4 and a.flops == pytest.approx(b.flops)  # same rows, fewer experts
    assert b.m == 64 * a.m  # each local expert sees 64x the rows: bigger, faster GEMMs
    assert any(o.group == "ep" and o.collective == "moe_a2a" for o in ep.values())
    pp = step_ops(V3, Layout(dp=16, pp=4), s, FUSED)
    assert summarize(pp, 1)["flops"] < summarize(list(one.values()), 1)["flops"] / 3


def test_small_grouped_expert_gemms_run_far_below_peak():
    """DeepGEMM's table (device.py): 64 rows per group ~14% of the FP8 peak, 4096 rows ~61%."""
    dev = GPUDevice(get_hardware("h800"))
    small = Op("e", "gemm", "fwd", m=64, n=4096, k=7168, groups=32, precision="fp8")
    large = dataclasses.replace(small, m=4096, groups=1)
    rate = lambda op: op.flops / dev.op_time(op)  # noqa: E731
    assert rate(small) / rate(large) == pytest.approx(0.14 / 0.61, rel=0.01)
    assert rate(large) == pytest.approx(0.61 * 1978.9e12, rel=0.01)
    mem = Op("norm", "memory", "fwd", bytes=1e9)
    assert dev.op_time(mem) == pytest.approx(1e9 / (3.35e12 * 0.84))
    assert dev.op_time(dataclasses.replace(mem, bytes=10)) == pytest.approx(4e-6)  # launch-bound


def test_interleaved_1f1b_shrinks_the_bubble_and_grows_activations():
    lo = Layout(dp=1, pp=4, schedule="interleaved-1f1b", virtual_stages=2)
    assert bubble_time(lo, 3.0) == pytest.approx(3 * 3.0 / 2)  # (PP-1)(F+B)/v
    s = TrainSettings(seq_len=4096, global_batch=16)
    lite = load_model("deepseek-v2-lite")
    check_layout(lite, lo, 4, s)
    base = activation_bytes(lite, dataclasses.replace(lo, schedule="1f1b"), s, 0)
    assert activation_bytes(lite, lo, s, 0) == pytest.approx(base * (1 + 3 / 8))  # Megatron: 1 + (p-1)/(pv)
    with pytest.raises(ConfigError, match="multiple of pp=4"):
        check_layout(lite, lo, 4, TrainSettings(seq_len=4096, global_batch=6))


def test_mxfp8_runs_at_the_blackwell_fp8_rate_and_is_refused_on_hopper():
    b200, h800 = get_hardware("b200"), get_hardware("h800")
    assert b200.matmul_flops("mxfp8") == b200.matmul_flops("fp8") == 4500e12
    with pytest.raises(ConfigError, match="no MXFP8"):
        h800.matmul_flops("mxfp8")
    lo = Layout(dp=8, ep=8)
    s = TrainSettings(seq_len=4096, global_batch=64, precision="mxfp8")
    fast = step_time(V3, b200, topology_for(b200, 8), lo, s)
    slow = step_time(V3, b200, topology_for(b200, 8), lo, dataclasses.replace(s, precision="bf16"))
    assert fast.compute < slow.compute


def test_partly_used_nvl72_racks_are_planned():
    gb = get_hardware("gb200-nvl72")
    topo = topology_for(gb, 100)  # one full rack and 28 GPUs of a second
    assert topo.placement(100) == (72, 2)
    lo = Layout(dp=100, ep=4)
    s = TrainSettings(seq_len=4096, global_batch=200)
    check_layout(V3, lo, 100, s, gb.gpus_per_node)
    assert step_time(V3, gb, topo, lo, s).total > 0


def test_an_overloaded_ep_rank_gets_its_extra_expert_rows():
    """expert_load scales the rows this rank's experts receive (their GEMMs, SwiGLU and the received-row
    permutation), not the tokens it routes or sends."""
    s = TrainSettings(seq_len=4096, global_batch=64)
    even = {o.name: o for o in step_ops(V3, Layout(dp=64, ep=64), s, FUSED)}
    hot = {o.name: o for o in step_ops(V3, Layout(dp=64, ep=64), dataclasses.replace(s, expert_load=1.5), FUSED)}
    assert hot["moe.experts.gate_up"].flops == pytest.approx(1.5 * even["moe.experts.gate_up"].flops, rel=1e-3)
    assert hot["moe.router"].flops == even["moe.router"].flops
    assert hot["moe.ep.dispatch"].bytes == even["moe.ep.dispatch"].bytes
    with pytest.raises(ConfigError, match="expert_load must be > 0"):
        dataclasses.replace(s, expert_load=0).validate()


def test_zero_collectives_are_one_per_fsdp_unit():
    """ZeRO gathers and reduces each FSDP unit (a decoder block, the root's embedding/norm/head) with its own
    collective, so a step pays one latency per unit; the bytes still add up to the rank's parameters. Without
    ZeRO the gradient is one flattened all-reduce. A traced debug ZeRO-3 step gathers every block and the
    root in forward and backward (FSDP::all_gather per unit, twice a step)."""
    from moeforge.plan.memory import stage_params

    debug = load_model("debug")
    s = TrainSettings(seq_len=256, global_batch=16, precision="fp32")
    dense_p, _ = stage_params(debug, Layout(dp=2, zero=3), 0)
    for zero, names in ((3, {"dp.grad_sync", "dp.zero3_gather"}), (2, {"dp.grad_sync", "dp.param_gather"})):
        ops = [o for o in step_ops(debug, Layout(dp=2, zero=zero), s, FUSED) if o.group == "dp"]
        assert {o.name for o in ops} == names
        for o in ops:
            assert o.count == debug.num_layers + 1
            per_elem = s.grad_comm_bytes if o.name == "dp.grad_sync" else s.weight_bytes
            assert o.bytes * o.count == pytest.approx(dense_p * per_elem)
    (ddp,) = [o for o in step_ops(debug, Layout(dp=2, zero=0), s, FUSED) if o.group == "dp"]
    assert ddp.count == 1 and ddp.collective == "all_reduce"
