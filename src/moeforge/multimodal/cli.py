"""`moeforge generate --image FILE` / `--audio FILE.wav` on a multimodal checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..data import load_tokenizer
from ..errors import ConfigError, DataError
from ..inference.sampling import SamplingParams
from . import media
from .encoders import pad_clip
from .generation import answer_media
from .model import ENCODER_CONFIG, from_pretrained


def read_media(kind: str, path: str, cfg):
    """FILE -> the encoder's input (image tensor or waveform), with one-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--{kind}: file not found: {p}")
    try:
        if kind == "image":
            return media.decode_image(p.read_bytes(), cfg.image_size)
        wave = media.decode_wav(p.read_bytes())
        pad_clip(wave, cfg)  # too long / empty -> DataError now
        return wave
    except DataError as e:
        raise ConfigError(f"--{kind} {p}: {e}") from None


def generate_with_media(folder: Path, args) -> int:
    if args.image and args.audio:
        raise ConfigError("pass one of --image and --audio")
    for flag, on in (("--mtp", args.mtp), ("--expert-budget", args.expert_budget is not None),
                     ("--no-cache", args.no_cache)):
        if on:
            raise ConfigError(f"{flag} is not supported with --image/--audio")
    if not (folder / ENCODER_CONFIG).is_file():
        raise ConfigError(f"{folder} is not a multimodal checkpoint (no {ENCODER_CONFIG}); train one with "
                          "--preset tiny-mm")
    model = from_pretrained(folder, device="cpu" if args.device == "auto" else args.device)
    kind = "image" if args.image else "audio"
    item = read_media(kind, args.image or args.audio, model.mm_config)
    tokenizer = load_tokenizer(args.tokenizer)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print(args.prompt + answer_media(model, kind, item, args.prompt, tokenizer, args.max_new_tokens, params,
                                     args.seed))
    return 0
