"""moeforge: train and serve DeepSeek-V3-style Mixture-of-Experts models, from a laptop CPU to a cluster."""

from .checkpoint import resolve_checkpoint_dir
from .config import ModelConfig, TrainConfig, preset
from .hf import PretrainedTransformer as Transformer
from .model import ModelOutput

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu") -> Transformer:
    """Load a Hugging Face DeepseekV3 / DeepseekV2 folder, a moeforge checkpoint, or a run folder (its newest
    intact checkpoint)."""
    return Transformer.from_pretrained(resolve_checkpoint_dir(path), dtype=dtype, device=device)


__all__ = ["ModelConfig", "ModelOutput", "TrainConfig", "Transformer", "from_pretrained", "preset"]
