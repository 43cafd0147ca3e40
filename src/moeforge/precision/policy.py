"""Dynamic precision: switch each FP8 module between FP8 and BF16 from its own statistics.

DeepSeek's "Insights" paper wishes for hardware that picks precision from gradient statistics; this
does it in software, once per optimizer step. Every FP8 module records, per step, the worst over its
GEMMs of: amax, the fraction of non-zero values that underflow to 0 in FP8, the fraction that would
saturate under delayed scaling (above the largest amax of the recent history), and the relative RMS
quantisation error, for activations and output gradients (`modules.LayerStats`).

Rule, with hysteresis so a layer does not flap: a layer in FP8 goes to BF16 after `patience`
consecutive bad steps (any statistic above its `high` threshold); a layer in BF16 goes back after
`patience` consecutive good steps (all at or below the `low` thresholds). A layer in BF16 still measures
what FP8 would have done, so it can come back. Every switch is returned for the metrics log.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import nn

from .modules import LayerStats
from .recipe import fp8_modules


@dataclass
class PolicyThresholds:
    underflow_high: float = 0.05  # fraction of non-zero values flushed to zero
    underflow_low: float = 0.01
    saturation_high: float = 0.05  # fraction above the amax history (delayed scaling would clip them;
    saturation_low: float = 0.01  # just-in-time scaling, used here, never does: a distribution-shift alarm)
    error_high: float = 0.15  # relative RMS quantisation error (E4M3 on Gaussian data: ~0.025)
    error_low: float = 0.08
    patience: int = 2
    history: int = 16


class DynamicPrecisionPolicy:
    def __init__(self, model: nn.Module, thresholds: PolicyThresholds | None = None):
        self.t = thresholds or PolicyThresholds()
        self.modules = dict(fp8_modules(model))
        if not self.modules:
            raise ValueError("no FP8 modules in the model: apply an FP8 recipe first")
        for module in self.modules.values():
            module.stats = LayerStats()
        self.history = {name: {"act": deque(maxlen=self.t.history), "grad": deque(maxlen=self.t.history)}
                        for name in self.modules}
        self.bad = dict.fromkeys(self.modules, 0)
        self.good = dict.fromkeys(self.modules, 0)
        self.last: dict[str, dict] = {}

    def _verdict(self, stats: dict) -> tuple[str, str]:
        """'bad' (with a reason), 'good' or 'between' for one step's statistics."""
        t, worst = self.t, {"underflow": 0.0, "saturation": 0.0, "error": 0.0}
        for kind in ("act", "grad"):
            if stats[kind] is None:
                continue
            amax, under, sat, err = stats[kind]
            for key, value in (("underflow", under), ("saturation", sat), ("error", err)):
                if value > worst[key]:
                    worst[key] = value
        highs = {"underflow": t.underflow_high, "saturation": t.saturation_high, "error": t.error_high}
        lows = {"underflow": t.underflow_low, "saturation": t.saturation_low, "error": t.error_low}
        for key, value in worst.items():
            if value > highs[key]:
                return "bad", f"{key} {value:.3g} > {highs[key]}"
        if all(worst[k] <= lows[k] for k in worst):
            return "good", ""
        return "between", ""

    def step(self, step: int) -> list[dict]:
        """Read this step's statistics, update histories, switch layers; returns the switches made."""
        switches = []
        for name, module in self.modules.items():
            stats = module.stats.pop()
            self.last[name] = stats
            for kind in ("act", "grad"):
                if stats[kind] is not None:
                    self.history[name][kind].append(stats[kind][0])
                    module.stats.ref_amax[kind] = max(self.history[name][kind])
            verdict, reason = self._verdict(stats)
            self.bad[name] = self.bad[name] + 1 if verdict == "bad" else 0
            self.good[name] = self.good[name] + 1 if verdict == "good" else 0
            if module.fp8 and self.bad[name] >= self.t.patience:
                module.fp8, self.bad[name] = False, 0
                switches.append({"step": step, "layer": name, "to": "bf16", "reason": reason})
            elif not module.fp8 and self.good[name] >= self.t.patience:
                module.fp8, self.good[name] = True, 0
                switches.append({"step": step, "layer": name, "to": "fp8", "reason": "statistics back in range"})
        return switches

    def fp8_fraction(self) -> float:
        return sum(m.fp8 for m in self.modules.values()) / len(self.modules)
