"""Redundant expert placement: replicate hot experts and pack replicas onto devices (the idea of
DeepSeek's EPLB, written from its description in shared/reference/deepseek-v3-facts.md).

Given per-layer expert loads, S physical slots on D devices (S / D slots each) in N nodes:
1. Hierarchical, when expert groups divide evenly over nodes: pack whole groups onto nodes so node
   loads are even (group-limited routing then keeps a token's traffic mostly inside few nodes).
2. Inside each node (or globally), repeatedly give one more replica to the expert with the highest
   load per replica, until the node's slots are used.
3. Pack replicas onto the node's devices: heaviest first, each into the least-loaded device that still
   has a free slot; then, while swapping two replicas lowers the busiest device's load, swap.
Quality: balancedness = mean device load / max device load (1.0 is perfect).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class Placement:
    phy2log: np.ndarray  # [L, S] logical expert held by each physical slot
    logcnt: np.ndarray  # [L, E] replicas per logical expert
    device_load: np.ndarray  # [L, D] predicted load per device (expert load split evenly over replicas)

    @property
    def log2phy(self) -> list[list[list[int]]]:
        """[L][E] -> the physical slots holding that expert."""
        out = [[[] for _ in range(self.logcnt.shape[1])] for _ in range(self.phy2log.shape[0])]
        for layer, row in enumerate(self.phy2log):
            for slot, expert in enumerate(row):
                out[layer][int(expert)].append(slot)
        return out

    def balancedness(self) -> np.ndarray:
        return self.device_load.mean(axis=1) / np.maximum(self.device_load.max(axis=1), 1e-12)

    def to_json(self) -> dict:
        return {"phy2log": self.phy2log.tolist(), "logcnt": self.logcnt.tolist(),
                "log2phy": self.log2phy, "device_load": self.device_load.round(6).tolist(),
                "balancedness": self.balancedness().round(6).tolist()}


def balanced_packing(weights: np.ndarray, n_packs: int) -> np.ndarray:
    """Assign len(weights) items to n_packs packs of equal item count, heaviest first into the
    lightest pack with room. Returns the pack of each item."""
    n = len(weights)
    per_pack = n // n_packs
    pack_of = np.empty(n, dtype=np.int64)
    heap = [(0.0, p) for p in range(n_packs)]  # (load, pack) of packs with room
    fill = [0] * n_packs
    for item in np.argsort(-weights, kind="stable"):
        load, pack = heapq.heappop(heap)
        pack_of[item] = pack
        fill[pack] += 1
        if fill[pack] < per_pack:
            heapq.heappush(heap, (load + float(weights[item]), pack))
    return pack_of


def refine_by_swaps(weights: np.ndarray, pack_of: np.ndarray, n_packs: int, max_rounds: int = 1000) -> np.ndarray:
    """Improve a packing: while swapping an item of the heaviest pack with an item elsewhere lowers the
    heaviest pack's load, make the best such swap (pack sizes never change)."""
    pack_of = pack_of.copy()
    for _ in range(max_rounds):
        loads = np.bincount(pack_of, weights=weights, minlength=n_packs)
        top = int(loads.argmax())
        mine, others = np.flatnonzero(pack_of == top), np.flatnonzero(pack_of != top)
        if len(others) == 0:
            break
        delta = weights[mine][:, None] - weights[others][None, :]  # load moved off the top pack
        new_peak = np.maximum(loads[top] - delta, loads[pack_of[others]][None, :] + delta)
        i, j = np.unravel_index(new_peak.argmin(), new_peak.shape)
        if new_peak[i, j] >= loads[top] - 1e-12 * max(loads[top], 1.0):
            break
        pack_of[mine[i]], pack_of[others[j]] = pack_of[others[j]], top
    return pack_of


