"""What this device can do, probed once, so model code never branches on the device itself.

`probe(device)` answers: which device, whether bf16 autocast is fast there, whether
`torch._grouped_mm` and float8 `torch._scaled_mm` run, which distributed backend fits, and which
routed-expert kernel to use. `configure(model, caps)` applies those choices to a built model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Capabilities:
    device: str  # "cpu", "cuda:0", "mps"
    bf16: bool  # bf16 matmuls are faster than fp32 here (tensor cores, AMX, AVX512-BF16): "auto" picks bf16
    grouped_mm: bool  # torch._grouped_mm runs forward and backward here
    fp8_matmul: bool  # torch._scaled_mm accepts float8_e4m3fn operands here
    fused_attention: bool  # SDPA has a fused (flash-style) kernel here; MLA pads v to qualify
    dist_backend: str  # "nccl" on CUDA, else "gloo"
    expert_impl: str  # GroupedExperts kernel: grouped_mm | bmm
    attn_impl: str = "sdpa"  # MLA attention core: sdpa | eager
    fp8_gemm: str = "emulated"  # FP8 GEMM path (precision/gemm.py): blockwise | rowwise | emulated

    def summary(self) -> str:
        return (f"{self.device}: bf16 {'yes' if self.bf16 else 'no'}, grouped GEMM "
                f"{'yes' if self.grouped_mm else 'no'}, FP8 matmul {'yes' if self.fp8_matmul else 'no'}, fused "
                f"attention {'yes' if self.fused_attention else 'no'}, "
                f"experts via {self.expert_impl}, attention via {self.attn_impl}, FP8 GEMMs {self.fp8_gemm}, "
                f"collectives via {self.dist_backend}")


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this PyTorch build or machine has no CUDA GPU")
        return "cuda:0" if name == "cuda" else name
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available here")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"unknown device {name!r} (auto, cpu, cuda, mps)")
    return name


@lru_cache(maxsize=None)
def probe(device: str = "auto") -> Capabilities:
    dev = resolve_device(device)
    grouped = _runs(lambda: _try_grouped_mm(dev))
    fp8 = _runs(lambda: _try_scaled_mm(dev))
    fp8_gemm = _fp8_gemm_path(dev) if fp8 else "emulated"
    if dev.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
    elif dev == "cpu":
        bf16 = _bf16_matmul_is_faster_on_cpu()
    else:
        bf16 = False
    # grouped_mm computes each expert's real rows only; padded bmm pays for the busiest expert on all of
    # them (a 2x hot expert doubles its cost). Measured fastest on this CPU too (benchmarks/README.md).
    expert_impl = "grouped_mm" if grouped else "bmm"
    # On CPU the fused SDPA kernel does not use bf16 matmuls; baddbmm + softmax + bmm measured 1.1-1.2x
    # faster for a whole step at T=256 (benchmarks/README.md). Its memory grows with T^2: see configure.
    attn_impl = "eager" if dev == "cpu" else "sdpa"
    fused = dev == "cpu" or (dev.startswith("cuda") and torch.backends.cuda.flash_sdp_enabled())
    return Capabilities(device=dev, bf16=bf16, grouped_mm=grouped, fp8_matmul=fp8, fused_attention=fused,
                        dist_backend="nccl" if dev.startswith("cuda") else "gloo", expert_impl=expert_impl,
                        attn_impl=attn_impl, fp8_gemm=fp8_gemm)


EAGER_ATTENTION_MAX_SEQ = 2048  # beyond this the [B*H, T, T] score tensor outweighs eager's speed


def configure(model: torch.nn.Module, caps: Capabilities, seq_len: int | None = None) -> torch.nn.Module:
    """Point every routed-expert module and attention core at the kernels chosen for this device
    (`seq_len`, when known, keeps long sequences on SDPA, which never materialises T x T scores)."""
    from .model.mla import MLA
    from .model.moe import GroupedExperts

    attn = caps.attn_impl
    if attn == "eager" and seq_len is not None and seq_len > EAGER_ATTENTION_MAX_SEQ:
        attn = "sdpa"
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.impl = caps.expert_impl
        elif isinstance(module, MLA):
            module.attn_impl = attn
    return model


def resolve_precision(precision: str, caps: Capabilities) -> str:
    """`auto` -> bf16 where bf16 matmuls are fast here (caps.bf16), else fp32; other values unchanged.
    A training run resolves it once and writes the result to its config.toml (docs/training.md)."""
    if precision != "auto":
        return precision
    return "bf16" if caps.bf16 else "fp32"


def autocast_dtype(precision: str, caps: Capabilities) -> torch.dtype | None:
    """None = plain fp32; else the autocast dtype for `precision` in auto | fp32 | bf16 | fp8*."""
    if resolve_precision(precision, caps) == "fp32":
        return None
    return torch.bfloat16


def _runs(fn) -> bool:
    try:
        fn()
        return True
    except Exception:  # any failure means "not usable here"
        return False


def _bf16_matmul_is_faster_on_cpu() -> bool:
    """From the CPU's instruction set, not a timing: AMX and AVX512-BF16 make bf16 matmuls faster than
    fp32; without them oneDNN emulates bf16 (measured 30-45x slower than fp32 on an AVX2 EPYC). A timing
    (what this used to do) differs from process to process on a busy machine, so ranks of one job or a
    resumed run could pick different precisions."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())


def _try_grouped_mm(dev: str) -> None:
    dtype = torch.bfloat16
    x = torch.randn(32, 16, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 16, 16, device=dev, dtype=dtype, requires_grad=True)
    offs = torch.tensor([16, 32], device=dev, dtype=torch.int32)
    torch._grouped_mm(x, w, offs=offs).square().sum().backward()


def _fp8_gemm_path(dev: str) -> str:
    """torch's native 1x128 x 128x128 scaled GEMM where it runs and matches the emulation; else, on CUDA,
    row-wise scaled GEMMs over 128-wide K slices; else the emulation (precision/gemm.py). Not row-wise on
    CPU: torch's CPU `_scaled_mm` dequantises to fp32 and runs an fp32 matmul, the emulation's own
    arithmetic, so slicing K only adds calls (measured slower, benchmarks/fp8_step.py)."""
    from .precision.gemm import BLOCKWISE, EMULATED, ROWWISE, check_backend

    paths = (BLOCKWISE, ROWWISE) if dev.startswith("cuda") else (BLOCKWISE,)
    return next((b for b in paths if _runs(lambda: check_backend(b, dev))), EMULATED)


def _try_scaled_mm(dev: str) -> None:
    a = torch.randn(16, 32, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(16, 32, device=dev).to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device=dev)
    torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
