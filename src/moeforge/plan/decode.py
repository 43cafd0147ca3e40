"""Decode time per output token (TPOT): the EP-communication bound of "Insights into DeepSeek-V3"
(ISCA 2025, Sec. 2.3.2), and an HBM bound for comparison.

The paper's estimate, per MoE layer: each device holds 32 tokens; every token is sent to 9 experts
(8 routed + 1 shared) with FP8 dispatch (1 byte per hidden element) and returns with a BF16 combine
(2 bytes): (1 + 2) x 32 x 9 x hidden / bandwidth. Two micro-batches overlap compute with communication,
so a layer takes the communication of both; and the paper multiplies by all 61 layers. With hidden
rounded to 7K = 7000 that is 120.96 us -> 241.92 us/layer -> 14.76 ms at 50 GB/s (one 400 Gb/s IB NIC
per GPU), 6.72 us -> 0.82 ms on GB200 NVL72 at 900 GB/s. With the exact hidden 7168 the figures are
2.4% higher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .catalog import Hardware
from .models import ModelShape


def ep_bound_tpot(hidden: float, layers: int, bandwidth: float, tokens_per_device: int = 32,
                  experts_per_token: int = 9, dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                  microbatches: int = 2) -> float:
    """Seconds per output token when decode is bound by the EP all-to-all (the paper's formula)."""
    per_layer = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden / bandwidth
    return layers * microbatches * per_layer


@dataclass(frozen=True)
class Decode:
    tpot_s: float  # max of the bounds below
    ep_bound_s: float  # EP all-to-all bound (0 for dense models)
    hbm_bound_s: float  # reading this device's weights once per step
    bandwidth: float  # bytes/s used for EP
    link: str  # "nvlink" or "nic"
    tokens_per_device: int

    def to_json(self) -> dict:
        return asdict(self)


def decode_estimate(model: ModelShape, hw: Hardware, gpus: int, tokens_per_device: int = 32,
                    weight_bytes: float = 1.0) -> Decode:
    """TPOT for a decode deployment of `gpus` devices, weights in FP8 (weight_bytes=1).

    MoE: one expert group per device over the whole deployment (DeepSeek's serving layout: attention
    data-parallel, experts spread). The all-to-all stays on NVLink when the scale-up domain can hold the
    routed experts at <= 4 per device (GB200 NVL72: 72 x 4 >= 256), otherwise it crosses the NIC at its
    nominal rate (the paper's 50 GB/s). Dense models: tensor parallel over a node, HBM bound only.
    """
    if model.kind == "moe":
        in_domain = hw.gpus_per_node * 4 >= model.n_routed_experts
        bw, link = (hw.nvlink_bw, "nvlink") if in_domain else (hw.nic_bw_per_gpu, "nic")
        ep = min(gpus, hw.gpus_per_node) if in_domain else gpus
        ep_s = ep_bound_tpot(model.hidden_size, model.num_layers, bw, tokens_per_device,
                             model.experts_per_token + model.n_shared_experts)
        experts_here = model.routed_expert_params * model.moe_layers / max(1, min(ep, model.n_routed_experts))
        per_device = model.total_params - model.routed_expert_params * model.moe_layers + experts_here
        hbm_s = per_device * weight_bytes / hw.hbm_bw
    else:
        tp = min(hw.gpus_per_node, gpus)
        ep_s, bw, link = 0.0, hw.nvlink_bw, "nvlink"
        hbm_s = model.total_params * weight_bytes / tp / hw.hbm_bw
    return Decode(max(ep_s, hbm_s), ep_s, hbm_s, bw, link, tokens_per_device)
