"""Collective costs against their closed forms, and topology sizes against Insights Table 3."""

import math

import pytest

from moeforge.errors import ConfigError
from moeforge.plan import network as net
from moeforge.plan.catalog import get_hardware

LINK = net.Link(bandwidth=100e9, latency=2e-6)


def test_closed_forms():
    M, p = 1e9, 8
    assert net.ring_all_reduce(M, p, LINK) == pytest.approx(2 * 7 * (2e-6 + M / 8 / 100e9))
    assert net.tree_all_reduce(M, p, LINK) == pytest.approx(2 * 3 * 2e-6 + 2 * M / 100e9)
    assert net.ring_all_gather(M, p, LINK) == pytest.approx(7 * (2e-6 + M / 8 / 100e9))
    assert net.direct_all_to_all(M, p, LINK) == pytest.approx(2e-6 + M * 7 / 8 / 100e9)
    assert net.ring_all_to_all(M, 64, LINK) == pytest.approx(32 * 2e-6 + 64 * M / (8 * 100e9))
    assert net.torus_all_to_all(M, 8, 8, LINK) == pytest.approx(8 * 2e-6 + 64 * M / (8 * 8 * 100e9))
    for f in (net.ring_all_reduce, net.tree_all_reduce, net.ring_all_gather):
        assert f(M, 1, LINK) == 0


def test_insights_table_3_network_sizes():
    hw = get_hardware("h800")
    sizes = {k: net.topology_for(hw, 2048, k) for k in ("fat-tree2", "multi-plane", "fat-tree3")}
    assert (sizes["fat-tree2"].max_endpoints(), sizes["fat-tree2"].switches()) == (2048, 96)
    assert (sizes["multi-plane"].max_endpoints(), sizes["multi-plane"].switches()) == (16384, 768)
    assert (sizes["fat-tree3"].max_endpoints(), sizes["fat-tree3"].switches()) == (65536, 5120)
    assert net.topology_for(hw, 8).kind == "nvswitch"
    assert net.topology_for(hw, 4096).kind == "multi-plane"
    assert net.topology_for(hw, 32768).kind == "fat-tree3"
    with pytest.raises(ConfigError, match="exceed"):
        net.topology_for(hw, 4096, "fat-tree2")
    partial = net.topology_for(hw, 12)  # one full node and a half-used one
    assert partial.placement(12) == (8, 2)
    with pytest.raises(ConfigError, match="choose one of"):
        net.topology_for(hw, 16, "hypercube")


def test_picks_the_cheapest_algorithm():
    topo = net.topology_for(get_hardware("h800"), 8)
    assert net.all_reduce(topo, 1e3, 8).algorithm == "tree"  # latency-bound: log p steps
    big = net.all_reduce(topo, 1e9, 8)
    assert big.algorithm == "ring"  # bandwidth-bound: 2(p-1)/p M < 2M
    assert big.time == pytest.approx(net.ring_all_reduce(1e9, 8, topo.intra))
    multi = net.topology_for(get_hardware("h800"), 256)
    small = net.all_reduce(multi, 1e4, 256)
    assert small.algorithm in ("tree", "hierarchical")
    assert small.time < net.ring_all_reduce(1e4, 256, multi.group_link(256)[0])


def test_group_placement_and_hierarchical_form():
    topo = net.topology_for(get_hardware("h800"), 64)
    assert topo.placement(8, 1) == (8, 1)
    assert topo.placement(8, 8) == (1, 8)
    assert topo.placement(16, 2) == (4, 4)
    M = 1e8
    inner = net.Link(topo.inter.bandwidth, topo.inter_latency(8))
    hier = 2 * net.ring_reduce_scatter(M, 8, topo.intra) + min(net.ring_all_reduce(M / 8, 8, inner),
                                                                 net.tree_all_reduce(M / 8, 8, inner))
    assert net.all_reduce(topo, M, 64).time <= hier + 1e-12


def test_node_limited_routing_cuts_ib_traffic():
    topo = net.topology_for(get_hardware("h800"), 2048)
    t, D = 4096, 7168
    assert net.expected_nodes(8, 8) == pytest.approx(8 * (1 - (7 / 8) ** 8))
    limited = net.moe_all_to_all(topo, t, D, 8, 64, 1.0, node_limit=4)
    free = net.moe_all_to_all(topo, t, D, 8, 64, 1.0, node_limit=None)
    naive = net.moe_all_to_all(topo, t, D, 8, 64, 1.0, dedup=False)
    assert limited.inter_bytes == pytest.approx(t * 4 * 7 / 8 * D)  # <= 4 nodes, 7 of 8 remote
    assert naive.inter_bytes == pytest.approx(t * 8 * 7 / 8 * D)  # every (token, expert) pair
    assert limited.inter_bytes < free.inter_bytes < naive.inter_bytes
    assert limited.intra_bytes == pytest.approx(t * 8 * 7 / 8 * D)  # NVLink forwarding at the destination
    expect = topo.inter_latency(8) + max(limited.intra_bytes / topo.intra.bandwidth,
                                         limited.inter_bytes / topo.inter.bandwidth)
    assert limited.time == pytest.approx(expect)
    # FP8 dispatch moves half the bytes of a BF16 combine
    combine = net.moe_all_to_all(topo, t, D, 8, 64, 2.0, node_limit=4)
    assert combine.inter_bytes == pytest.approx(2 * limited.inter_bytes)


def test_multi_plane_forwards_cross_rail_traffic_over_nvlink():
    hw = get_hardware("h800")
    ft = net.all_to_all(net.topology_for(hw, 2048, "fat-tree2"), 1e8, 64)
    mp = net.all_to_all(net.topology_for(hw, 2048, "multi-plane"), 1e8, 64)
    assert mp.inter_bytes == ft.inter_bytes and mp.intra_bytes > ft.intra_bytes


def test_direct_connect_topologies_are_bisection_bound():
    hw = get_hardware("h100")
    ring = net.topology_for(hw, 64, "ring")
    torus = net.topology_for(hw, 64, "torus2d")
    assert torus.torus_dims() == (8, 8)
    assert net.all_to_all(torus, 1e8, 64).time < net.all_to_all(ring, 1e8, 64).time
    assert net.all_reduce(ring, 1e9, 64).algorithm == "ring"
    assert math.isinf(ring.max_endpoints())
