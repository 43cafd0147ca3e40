"""Plain single-device PyTorch model code: no ranks, meshes, FP8 or balancing policy here."""

from .moe import MoE, Router, GroupedExperts
from .transformer import IGNORE_INDEX, ModelOutput, Transformer

__all__ = ["GroupedExperts", "IGNORE_INDEX", "MoE", "ModelOutput", "Router", "Transformer"]
