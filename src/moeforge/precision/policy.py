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

The trainer feeds it only the steps it applies: a skipped (non-finite) step or a measurement pass
(activation-checkpointing planning, memory profiling) is `discard`ed. In a distributed run the trainer
passes `reduce_max`, an all-reduce (max) over the ranks holding the same modules, so every rank reads
the same worst-case statistics and makes the same switches. `state_dict` / `load_state_dict` carry the
histories, counters and each layer's mode through a checkpoint (an exact resume).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
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

    def _pop_stats(self, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, dict]:
        """Every module's statistics of this step, as lists (None where a GEMM did not run), reduced by
        `reduce_max` in one call: [modules, act/grad, 4] with -1 for "did not run" (all values are >= 0)."""
        missing = [-1.0] * len(LayerStats.FIELDS)
        popped = {name: module.stats.pop() for name, module in self.modules.items()}
        if reduce_max is None:
            return popped
        table = torch.tensor([[s[kind] if s[kind] is not None else missing for kind in ("act", "grad")]
                              for s in popped.values()], dtype=torch.float64)
        table = reduce_max(table).tolist()
        return {name: {kind: (row[k] if row[k][0] >= 0 else None) for k, kind in enumerate(("act", "grad"))}
                for name, row in zip(popped, table)}

    def discard(self) -> None:
        """Forget the statistics recorded since the last step (a skipped step, a measurement pass)."""
        for module in self.modules.values():
            module.stats.pop()

    def step(self, step: int, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
        """Read this step's statistics, update histories, switch layers; returns the switches made."""
        switches = []
        for name, stats in self._pop_stats(reduce_max).items():
            module = self.modules[name]
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

    def state_dict(self) -> dict:
        """Everything the next decisions depend on, as plain lists and numbers (checkpoint-safe)."""
        return {name: {"fp8": bool(module.fp8), "bad": self.bad[name], "good": self.good[name],
                       "act": list(self.history[name]["act"]), "grad": list(self.history[name]["grad"])}
                for name, module in self.modules.items()}

    def load_state_dict(self, state: dict) -> None:
        differ = sorted(set(state) ^ set(self.modules))
        if differ:
            raise ValueError(f"its FP8 layers are not this model's ({len(differ)} differ, e.g. {differ[0]})")
        for name, s in state.items():
            module = self.modules[name]
            module.fp8, self.bad[name], self.good[name] = bool(s["fp8"]), int(s["bad"]), int(s["good"])
            for kind in ("act", "grad"):
                history = self.history[name][kind]
                history.clear()
                history.extend(float(v) for v in s[kind])
                module.stats.ref_amax[kind] = max(history) if history else None

    def fp8_fraction(self) -> float:
        return sum(m.fp8 for m in self.modules.values()) / len(self.modules)
