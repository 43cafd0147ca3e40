"""Network topologies and alpha-beta costs of collectives, including MoE all-to-all dispatch/combine.

Why alpha-beta: a message of M bytes over a link costs alpha (latency) + M / B (bandwidth); the
closed forms below are the textbook ones (Thakur, Rabenseifner & Gropp 2005; Chan et al. 2007), so each
is testable by hand. Topology decides which link a group's traffic crosses and, for direct-connect
topologies (ring, 2D torus), adds a bisection bound. `best_*` picks the cheapest algorithm.

Conventions: bandwidths are bytes/s per device per direction, already derated by the hardware's
achieved-over-peak efficiency; M is the full buffer size per rank (all-gather: the gathered output).
Ranks are laid out with a stride: a group of p ranks whose members are `stride` apart in rank order
(TP innermost, then DP/EP, PP outermost); nodes hold consecutive ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .catalog import Hardware

TOPOLOGIES = ("nvswitch", "fat-tree2", "multi-plane", "fat-tree3", "ring", "torus2d")
SWITCHED = ("nvswitch", "fat-tree2", "multi-plane", "fat-tree3")


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per device per direction
    latency: float  # seconds (alpha)


@dataclass(frozen=True)
class Cost:
    """Time of one collective and which algorithm gave it."""

    time: float
    algorithm: str
    intra_bytes: float = 0.0  # bytes a device sends over the scale-up link
    inter_bytes: float = 0.0  # bytes a device sends over its NIC


@dataclass(frozen=True)
class Topology:
    """Devices in nodes (switched topologies) or on a direct-connect ring / 2D torus.

    Switched: NVSwitch inside a node; nodes joined by a two-layer fat-tree, a multi-plane fat-tree (each
    of a node's NICs on its own plane, so traffic between different rails is forwarded over NVLink), or a
    three-layer fat-tree, built from switches of `radix` ports. Direct-connect: each device has links to 2
    (ring) or 4 (torus) neighbours of bandwidth `intra.bandwidth` each; there are no nodes.
    """

    kind: str
    gpus: int
    gpus_per_node: int
    intra: Link  # NVLink (switched) or one neighbour link (ring/torus)
    inter: Link  # per-device NIC (switched)
    radix: int = 64
    planes: int = 8

    # --- size and cost (Insights into DeepSeek-V3, Table 3) ---------------------------------------------
    def max_endpoints(self) -> float:
        """NIC endpoints one network of this kind can join (one NIC per device)."""
        k = self.radix
        return {"nvswitch": self.gpus_per_node, "fat-tree2": k * k / 2, "multi-plane": self.planes * k * k / 2,
                "fat-tree3": k ** 3 / 4}.get(self.kind, math.inf)

    def switches(self) -> int:
        """Scale-out switches at full size: FT2 k leaves + k/2 spines; MPFT that per plane; FT3 5k^2/4."""
        k = self.radix
        return {"fat-tree2": 3 * k // 2, "multi-plane": self.planes * 3 * k // 2,
                "fat-tree3": 5 * k * k // 4}.get(self.kind, 0)

    def torus_dims(self, p: int | None = None) -> tuple[int, int]:
        p = p or self.gpus
        a = int(math.isqrt(p))
        while p % a:
            a -= 1
        return a, p // a

    # --- where a group lives --------------------------------------------------------------------------
    def placement(self, p: int, stride: int = 1) -> tuple[int, int]:
        """(ranks of the group per node, nodes spanned) for p ranks `stride` apart."""
        if self.kind not in SWITCHED:
            return 1, p
        g = self.gpus_per_node
        per_node = max(1, min(p, g // stride)) if stride < g else 1
        return per_node, math.ceil(p / per_node)

    def inter_latency(self, nodes: int) -> float:
        """IB 2.8 us under one leaf, 3.7 us across leaves (Insights, Sec. 5.1); a three-layer tree adds one
        more switch pair, +0.9 us (our extrapolation of the same step)."""
        if nodes <= self.radix // 2:  # rail-optimised: one leaf holds one rail of radix/2 nodes
            return self.inter.latency
        return self.inter.latency + (1.8e-6 if self.kind == "fat-tree3" else 0.9e-6)

    def group_link(self, p: int, stride: int = 1) -> tuple[Link, int, int]:
        """The bottleneck link of a flat algorithm over the group, and its placement.

        Across nodes NCCL runs one ring/tree channel per NIC, so a flat algorithm gets per_node x NIC
        bandwidth, capped by the device's NVLink which carries every channel's intra-node hops."""
        per_node, nodes = self.placement(p, stride)
        if nodes == 1 or self.kind not in SWITCHED:
            return self.intra, per_node, nodes
        bw = min(self.intra.bandwidth, per_node * self.inter.bandwidth)
        return Link(bw, self.inter_latency(nodes)), per_node, nodes


def topology_for(hw: Hardware, gpus: int, kind: str | None = None, radix: int = 64) -> Topology:
    """The default network for `gpus` devices of `hw`: one NVSwitch node if it fits, else the smallest
    fat-tree that holds them (two-layer, multi-plane, three-layer)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    intra = Link(hw.nvlink_bw * hw.nvlink_efficiency, hw.nvlink_latency_us * 1e-6)
    inter = Link(hw.nic_bw_per_gpu * hw.nic_efficiency, hw.nic_latency_us * 1e-6)
    g = hw.gpus_per_node
    if kind is None:
        for kind in ("nvswitch", "fat-tree2", "multi-plane", "fat-tree3"):
            if Topology(kind, gpus, g, intra, inter, radix).max_endpoints() >= gpus:
                break
    if kind not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {kind!r}; choose one of: {', '.join(TOPOLOGIES)}")
    if kind in ("ring", "torus2d"):  # direct-connect: each neighbour link is one NVLink-class link
        return Topology(kind, gpus, 1, intra, intra, radix)
    # Multi-plane: one plane per NIC of a node (DeepSeek: 8 planes for 8-NIC H800 nodes, Insights Sec. 5.1).
    topo = Topology(kind, gpus, g, intra, inter, radix, planes=min(hw.nics_per_node, 8))
    if gpus > topo.max_endpoints():
        raise ConfigError(f"{gpus} GPUs exceed a {kind} network of radix-{radix} switches "
                          f"({int(topo.max_endpoints())} endpoints); choose --gpus <= that or another topology "
                          f"({', '.join(TOPOLOGIES)})")
    # A GPU count that is not a whole number of nodes (racks) leaves the last one partly used: nodes hold
    # consecutive ranks, so groups keep their placement and only that node has fewer devices.
    return topo


# --- closed forms (one group, one link) -------------------------------------------------------------------
def ring_all_reduce(M: float, p: int, link: Link) -> float:
    """Reduce-scatter then all-gather around a ring: 2(p-1) steps of M/p bytes."""
    return 0.0 if p <= 1 else 2 * (p - 1) * (link.latency + M / (p * link.bandwidth))


def tree_all_reduce(M: float, p: int, link: Link) -> float:
    """Pipelined (double) binary tree: reduce up, broadcast down; 2 log2 p latencies, ~2M bytes per device."""
    return 0.0 if p <= 1 else 2 * math.ceil(math.log2(p)) * link.latency + 2 * M / link.bandwidth


def ring_all_gather(M: float, p: int, link: Link) -> float:
    """p-1 steps of M/p bytes (M = gathered size). Reduce-scatter costs the same."""
    return 0.0 if p <= 1 else (p - 1) * (link.latency + M / (p * link.bandwidth))


ring_reduce_scatter = ring_all_gather


def direct_all_to_all(M: float, p: int, link: Link) -> float:
    """Each device sends M(p-1)/p bytes, all pairs at once (full-bisection switch)."""
    return 0.0 if p <= 1 else link.latency + M * (p - 1) / p / link.bandwidth


def ring_all_to_all(M: float, p: int, link: Link) -> float:
    """Bidirectional ring: half the ranks are up to p/2 hops away; the bisection (2 links per direction)
    carries pM/4 bytes each way -> pM/(8B), or the 2-link injection bound if larger."""
    if p <= 1:
        return 0.0
    return (p // 2) * link.latency + max(M * (p - 1) / p / (2 * link.bandwidth), p * M / (8 * link.bandwidth))


def torus_all_to_all(M: float, a: int, b: int, link: Link) -> float:
    """a x b torus (b >= a): the bisection cuts 2a links per direction, crossed by pM/4 bytes -> pM/(8aB);
    4-link injection bound; (a + b)/2 hops of latency."""
    p = a * b
    if p <= 1:
        return 0.0
    if a == 1:
        return ring_all_to_all(M, b, link)
    return ((a + b) // 2) * link.latency + max(M * (p - 1) / p / (4 * link.bandwidth), p * M / (8 * a * link.bandwidth))


# --- topology-aware choice ----------------------------------------------------------------------------------
def all_reduce(topo: Topology, M: float, p: int, stride: int = 1) -> Cost:
    """The cheapest of ring, tree and hierarchical (intra-node reduce-scatter, inter-node all-reduce on
    M/per_node, intra-node all-gather) for this group; 2D ring on a torus."""
    if p <= 1:
        return Cost(0.0, "none")
    link, per_node, nodes = topo.group_link(p, stride)
    options = [Cost(ring_all_reduce(M, p, link), "ring")]
    if topo.kind in SWITCHED:
        options.append(Cost(tree_all_reduce(M, p, link), "tree"))
    if topo.kind in SWITCHED and nodes > 1 and per_node > 1:
        inner = Link(topo.inter.bandwidth, topo.inter_latency(nodes))
        across = min(ring_all_reduce(M / per_node, nodes, inner), tree_all_reduce(M / per_node, nodes, inner))
        options.append(Cost(2 * ring_reduce_scatter(M, per_node, topo.intra) + across, "hierarchical"))
    if topo.kind == "torus2d":
        a, b = topo.torus_dims(p)
        if a > 1:
            options.append(Cost(2 * ring_reduce_scatter(M, b, topo.intra) + ring_all_reduce(M / b, a, topo.intra),
                                "2d-ring"))
    return min(options, key=lambda c: c.time)


def all_gather(topo: Topology, M: float, p: int, stride: int = 1) -> Cost:
    """Ring, or hierarchical (inter-node all-gather of M/per_node per rail, then intra-node)."""
    if p <= 1:
        return Cost(0.0, "none")
    link, per_node, nodes = topo.group_link(p, stride)
    options = [Cost(ring_all_gather(M, p, link), "ring")]
    if topo.kind in SWITCHED and nodes > 1 and per_node > 1:
        inner = Link(topo.inter.bandwidth, topo.inter_latency(nodes))
        options.append(Cost(ring_all_gather(M / per_node, nodes, inner) + ring_all_gather(M, per_node, topo.intra),
                            "hierarchical"))
    return min(options, key=lambda c: c.time)


reduce_scatter = all_gather  # the mirror image, same cost


def all_to_all(topo: Topology, M: float, p: int, stride: int = 1) -> Cost:
    """M bytes per device spread evenly over the group."""
    if p <= 1:
        return Cost(0.0, "none")
    if topo.kind == "ring":
        return Cost(ring_all_to_all(M, p, topo.intra), "ring", intra_bytes=M * (p - 1) / p)
    if topo.kind == "torus2d":
        return Cost(torus_all_to_all(M, *topo.torus_dims(p), topo.intra), "torus", intra_bytes=M * (p - 1) / p)
    per_node, nodes = topo.placement(p, stride)
    if nodes == 1:
        return Cost(direct_all_to_all(M, p, topo.intra), "direct", intra_bytes=M * (p - 1) / p)
    intra = M * (per_node - 1) / p
    inter = M * (p - per_node) / p
    if topo.kind == "multi-plane":  # a different rail's NIC is on another plane: forward over NVLink first
        intra += inter * (per_node - 1) / per_node
    t = topo.inter_latency(nodes) + max(intra / topo.intra.bandwidth, inter / topo.inter.bandwidth)
    return Cost(t, "direct", intra_bytes=intra, inter_bytes=inter)


def expected_nodes(top_k: int, nodes: int, node_limit: int | None = None) -> float:
    """Distinct nodes a token's top_k experts land on, experts spread uniformly over `nodes` nodes:
    n(1 - (1 - 1/n)^K), capped by node-limited routing (DeepSeek-V3: at most M = 4 nodes)."""
    d = nodes * (1 - (1 - 1 / nodes) ** top_k)
    return min(d, node_limit) if node_limit else d


def moe_all_to_all(topo: Topology, tokens: float, hidden: int, top_k: int, ep: int, bytes_per_elem: float,
                   stride: int = 1, node_limit: int | None = None, dedup: bool = True) -> Cost:
    """One MoE dispatch (or combine) for `tokens` tokens per device over an EP group of `ep` devices.

    DeepEP-style (dedup): a token crosses IB once per *destination node* (the expected distinct remote
    nodes, capped by node-limited routing), to the device with the same rail index there, which forwards
    it over NVLink to the experts' devices; IB and NVLink run concurrently, so the slower one counts.
    Without dedup every (token, expert) pair on a remote node is its own IB message.
    FP8 dispatch: bytes_per_elem 1 (+ per-128 scales if you like); BF16 combine: 2.
    """
    if ep <= 1:
        return Cost(0.0, "none")
    per_token = hidden * bytes_per_elem
    per_node, nodes = topo.placement(ep, stride)
    if topo.kind not in SWITCHED or nodes == 1:
        return all_to_all(topo, tokens * top_k * per_token, ep, stride)
    remote_nodes = (expected_nodes(top_k, nodes, node_limit) if dedup else top_k) * (nodes - 1) / nodes
    inter = tokens * remote_nodes * per_token
    intra = tokens * top_k * (per_node - 1) / per_node * per_token  # forwarding inside destination nodes
    t = topo.inter_latency(nodes) + max(intra / topo.intra.bandwidth, inter / topo.inter.bandwidth)
    return Cost(t, "dedup-forward" if dedup else "direct", intra_bytes=intra, inter_bytes=inter)


def p2p(topo: Topology, M: float, stride: int) -> Cost:
    """One pipeline send of M bytes to the rank `stride` away."""
    link = topo.intra if stride < topo.gpus_per_node or topo.kind not in SWITCHED else topo.inter
    return Cost(link.latency + M / link.bandwidth, "p2p")
