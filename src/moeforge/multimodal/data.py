"""Multimodal examples that need no download, generated deterministically from seeds.

Images: one shape (circle, square, triangle) of one colour (red, green, blue, yellow) in one quadrant,
rendered with Pillow at a random size, jittered colour and noisy background; questions about the shape,
the colour and the position with one-or-two-word answers. The test split uses another seed (unseen
sizes, offsets, jitter and noise).

Speech: the digits zero..nine synthesised with espeak-ng in several voices, speeds and pitches, then
joined into 1-3 word phrases with random gaps and noise; the transcript is the words. The test split
uses speed/pitch settings no training clip has. Clips are synthesised once into a cache folder
($MOEFORGE_CACHE or ~/.cache/moeforge/speech).

Sequences are `<eos>user: <media><prompt>\nassistant:<answer><eos>` (the server's chat template, so a chat
request with the same parts asks what training taught); only the answer and eos carry targets.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..inference.chat_template import render as render_chat
from . import media
from .encoders import MultimodalConfig, pad_clip
from .model import IGNORE, TEXT, MediaBatch
from .serving import layout

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {"shape": "What shape is it?", "colour": "What colour is it?", "position": "Where is it?"}
CHANCE = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "position": 1 / len(POSITIONS)}

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
SPLIT_SETTINGS = {  # (speed words/min, pitch 0-99): the test split's are unseen in training
    "train": [(s, p) for s in (130, 160, 190) for p in (30, 50, 70)],
    "test": [(s, p) for s in (145, 175) for p in (40, 60)],
}
AUDIO_PROMPT = "Transcribe: "


@dataclass
class Example:
    """One interleaved sequence: media (an image tensor or a waveform), a prompt and the answer."""

    kind: str  # "image" or "audio"
    media: object
    prompt: str
    answer: str
    task: str  # image: shape/colour/position; audio: "speech"


# --- images ------------------------------------------------------------------------------------------
def render_image(shape: str, colour: str, position: str, rng: np.random.Generator, size: int = 32):
    """A Pillow RGB image of `shape` in `colour` inside the `position` quadrant."""
    from PIL import Image, ImageDraw

    bg = rng.integers(0, 60, size=3)
    noise = rng.integers(-12, 13, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    half = size // 2
    s = int(rng.integers(half * 5 // 8, half - 1))  # shape size within its quadrant
    qx = half if "right" in position else 0
    qy = half if "bottom" in position else 0
    x0 = qx + int(rng.integers(0, half - s + 1))
    y0 = qy + int(rng.integers(0, half - s + 1))
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])
    box = (x0, y0, x0 + s - 1, y0 + s - 1)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    return img


def image_examples(split: str, n: int, cfg: MultimodalConfig) -> list[Example]:
    rng = np.random.default_rng({"train": 11, "test": 12}[split])
    out = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        task = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
        img = media.image_to_tensor(render_image(shape, colour, position, rng, cfg.image_size), cfg.image_size)
        answer = {"shape": shape, "colour": colour, "position": position}[task]
        out.append(Example("image", img, QUESTIONS[task] + " ", answer, task))
    return out


# --- speech ------------------------------------------------------------------------------------------
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesise(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng -> float32 waveform at media.SAMPLE_RATE with leading/trailing silence trimmed."""
    if not espeak_available():
        raise DataError("speech data needs espeak-ng (Debian/Ubuntu: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "clip.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        x = media.decode_wav(wav.read_bytes())
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return x[loud[0]: loud[-1] + 1] if len(loud) else x


def cache_dir() -> Path:
    return Path(os.environ.get("MOEFORGE_CACHE", Path.home() / ".cache" / "moeforge")) / "speech"


def word_clips(split: str, voices=VOICES, settings=None) -> list[tuple[int, np.ndarray, tuple]]:
    """(digit, waveform, (voice, speed, pitch)) for every digit x voice x setting of the split, cached."""
    settings = settings or SPLIT_SETTINGS[split]
    key = hashlib.sha1(repr((tuple(voices), settings, media.SAMPLE_RATE)).encode()).hexdigest()[:12]
    path = cache_dir() / f"digits-{split}-{key}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        waves = np.split(z["samples"], z["offsets"][1:-1])
        return [(int(d), w, (str(v), int(s), int(p))) for d, w, v, s, p in
                zip(z["digit"], waves, z["voice"], z["speed"], z["pitch"])]
    rows = [(d, synthesise(DIGITS[d], v, s, p), (v, s, p)) for v in voices for s, p in settings for d in range(10)]
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = [len(w) for _, w, _ in rows]
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, samples=np.concatenate([w for _, w, _ in rows]), offsets=np.cumsum([0] + lengths),
             digit=np.array([d for d, _, _ in rows]), voice=np.array([m[0] for _, _, m in rows]),
             speed=np.array([m[1] for _, _, m in rows]), pitch=np.array([m[2] for _, _, m in rows]))
    os.replace(tmp, path)
    return rows


