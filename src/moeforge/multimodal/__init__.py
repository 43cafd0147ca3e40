"""Image and speech inputs in front of the unchanged MoE language model.

Encoders (`encoders`) turn an image or an audio clip into a sequence of vectors in the LM's hidden
size; `model.MultimodalLM` writes them over the placeholder positions of an interleaved sequence and
runs the LM from embeddings. Media decoding and features live in `media`; synthetic, seeded data that
needs no download in `data`; the trainer in `train`.
"""

from .encoders import AudioEncoder, MultimodalConfig, VisionEncoder
from .model import MultimodalLM

__all__ = ["AudioEncoder", "MultimodalConfig", "MultimodalLM", "VisionEncoder"]
