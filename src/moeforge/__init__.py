"""moeforge: train and serve DeepSeek-V3-style Mixture-of-Experts models, from a laptop CPU to a cluster."""

from .config import ModelConfig, TrainConfig, preset
from .model import ModelOutput, Transformer

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu"):
    """Load a Hugging Face DeepseekV3-layout folder (or a moeforge checkpoint / run folder)."""
    from .hf import from_pretrained as _load

    return _load(path, dtype=dtype, device=device)


__all__ = ["ModelConfig", "ModelOutput", "TrainConfig", "Transformer", "from_pretrained", "preset"]
