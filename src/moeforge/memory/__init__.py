"""Memory tools applied to a plain model from outside: a profiler of what training keeps in memory,
activation checkpointing (none | full | selective | auto under a budget) and CPU offload."""

from .checkpointing import MODES, ActivationCheckpointing, fixed_plan
from .profiler import ActivationProfile, ActivationRecorder, profile_forward
from .recompute import recomputing
from .setup import CheckpointPlan, build_plan, setup_memory

__all__ = ["MODES", "ActivationCheckpointing", "ActivationProfile", "ActivationRecorder", "CheckpointPlan",
           "build_plan", "fixed_plan", "profile_forward", "recomputing", "setup_memory"]
