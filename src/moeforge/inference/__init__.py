"""Inference outside the model code: latent-KV-cache decoding with absorbed MLA, MTP speculative
decoding, a budgeted expert cache, and an OpenAI-compatible server (`moeforge.inference.server`)."""

from .absorbed import ATTENTION_MODES, forward_cached, forward_mtp
from .generation import generate, stream
from .kv_cache import LatentKVCache
from .sampling import SamplingParams

__all__ = ["ATTENTION_MODES", "LatentKVCache", "SamplingParams", "forward_cached", "forward_mtp", "generate",
           "stream"]
