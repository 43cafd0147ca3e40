"""`moeforge profile`: where a training step's time goes on every rank, measured with torch.profiler:
compute, communication by collective and parallel dimension (hidden behind compute or exposed), idle time
waiting for other ranks, the overlap ratio and the straggler; beside them, the planner's prediction.
See docs/profile.md."""

from .analyze import analyze, extract
from .run import profile_run

__all__ = ["analyze", "extract", "profile_run"]