def replicate(load: np.ndarray, n_slots: int) -> np.ndarray:
    """Replica counts [E] summing to n_slots: each extra slot goes to the highest load per replica."""
    counts = np.ones(len(load), dtype=np.int64)
    heap = [(-float(w), e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(n_slots - len(load)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def plan_placement(loads, n_slots: int, n_groups: int = 1, n_nodes: int = 1, n_devices: int = 1,
                   policy: str = "auto") -> Placement:
    """Placement for a load matrix [layers, experts] (see module docstring for the algorithm).

    policy: "hierarchical" (groups kept within nodes; needs nodes to divide groups), "global" (any
    expert on any device), or "auto": per layer, hierarchical unless it is more than 3% less balanced
    than global (locality is worth a little imbalance, not a lot).
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim == 1:
        loads = loads[None]
    if loads.ndim != 2 or loads.shape[1] == 0:
        raise ConfigError(f"loads must be a [layers][experts] matrix, got shape {loads.shape}")
    if (loads < 0).any() or not np.isfinite(loads).all():
        raise ConfigError("loads must be finite and non-negative")
    L, E = loads.shape
    checks = [(n_slots >= E, f"slots ({n_slots}) must be >= experts ({E})"),
              (n_devices >= 1 and n_slots % n_devices == 0, f"devices ({n_devices}) must divide slots ({n_slots})"),
              (n_nodes >= 1 and n_devices % n_nodes == 0, f"nodes ({n_nodes}) must divide devices ({n_devices})"),
              (n_groups >= 1 and E % n_groups == 0, f"groups ({n_groups}) must divide experts ({E})"),
              (policy in ("auto", "hierarchical", "global"), f"policy must be auto, hierarchical or global, "
                                                              f"got {policy!r}")]
    can_nest = n_nodes > 1 and n_groups % n_nodes == 0
    checks.append((policy != "hierarchical" or can_nest,
                   f"hierarchical placement needs nodes ({n_nodes}) > 1 dividing groups ({n_groups})"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    phy2log = np.empty((L, n_slots), dtype=np.int64)
    logcnt = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        options = []
        if policy != "global" and can_nest:
            options.append(_place(loads[layer], n_slots, n_groups, n_nodes, n_devices))
        if policy != "hierarchical":
            options.append(_place(loads[layer], n_slots, 1, 1, n_devices))
        if len(options) == 2 and _balancedness(loads[layer], *options[0], n_devices) < \
                0.97 * _balancedness(loads[layer], *options[1], n_devices):
            options.pop(0)
        phy2log[layer], logcnt[layer] = options[0]
    per_replica = loads / logcnt
    slot_load = np.take_along_axis(per_replica, phy2log, axis=1)
    return Placement(phy2log=phy2log, logcnt=logcnt, device_load=slot_load.reshape(L, n_devices, -1).sum(axis=2))


def _place(load: np.ndarray, n_slots: int, n_groups: int, nodes: int, n_devices: int):
    """One layer: groups packed onto nodes (when nodes > 1), then replication and packing per node."""
    E = len(load)
    group_size = E // n_groups
    node_of_group = balanced_packing(load.reshape(n_groups, group_size).sum(axis=1), nodes)
    slots_per_node, devices_per_node = n_slots // nodes, n_devices // nodes
    phy2log, logcnt = np.empty(n_slots, dtype=np.int64), np.zeros(E, dtype=np.int64)
    for node in range(nodes):
        groups = np.flatnonzero(node_of_group == node)
        experts = (groups[:, None] * group_size + np.arange(group_size)).ravel()
        counts = replicate(load[experts], slots_per_node)
        replica_expert = np.repeat(experts, counts)
        replica_load = np.repeat(load[experts] / counts, counts)
        device = refine_by_swaps(replica_load, balanced_packing(replica_load, devices_per_node), devices_per_node)
        order = np.lexsort((-replica_load, device))  # slots grouped by device, heaviest first
        phy2log[node * slots_per_node:(node + 1) * slots_per_node] = replica_expert[order]
        logcnt[experts] = counts
    return phy2log, logcnt


def _balancedness(load, phy2log, logcnt, n_devices) -> float:
    device = (load / logcnt)[phy2log].reshape(n_devices, -1).sum(axis=1)
    return float(device.mean() / max(device.max(), 1e-12))


def unreplicated(loads, n_devices: int) -> Placement:
    """The baseline: expert e on device e // (E / D), no replicas."""
    loads = np.asarray(loads, dtype=np.float64)
    L, E = loads.shape
    if E % n_devices:
        raise ConfigError(f"devices ({n_devices}) must divide experts ({E})")
    phy2log = np.tile(np.arange(E), (L, 1))
    return Placement(phy2log=phy2log, logcnt=np.ones((L, E), dtype=np.int64),
                     device_load=loads.reshape(L, n_devices, -1).sum(axis=2))
