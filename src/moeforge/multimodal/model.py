"""The language model with encoders in front: media vectors written over placeholder positions.

An interleaved sequence is token ids plus a `token_type` map (TEXT, IMAGE, AUDIO per position). The
text positions are embedded by the LM's own table; the IMAGE and AUDIO positions, in order of
appearance, take the encoder outputs (the `inputs_embeds` mechanism of LLaVA / DeepSeek-VL2); the LM
then runs from those embeddings (`Transformer.logits_from_embeddings`). The LM knows nothing of media.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..model import Transformer
from .encoders import AudioEncoder, MultimodalConfig, VisionEncoder

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITIES = ("text", "image", "audio")
IGNORE = -100
# In a subfolder: the LM loader reads every *.safetensors at the top of a folder without an index.
ENCODER_FILE, ENCODER_CONFIG = "multimodal/encoders.safetensors", "multimodal/config.json"


@dataclass
class MediaBatch:
    """input_ids, token_type [B, T]; targets [B, T] = the token after each position, IGNORE on the
    media, the prompt and padding; images [Ni, 3, S, S]; mels [Na, n_mels, F]; frames [Na]."""

    input_ids: torch.Tensor
    token_type: torch.Tensor
    targets: torch.Tensor | None = None
    images: torch.Tensor | None = None
    mels: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    def to(self, device) -> "MediaBatch":
        return MediaBatch(*(None if t is None else t.to(device) for t in
                            (self.input_ids, self.token_type, self.targets, self.images, self.mels, self.frames)))


class MultimodalLM(nn.Module):
    """`Transformer` + vision and audio encoders. Called like the LM on text (`model(ids, labels=...)`);
    `media_loss(batch)` / `media_logits(batch)` for interleaved sequences."""

    def __init__(self, lm: Transformer, cfg: MultimodalConfig):
        super().__init__()
        self.lm = lm
        self.mm_config = cfg.validate()
        D = lm.config.hidden_size
        self.vision = VisionEncoder(cfg, D)
        self.audio = AudioEncoder(cfg, D)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.lm(input_ids, labels=labels)

    def embed(self, batch: MediaBatch) -> torch.Tensor:
        """Token embeddings with the media positions replaced by encoder outputs (in appearance order)."""
        h = self.lm.embed_tokens(batch.input_ids)
        for kind, encode, media in ((IMAGE, lambda: self.vision(batch.images), batch.images),
                                    (AUDIO, lambda: self.audio(batch.mels, batch.frames), batch.mels)):
            mask = batch.token_type == kind
            if media is None or media.shape[0] == 0:
                if mask.any():
                    raise ValueError(f"{int(mask.sum())} {MODALITIES[kind]} positions but no {MODALITIES[kind]}")
                continue
            vectors = encode().to(h.dtype)
            if vectors.shape[0] * vectors.shape[1] != int(mask.sum()):
                raise ValueError(f"{int(mask.sum())} {MODALITIES[kind]} positions for {vectors.shape[0]} items of "
                                 f"{vectors.shape[1]} vectors each")
            h = h.masked_scatter(mask[..., None], vectors.reshape(-1, h.shape[-1]))
        return h

    def media_logits(self, batch: MediaBatch) -> torch.Tensor:
        return self.lm.logits_from_embeddings(self.embed(batch))

    def media_loss(self, batch: MediaBatch) -> torch.Tensor:
        logits = self.media_logits(batch)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE)

    def moe_layers(self):
        return self.lm.moe_layers()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def encoder_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("lm.")}


def save_encoders(model: MultimodalLM, folder: Path) -> None:
    """multimodal/encoders.safetensors + multimodal/config.json beside the LM's config.json / model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / ENCODER_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state(model), str(folder / ENCODER_FILE))
    (folder / ENCODER_CONFIG).write_text(json.dumps(model.mm_config.to_dict(), indent=2) + "\n")


def load_encoders(model: MultimodalLM, folder: Path) -> None:
    from safetensors.torch import load_file

    path = Path(folder) / ENCODER_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ENCODER_FILE} (not a multimodal checkpoint)")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: encoder weights do not match (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def save_pretrained(model: MultimodalLM, folder: Path) -> None:
    from ..hf import save_pretrained as save_lm

    save_lm(model.lm, folder)
    save_encoders(model, folder)


def from_pretrained(folder: str | Path, device: str = "cpu") -> MultimodalLM:
    """A multimodal checkpoint folder (HF-layout LM + multimodal.*) -> MultimodalLM in eval mode."""
    from ..hf import from_pretrained as load_lm

    folder = Path(folder)
    if not (folder / ENCODER_CONFIG).is_file():
        raise CheckpointError(f"{folder}: no {ENCODER_CONFIG} (not a multimodal checkpoint)")
    cfg = MultimodalConfig.from_dict(json.loads((folder / ENCODER_CONFIG).read_text()))
    model = MultimodalLM(load_lm(folder, device="cpu"), cfg)
    load_encoders(model, folder)
    return model.to(device).eval()