def speech_examples(split: str, n: int, cfg: MultimodalConfig, clips=None) -> list[Example]:
    """1-3 digit phrases joined from one speaker setting's word clips, with gaps and noise."""
    clips = clips if clips is not None else word_clips(split)
    by_speaker: dict[tuple, dict[int, np.ndarray]] = {}
    for d, w, meta in clips:
        by_speaker.setdefault(meta, {})[d] = w
    speakers = sorted(by_speaker)
    rng = np.random.default_rng({"train": 21, "test": 22}[split])
    out = []
    while len(out) < n:
        words = by_speaker[speakers[rng.integers(len(speakers))]]
        digits = rng.choice(sorted(words), size=int(rng.integers(1, 4)))
        parts = []
        for d in digits:
            parts += [np.zeros(int(rng.integers(400, 2400)), np.float32), words[int(d)]]
        x = np.concatenate(parts + [np.zeros(int(rng.integers(400, 2400)), np.float32)])
        if len(x) > cfg.max_audio_samples:
            continue
        x = x * rng.uniform(0.5, 1.0) + rng.normal(0, rng.uniform(0, 0.01), len(x)).astype(np.float32)
        out.append(Example("audio", x.astype(np.float32), AUDIO_PROMPT, " ".join(DIGITS[int(d)] for d in digits),
                           "speech"))
    return out


# --- batches -----------------------------------------------------------------------------------------
def prompt_segments(kind: str, item, prompt: str) -> list:
    """One user turn, the medium then the prompt, in the server's chat template (`chat_template.render`):
    what an example is trained on, what `generate` asks and what a chat request with the same parts gets."""
    return render_chat([("user", [(kind, item), prompt])])


def example_tokens(ex: Example, cfg: MultimodalConfig, tokenizer, with_answer: bool = True):
    """(ids, token types, targets) of one example; targets[i] is the token at i+1 (IGNORE off the answer)."""
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    # layout puts a leading eos (as BOS): the first position is text, not an image patch or audio frame
    # (the LM attends to position 0 from everywhere; a media vector there is pulled towards a constant).
    ids, types, _ = layout(prompt_segments(ex.kind, None, ex.prompt), cfg, tokenizer)
    start = len(ids)  # first answer token; the position before it predicts it
    answer = tokenizer.encode(ex.answer) + [eos] if with_answer else []
    ids, types = ids + answer, types + [TEXT] * len(answer)
    targets = [IGNORE] * len(ids)
    for i in range(start - 1, len(ids) - 1):
        targets[i] = ids[i + 1]
    return ids, types, targets


def collate(examples: list[Example], cfg: MultimodalConfig, tokenizer, with_answer: bool = True) -> MediaBatch:
    """Right-padded batch (padding: IGNORE targets, TEXT type) with the media stacked in order."""
    rows = [example_tokens(ex, cfg, tokenizer, with_answer) for ex in examples]
    T = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    types = torch.full((len(rows), T), TEXT, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (i, t, y) in enumerate(rows):
        ids[b, : len(i)], types[b, : len(t)], targets[b, : len(y)] = torch.tensor(i), torch.tensor(t), torch.tensor(y)
    images = [ex.media for ex in examples if ex.kind == "image"]
    clips = [pad_clip(ex.media, cfg) for ex in examples if ex.kind == "audio"]
    return MediaBatch(ids, types, targets,
                      images=torch.stack(images) if images else None,
                      mels=torch.stack([m for m, _ in clips]) if clips else None,
                      frames=torch.tensor([f for _, f in clips]) if clips else None)


class ExampleSampler:
    """Batch `i` of a fixed example list depends only on (seed, i), like `moeforge.data.BatchSampler`."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, cfg: MultimodalConfig, tokenizer):
        if not examples:
            raise DataError("no multimodal examples")
        self.examples, self.batch_size, self.seed, self.cfg, self.tokenizer = examples, batch_size, seed, cfg, tokenizer

    def batch(self, index: int) -> MediaBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pick = torch.randint(0, len(self.examples), (self.batch_size,), generator=g).tolist()
        return collate([self.examples[i] for i in pick], self.cfg, self.tokenizer)
