"""Hardware catalogue: accelerators and the nodes they come in, as data (user-extendable with TOML).

Units are the ones datasheets use, converted once in properties: TFLOPS dense (no 2:4 sparsity), GB
(1e9 bytes) of HBM, TB/s of HBM bandwidth, GB/s of NVLink *per direction* (datasheets quote the
bidirectional sum; we halve it), NICs as count x Gb/s, PCIe GB/s per direction. Every number cites its
source. The local CPU is not listed: it is measured (`plan.calibrate.local_hardware`).

A user TOML file adds or overrides entries:

    [hardware.my-h100-roce]
    base = "h100"            # optional: start from a catalogue entry
    nic_latency_us = 3.6     # RoCE same-leaf latency (Insights into DeepSeek-V3, Sec. 5)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and the node (scale-up domain) it is sold in."""

    name: str
    bf16_tflops: float  # dense BF16 tensor-core peak per device
    fp8_tflops: float  # dense FP8 peak per device; 0 = no FP8 tensor cores (FP8 runs at the BF16 rate)
    hbm_gb: float  # device memory, 1e9 bytes
    hbm_tbps: float  # device memory bandwidth, 1e12 bytes/s
    nvlink_gbps: float  # scale-up bandwidth per device per direction, 1e9 bytes/s
    gpus_per_node: int  # devices behind one NVSwitch domain
    nics_per_node: int  # scale-out NICs per node
    nic_gbits: float  # Gb/s per NIC
    pcie_gbps: float  # host link per device per direction, 1e9 bytes/s
    nvlink_latency_us: float = 3.33  # 64-byte latency, H800 (Insights into DeepSeek-V3, Sec. 5.1)
    nic_latency_us: float = 2.8  # IB same leaf; cross leaf 3.7 (same source)
    nvlink_efficiency: float = 0.8  # achieved/peak: H800 ~160 of 200 GB/s one way (Insights, Sec. 4)
    nic_efficiency: float = 0.8  # ~40 of 50 GB/s per 400 Gb/s IB NIC (Insights, Sec. 4)
    mxfp8: bool = False  # OCP microscaling FP8 in the tensor cores (Blackwell), at the FP8 rate
    # streaming multiprocessors (vendor whitepapers); 0 = unknown: SM-driven communication kernels then
    # cost the overlapped compute nothing (steptime.py: `comm_sm_time`)
    sm_count: int = 0
    note: str = ""

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    def matmul_flops(self, precision: str) -> float:
        """Peak for matmuls in `precision` (fp8 falls back to the BF16 rate without FP8 tensor cores;
        mxfp8 needs hardware block scaling: NVIDIA Blackwell runs MXFP8 at its dense FP8 rate, per the
        Blackwell architecture technical brief's 2nd-generation Transformer Engine)."""
        if precision == "mxfp8":
            if not self.mxfp8:
                raise ConfigError(f"{self.name} has no MXFP8 tensor cores (Blackwell: b200, gb200-nvl72); "
                                  "use precision fp8 (software block scales) or bf16")
            return self.fp8_tflops * 1e12
        if precision == "fp8" and self.fp8_tflops > 0:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def hbm_bw(self) -> float:
        return self.hbm_tbps * 1e12

    @property
    def nvlink_bw(self) -> float:
        """Nominal scale-up bytes/s per device per direction."""
        return self.nvlink_gbps * 1e9

    @property
    def nic_bw_per_gpu(self) -> float:
        """Nominal scale-out bytes/s per device (node NIC bandwidth shared by its devices)."""
        return self.nics_per_node * self.nic_gbits / 8 * 1e9 / self.gpus_per_node


# H100 SXM datasheet, dense (half the sparse figure); 132 SMs (NVIDIA H100 Tensor Core GPU Architecture
# whitepaper, SXM5; H800 and H200 share the die and its SM count: the V3 report, Sec. 3.5.1, "132 SMs")
_HOPPER = dict(bf16_tflops=989.4, fp8_tflops=1978.9, sm_count=132)

