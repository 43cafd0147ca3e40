"""What `moeforge serve` needs of a multimodal checkpoint: decode a request's media bytes with the same
decoders as `moeforge generate` (Pillow, PCM WAV), lay out the prompt with placeholder positions, and
encode the media into LM vectors on the engine's worker (`Engine(media_encoder=...)`).

A prompt is a list of segments: text, and (kind, item) pairs where the item is the decoded image tensor
or waveform. The layout is the one training and `generate` use: each medium takes a fixed number of
placeholder positions (eos ids) whose embeddings its encoder's vectors replace.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from . import media
from .encoders import pad_clip
from .model import AUDIO, IMAGE, TEXT, MultimodalLM

MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before decoding (Pillow's bomb check is 89 Mpx)


def decode(kind: str, data: bytes, cfg):
    """Bytes -> the encoder's input: an image tensor [3, S, S] or a 16 kHz waveform; DataError naming the
    problem (not an image, not a PCM WAV, too many pixels, longer than the encoder's limit)."""
    if kind == "image":
        import io

        from PIL import Image

        try:
            size = Image.open(io.BytesIO(data)).size
        except Exception:
            size = (0, 0)  # decode_image reports it
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise DataError(f"image is {size[0]}x{size[1]} pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
        return media.decode_image(data, cfg.image_size)
    wave = media.decode_wav(data)
    pad_clip(wave, cfg)  # empty / too long -> DataError
    return wave


def positions(kind: str, cfg) -> int:
    return cfg.image_tokens if kind == "image" else cfg.audio_tokens


def layout(segments: list, cfg, tokenizer) -> tuple[list[int], list[int], list[tuple[int, str, object]]]:
    """Segments -> (ids with eos placeholders, token types, [(start, kind, item)]); the ids start with an
    eos (BOS), as the training sequences of `data.example_tokens` do."""
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ids: list[int] = [eos]
    types: list[int] = [TEXT]
    spans = []
    for seg in segments:
        if isinstance(seg, str):
            new = tokenizer.encode(seg) if seg else []
            ids += new
            types += [TEXT] * len(new)
        else:
            kind, item = seg
            n = positions(kind, cfg)
            spans.append((len(ids), kind, item))
            ids += [eos] * n
            types += [IMAGE if kind == "image" else AUDIO] * n
    return ids, types, spans


class MediaEncoder:
    """(kind, item) -> the encoder's vectors [positions, hidden] of one image or clip, for the engine."""

    def __init__(self, model: MultimodalLM):
        self.model, self.cfg = model, model.mm_config

    def decode(self, kind: str, data: bytes):
        return decode(kind, data, self.cfg)

    def layout(self, segments: list, tokenizer) -> tuple[list[int], tuple[tuple[int, str, object], ...]]:
        ids, _, spans = layout(segments, self.cfg, tokenizer)
        return ids, tuple(spans)

    @torch.no_grad()
    def __call__(self, kind: str, item) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if kind == "image":
            return self.model.vision(item[None].to(device))[0]
        mel, frames = pad_clip(item, self.cfg)
        return self.model.audio(mel[None].to(device), torch.tensor([frames], device=device))[0]


__all__ = ["MediaEncoder", "decode", "layout", "positions"]
