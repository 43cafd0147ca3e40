"""Precision, applied to a plain model from outside: fine-grained FP8 training (DeepSeek-V3 sec. 3.3),
the LogFMT communication codec (DeepSeek "Insights" sec. 3), AdamW with BF16 moments, and a dynamic
per-layer FP8/BF16 policy. See docs/precision.md."""

from __future__ import annotations

from torch import nn

from .logfmt import LogFmtPayload, logfmt_decode, logfmt_encode
from .modules import Fp8GroupedExperts, Fp8Linear, Fp8Spec, LayerStats
from .optim import AdamWBF16Moments, optimizer_state_bytes
from .policy import DynamicPrecisionPolicy, PolicyThresholds
from .quant import BLOCK, E4M3, E5M2, TENSOR, TILE, NonFiniteTensorError, Quantized, quantize, quantize_row_tiles
from .recipe import RECIPES, Fp8Recipe, apply_fp8, fp8_modules, get_recipe

__all__ = ["AdamWBF16Moments", "BLOCK", "DynamicPrecisionPolicy", "E4M3", "E5M2", "Fp8GroupedExperts",
           "Fp8Linear", "Fp8Recipe", "Fp8Spec", "LayerStats", "LogFmtPayload", "NonFiniteTensorError",
           "PolicyThresholds", "Quantized", "RECIPES", "TENSOR", "TILE", "apply_fp8", "apply_training_precision",
           "fp8_modules", "get_recipe", "logfmt_decode", "logfmt_encode", "optimizer_state_bytes", "quantize",
           "quantize_row_tiles"]


def apply_training_precision(model: nn.Module, precision: str, policy: bool = False,
                             fp8_gemm: str | None = None) -> DynamicPrecisionPolicy | None:
    """The trainer's hook, after hardware.configure: for --precision fp8 / fp8-tensorwise swap in the FP8
    modules (the rest of the model runs under the trainer's bf16 autocast), their GEMMs on `fp8_gemm`
    (the device's probed path, `hardware.Capabilities.fp8_gemm`; None: the emulation); returns the
    dynamic policy when asked for, else None."""
    if not precision.startswith("fp8"):
        return None
    apply_fp8(model, get_recipe(precision), backend=fp8_gemm)
    return DynamicPrecisionPolicy(model) if policy else None
