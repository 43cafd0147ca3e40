"""A measured memory breakdown of training steps: parameters, gradients, optimizer states, activations
(per module type and per layer), process peak RSS, and on CUDA the allocator's peak and fragmentation.

Sizes of parameters, gradients and optimizer states are summed over distinct storages. Activations are
what autograd keeps for backward at the end of the forward (ActivationRecorder). CPU: peak RSS is the
whole process's high-water mark (data, tokenizer and allocator caches included; glibc arenas can
inflate it a lot, see docs/memory.md). CUDA: torch.cuda.max_memory_allocated/reserved over the profiled
step; reserved minus allocated at peak is memory the caching allocator holds but cannot use.
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from .heap import PeakHeap, live_heap_bytes
from .profiler import ActivationRecorder

MiB = 2**20


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def peak_rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def malloc_trim() -> bool:
    """Give glibc's free heap memory back to the OS (a no-op elsewhere). True if anything was released."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


@dataclass
class MemoryReport:
    device: str
    tokens_per_micro_batch: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_by_type: dict
    activations_by_layer: dict
    step_peak_heap: int | None = None  # CPU: most live heap bytes above the step's start (glibc mallinfo2)
    peak_rss: int | None = None
    rss_after_trim: int | None = None
    cuda: dict = field(default_factory=dict)  # max_allocated, max_reserved, fragmentation, other

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer states", self.optimizer), ("activations (saved for backward)", self.activations)]
        lines = [f"memory per micro-batch of {self.tokens_per_micro_batch:,} tokens on {self.device}"]
        lines += [f"  {name:<34}{b / MiB:>10.2f} MiB" for name, b in rows]
        lines.append(f"  {'sum':<34}{sum(b for _, b in rows) / MiB:>10.2f} MiB")
        lines.append("  activations by module type:")
        lines += [f"    {k:<32}{v / MiB:>10.2f} MiB" for k, v in self.activations_by_type.items()]
        lines.append("  activations by layer ('-' = outside blocks: embedding, head, loss):")
        lines += [f"    {k:<32}{v / MiB:>10.2f} MiB" for k, v in self.activations_by_layer.items()]
        if self.cuda:
            c = self.cuda
            lines.append(f"  CUDA peak allocated {c['max_allocated'] / MiB:.1f} MiB, reserved {c['max_reserved'] / MiB:.1f}"
                         f" MiB, fragmentation (reserved - allocated) {c['fragmentation'] / MiB:.1f} MiB, "
                         f"temporaries and workspaces ~{c['other'] / MiB:.1f} MiB")
        if self.step_peak_heap is not None:
            lines.append(f"  CPU step peak (live heap above the step's start: activations, gradients, temporaries) "
                         f"{self.step_peak_heap / MiB:.2f} MiB")
        if self.peak_rss is not None:
            trim = f"; RSS now, after malloc_trim: {self.rss_after_trim / MiB:.0f} MiB" if self.rss_after_trim else ""
            lines.append(f"  process peak RSS {self.peak_rss / MiB:.0f} MiB{trim}")
        return "\n".join(lines)


class MemoryProbe:
    """Wraps a forward callable and an optimizer to measure one training step (the armed one)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.armed, self.grad_bytes, self.profile, self.heap = False, 0, None, None
        self.device = next(model.parameters()).device
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        grads = tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        self.grad_bytes = max(self.grad_bytes, grads)

    def wrap(self, forward):
        def run(input_ids, *args, **kwargs):
            if not self.armed:
                return forward(input_ids, *args, **kwargs)
            with ActivationRecorder(self.model) as rec:
                out = forward(input_ids, *args, **kwargs)
            self.profile = rec.profile(tokens=input_ids.numel())
            return out

        return run

    def arm(self):
        """Measure the next step; returns a context to run that whole step in (the CPU heap-peak sampler)."""
        self.armed = True
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return nullcontext()
        self.heap = PeakHeap() if live_heap_bytes() is not None else None
        return self.heap or nullcontext()

    def report(self) -> MemoryReport:
        p = self.profile
        if p is None:
            raise RuntimeError("no profiled step: call arm() before a training step")
        params = tensor_bytes(self.model.parameters())
        opt = optimizer_state_bytes(self.optimizer)
        cuda = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            cuda = {"max_allocated": alloc, "max_reserved": reserved, "fragmentation": reserved - alloc,
                    "other": max(0, alloc - params - self.grad_bytes - opt - p.total_bytes)}
        trimmed = None
        if self.device.type == "cpu":
            malloc_trim()
            trimmed = current_rss_bytes()
        heap = self.heap
        return MemoryReport(str(self.device), p.tokens, params, self.grad_bytes, opt, p.total_bytes, p.by_type(),
                            p.by_layer(), heap.peak if heap is not None else None, peak_rss_bytes(), trimmed, cuda)


def profile_trainer(trainer, steps: int = 3) -> MemoryReport:
    """Run `steps` training steps of a Trainer, measuring the last; print the table, save memory.json."""
    probe = MemoryProbe(trainer.model, trainer.optimizer)
    trainer.forward = probe.wrap(trainer.forward)
    for i in range(steps):
        with probe.arm() if i == steps - 1 else nullcontext():
            trainer.train_step()
        trainer.step += 1
    report = probe.report()
    trainer.console.print(report.table())
    path = trainer.run_dir / "memory.json"
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    trainer.console.print(f"wrote {path}")
    return report


def profile_steps(model, optimizer, batch, steps: int = 2, autocast=None) -> MemoryReport:
    """The same measurement without a Trainer: `steps` plain AdamW steps on one batch (input_ids, shift_labels)."""
    probe = MemoryProbe(model, optimizer)
    forward = probe.wrap(model)
    model.train()
    for i in range(steps):
        with probe.arm() if i == steps - 1 else nullcontext():
            with autocast or nullcontext():
                out = forward(batch[0], shift_labels=batch[1])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out
    return probe.report()