CATALOG: dict[str, Hardware] = {h.name: h for h in [
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS BF16 dense, no FP8, 2,039 GB/s, NVLink3 600 GB/s
    # bidirectional; DGX A100: 8 GPUs, 8x 200 Gb/s HDR ConnectX-6 compute NICs; PCIe Gen4 x16 ~32 GB/s;
    # 108 SMs (NVIDIA A100 Tensor Core GPU Architecture whitepaper).
    Hardware("a100", bf16_tflops=312, fp8_tflops=0, sm_count=108, hbm_gb=80, hbm_tbps=2.039, nvlink_gbps=300,
             gpus_per_node=8, nics_per_node=8, nic_gbits=200, pcie_gbps=32, note="A100 SXM4 80GB, DGX A100 node"),
    # NVIDIA H100 datasheet (SXM5): 989 TFLOPS BF16 / 1,979 FP8 dense, 80 GB HBM3 at 3.35 TB/s, NVLink4
    # 900 GB/s bidirectional; DGX H100: 8x 400 Gb/s ConnectX-7; PCIe Gen5 x16 ~64 GB/s.
    Hardware("h100", **_HOPPER, hbm_gb=80, hbm_tbps=3.35, nvlink_gbps=450, gpus_per_node=8, nics_per_node=8,
             nic_gbits=400, pcie_gbps=64, note="H100 SXM5, DGX H100 node"),
    # H800 = H100 SXM compute with NVLink cut to 400 GB/s bidirectional; DeepSeek's nodes carry eight
    # 400 Gb/s IB NICs (Insights into DeepSeek-V3, Sec. 2.2 and 4; DeepSeek-V3 report Sec. 3.1).
    Hardware("h800", **_HOPPER, hbm_gb=80, hbm_tbps=3.35, nvlink_gbps=200, gpus_per_node=8, nics_per_node=8,
             nic_gbits=400, pcie_gbps=64, note="H800 SXM (DeepSeek's training cluster)"),
    # H20 (China SKU): 148 TFLOPS BF16 / 296 FP8 dense, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s
    # bidirectional (NVIDIA HGX H20 product brief as reported by SemiAnalysis, Nov 2023).
    Hardware("h20", bf16_tflops=148, fp8_tflops=296, hbm_gb=96, hbm_tbps=4.0, nvlink_gbps=450, gpus_per_node=8,
             nics_per_node=8, nic_gbits=400, pcie_gbps=64, note="H20 HGX node"),
    # NVIDIA H200 datasheet (SXM): H100 compute, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional;
    # DGX H200: 8x 400 Gb/s ConnectX-7.
    Hardware("h200", **_HOPPER, hbm_gb=141, hbm_tbps=4.8, nvlink_gbps=450, gpus_per_node=8, nics_per_node=8,
             nic_gbits=400, pcie_gbps=64, note="H200 SXM, DGX H200 node"),
    # NVIDIA DGX B200 datasheet: 72 PFLOPS FP8 training (sparse) for 8 GPUs -> 4.5 PF FP8 / 2.25 PF BF16
    # dense per GPU, 1,440 GB HBM3e total (180 GB/GPU) at 64 TB/s (8 TB/s/GPU), NVLink5 1.8 TB/s
    # bidirectional, 8x 400 Gb/s ConnectX-7; PCIe Gen5. 148 SMs enabled (the device's multiprocessor count;
    # GB200's GPUs are the same B200).
    Hardware("b200", bf16_tflops=2250, fp8_tflops=4500, sm_count=148, hbm_gb=180, hbm_tbps=8.0, nvlink_gbps=900,
             gpus_per_node=8, nics_per_node=8, nic_gbits=400, pcie_gbps=64, mxfp8=True, note="B200, DGX B200 node"),
    # NVIDIA GB200 NVL72 datasheet: 72 GPUs in one NVLink domain; 360 PF BF16 / 720 PF FP8 (sparse) ->
    # 2.5 PF BF16 / 5 PF FP8 dense per GPU; 13.4 TB HBM3e (186 GB/GPU) at 576 TB/s (8 TB/s/GPU); NVLink5
    # 1.8 TB/s bidirectional = 900 GB/s per direction (the figure the Insights paper uses, Sec. 2.3.2);
    # one 400 Gb/s ConnectX-7 per GPU for scale-out; Grace-Blackwell NVLink-C2C instead of PCIe (450 GB/s).
    Hardware("gb200-nvl72", bf16_tflops=2500, fp8_tflops=5000, sm_count=148, hbm_gb=186, hbm_tbps=8.0, nvlink_gbps=900,
             gpus_per_node=72, nics_per_node=72, nic_gbits=400, pcie_gbps=450, mxfp8=True, note="GB200 NVL72 rack"),
]}

ALIASES = {"h100-sxm": "h100", "gb200": "gb200-nvl72", "nvl72": "gb200-nvl72"}
LOCAL = "cpu"  # measured, see plan.calibrate


def hardware_names(extra: dict[str, Hardware] | None = None) -> list[str]:
    return [*CATALOG, *(extra or {}), LOCAL]


def get_hardware(name: str, extra: dict[str, Hardware] | None = None) -> Hardware:
    """Look a name up in the user's entries, then the catalogue; 'cpu' measures this machine."""
    key = name.lower()
    if extra and key in extra:
        return extra[key]
    key = ALIASES.get(key, key)
    if key in CATALOG:
        return CATALOG[key]
    if key == LOCAL:
        from .calibrate import local_hardware

        return local_hardware()
    raise ConfigError(f"unknown hardware {name!r}; choose one of: {', '.join(hardware_names(extra))}")


def load_catalog(path: str | Path) -> dict[str, Hardware]:
    """Read [hardware.NAME] tables from a TOML file; `base = "h100"` starts from a catalogue entry."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hardware file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    tables = data.get("hardware")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: expected one or more [hardware.NAME] tables")
    known = {f.name for f in fields(Hardware)} - {"name"}
    out: dict[str, Hardware] = {}
    for name, table in tables.items():
        table = dict(table)
        base_name = table.pop("base", None)
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{path}: [hardware.{name}] unknown field(s) {', '.join(unknown)}; "
                              f"valid: base, {', '.join(sorted(known))}")
        if base_name is not None:
            hw = replace(get_hardware(base_name, out), name=name.lower(), **table)
        else:
            required = [f.name for f in fields(Hardware) if f.default is dataclasses.MISSING and f.name != "name"]
            missing = [k for k in required if k not in table]
            if missing:
                raise ConfigError(f"{path}: [hardware.{name}] needs {', '.join(missing)} (or base = NAME)")
            hw = Hardware(name=name.lower(), **table)
        if min(hw.bf16_tflops, hw.hbm_gb, hw.hbm_tbps, hw.gpus_per_node) <= 0:
            raise ConfigError(f"{path}: [hardware.{name}] bf16_tflops, hbm_gb, hbm_tbps, gpus_per_node must be > 0")
        out[hw.name] = hw
    return out
