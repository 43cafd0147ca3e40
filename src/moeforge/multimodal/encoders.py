"""The vision and audio encoders and their projectors into the LM's hidden size.

Vision: ViT-style: non-overlapping patches (a strided conv), learned positions, pre-norm transformer
layers. Audio: log-mel frames -> two stride-2 convs (4x fewer positions, as in Whisper's front end) ->
learned positions -> transformer layers that ignore padded frames (key padding mask). Each ends in a
2-layer MLP projector (LLaVA-1.5 / DeepSeek-VL2 style) to the LM width. Clips are padded to a fixed
length so every clip takes the same number of LM positions (batched decoding needs no attention mask).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..errors import ConfigError
from . import media


@dataclass
class MultimodalConfig:
    """Sizes of the encoders (saved beside the LM as multimodal.json)."""

    image_size: int = 32
    patch_size: int = 8
    vision_dim: int = 128
    vision_layers: int = 2
    audio_dim: int = 128
    audio_layers: int = 2
    n_mels: int = media.N_MELS
    max_audio_seconds: float = 2.5
    heads: int = 4

    def validate(self) -> "MultimodalConfig":
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_dim", "audio_dim"):
            if getattr(self, name) % self.heads:
                raise ConfigError(f"{name} {getattr(self, name)} is not divisible by heads {self.heads}")
        return self

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_audio_samples(self) -> int:
        return int(self.max_audio_seconds * media.SAMPLE_RATE)

    @property
    def audio_frames(self) -> int:
        return media.frames_for(self.max_audio_samples)

    @property
    def audio_tokens(self) -> int:
        return conv_out(conv_out(self.audio_frames))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MultimodalConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}).validate()


def conv_out(n: int | torch.Tensor):
    """Length after Conv1d(kernel 3, stride 2, padding 1)."""
    return (n - 1) // 2 + 1


def encoder_stack(dim: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


class Projector(nn.Module):
    """Linear -> GELU -> Linear from encoder width to LM width, then each output feature standardised
    over the batch's media vectors (BatchNorm without affine; running statistics in eval mode).

    Why the standardisation: without it, joint training from scratch drove every image's vectors to one
    shared direction within 25 steps (cross-image std / rms 0.34 at init -> 0.03; the LM learnt answer
    priors from a constant "media" input, and Adam grew that constant), after which the LM's RMSNorm saw
    almost identical keys at every media position and never learnt to read them. With the batch mean
    removed and the scale fixed, only what differs between images and positions reaches the LM.
    """

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, out), nn.GELU(), nn.Linear(out, out))
        self.standardise = nn.BatchNorm1d(out, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return self.standardise(y.reshape(-1, y.shape[-1])).view_as(y)


class VisionEncoder(nn.Module):
    """images [B, 3, S, S] in [0, 1] -> [B, (S/P)^2, lm_dim]."""

    def __init__(self, cfg: MultimodalConfig, lm_dim: int):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(3, cfg.vision_dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(cfg.image_tokens, cfg.vision_dim) * 0.02)
        self.blocks = encoder_stack(cfg.vision_dim, cfg.heads, cfg.vision_layers)
        self.proj = Projector(cfg.vision_dim, lm_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch((images - 0.5) / 0.25).flatten(2).transpose(1, 2)  # [B, N, d], patches row-major
        return self.proj(self.blocks(x + self.pos))


class AudioEncoder(nn.Module):
    """log-mel [B, n_mels, F] (F = cfg.audio_frames) + valid frame counts [B] -> [B, cfg.audio_tokens, lm_dim].

    Positions past a clip's end take part in nothing: they are masked as keys, and their outputs are a
    learned 'silence' vector, so the result never depends on what the padding holds.
    """

    def __init__(self, cfg: MultimodalConfig, lm_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.audio_dim
        self.conv = nn.Sequential(nn.Conv1d(cfg.n_mels, d, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv1d(d, d, 3, stride=2, padding=1), nn.GELU())
        self.pos = nn.Parameter(torch.randn(cfg.audio_tokens, d) * 0.02)
        self.blocks = encoder_stack(d, cfg.heads, cfg.audio_layers)
        self.pad_embedding = nn.Parameter(torch.zeros(d))
        self.proj = Projector(d, lm_dim)

    def forward(self, mels: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        F = mels.shape[-1]
        frame_ok = torch.arange(F, device=mels.device)[None] < frames[:, None]
        x = self.conv(mels * frame_ok[:, None])  # zero the padding first: conv windows read across the end
        x = x.transpose(1, 2)  # [B, N, d]
        valid = torch.arange(x.shape[1], device=x.device)[None] < conv_out(conv_out(frames))[:, None]
        x = self.blocks(x + self.pos[: x.shape[1]], src_key_padding_mask=~valid)
        x = torch.where(valid[..., None], x, self.pad_embedding.to(x.dtype))
        return self.proj(x)


def pad_clip(wave: torch.Tensor | "np.ndarray", cfg: MultimodalConfig) -> tuple[torch.Tensor, int]:
    """Waveform -> (log-mel [n_mels, cfg.audio_frames], valid frames); clips longer than the limit raise."""
    from ..errors import DataError

    n = len(wave)
    if n > cfg.max_audio_samples:
        raise DataError(f"audio is {n / media.SAMPLE_RATE:.2f} s long; the limit is {cfg.max_audio_seconds} s")
    if n == 0:
        raise DataError("audio is empty")
    mel = media.log_mel(wave)
    out = torch.zeros(cfg.n_mels, cfg.audio_frames)
    out[:, : mel.shape[1]] = mel
    return out, min(mel.shape[1], cfg.audio_frames)


__all__ = ["AudioEncoder", "MultimodalConfig", "Projector", "VisionEncoder", "pad_clip"]
