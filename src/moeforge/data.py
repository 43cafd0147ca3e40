"""Tokenizers, corpora and batches.

The default corpus is real text present on every machine: the running interpreter's standard-library
source files. Documents are split into train/validation by a hash of their name, so the split never
changes with file order or corpus size. Batches are random windows drawn from a generator seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arrow_data import arrow_documents, arrow_files
from .errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".toml", ".c", ".h", ".html", ".css", ".js"}


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); byte 0 (never in text) separates documents."""

    vocab_size = 256
    eos_id = 0
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` loaded from a local path (via the `tokenizers` package)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("a tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exceptions for malformed files
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>", "<｜end▁of▁sentence｜>") if t in vocab), None)
        self.eos_id = vocab[eos] if eos else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(path: str | None):
    return ByteTokenizer() if path in (None, "", "bytes") else HFTokenizer(path)


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(name: str, fraction: float) -> bool:
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def iter_documents(path: Path | None, max_bytes: int, text_field: str = "text"):
    """Yield (name, text) pairs: a file, the text files under a folder, the text field of JSONL, or the text
    column of parquet / Arrow data (moeforge.arrow_data)."""
    if path is None:
        root = default_corpus_root()
        files = sorted(p for p in root.rglob("*.py")
                       if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    elif not path.exists():
        raise DataError(f"data path not found: {path}")
    elif (tables := arrow_files(path)) is not None:
        yield from arrow_documents(path, tables, text_field, max_bytes)
        return
    elif path.is_dir():
        root = path
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in this folder")
    else:
        root, files = path.parent, [path]
    total = 0
    for f in files:
        if total >= max_bytes:
            return
        if f.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(f, text_field)
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if len(files) == 1:
                raise DataError(f"{f}: not UTF-8 text (for token files use .bin or .npy)") from None
            continue
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror})") from None
        total += len(text)
        yield str(f.relative_to(root)) if f != root else f.name, text


def _jsonl_documents(path: Path, text_field: str = "text"):
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field") from None
            yield f"{path.name}:{lineno}", str(text)


@dataclass
class Corpus:
    train: np.ndarray  # int32 token ids
    val: np.ndarray
    source: str


def load_corpus(path: str | None, tokenizer, max_mb: float = 16.0, val_fraction: float = 0.05,
                text_field: str = "text") -> Corpus:
    """Tokenise a corpus and split it into train/validation token streams."""
    p = Path(path) if path else None
    if p is not None and p.suffix in (".bin", ".npy") and p.is_file():
        return _token_file(p, val_fraction)
    max_bytes = int(max_mb * 1e6)
    eos = tokenizer.eos_id
    parts: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for name, text in iter_documents(p, max_bytes, text_field):
        if not text.strip():
            continue
        ids = tokenizer.encode_array(text)
        if eos is not None:
            ids = np.append(ids, eos)
        parts[is_validation(name, val_fraction)].append(ids)
    source = str(p) if p else f"Python standard library ({default_corpus_root()})"
    if not parts[False] and not parts[True]:
        raise DataError(f"{source}: no text found")
    if not parts[True] or not parts[False]:  # too few documents for a per-document split: split the stream
        stream = np.concatenate(parts[True] + parts[False])
        cut = int(len(stream) * (1 - val_fraction))
        return Corpus(train=stream[:cut], val=stream[cut:], source=source)
    return Corpus(train=np.concatenate(parts[False]), val=np.concatenate(parts[True]), source=source)


def _token_file(p: Path, val_fraction: float) -> Corpus:
    """Pre-tokenised ids: .npy (any integer dtype) or .bin (raw little-endian uint16, as nanoGPT writes)."""
    try:
        tokens = np.load(p, mmap_mode="r") if p.suffix == ".npy" else np.memmap(p, dtype=np.uint16, mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{p}: cannot read token file ({e})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{p}: expected a 1-D array of integer token ids, got {tokens.dtype} {tokens.shape}")
    if len(tokens) == 0:
        raise DataError(f"{p}: empty token file")
    cut = int(len(tokens) * (1 - val_fraction))
    return Corpus(train=np.asarray(tokens[:cut], dtype=np.int32), val=np.asarray(tokens[cut:], dtype=np.int32),
                  source=str(p))


class BatchSampler:
    """Random (input_ids, labels) windows of seq_len+1 tokens; batch `i` depends only on (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, name: str = "train"):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the {name} split has {len(tokens)} tokens, fewer than seq_len+2 = {seq_len + 2}; "
                            "use more data or a shorter --seq-len")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=g)
        windows = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]
