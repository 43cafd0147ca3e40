"""Read tensors from a safetensors file with positioned reads (`os.preadv`) instead of a memory map.

Why not `safetensors.safe_open`: its tensors are views of a mapping of the whole file, and every page a
read touches stays in the process's resident set until the handle closes, whether or not the tensor is
kept. Converting or stacking a model's tensors as they are read then holds them twice (the copy plus the
mapped file pages), and an expert cache reading experts on demand would grow to the whole file. A
positioned read lands in memory the caller owns (a fresh tensor, or a slice of a preallocated stack)
and leaves nothing else resident: the page cache is the kernel's, not the process's. `os.preadv`
releases the GIL, so a prefetch thread reads while the main thread computes.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data after the
header), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_READ = 1 << 30  # Linux returns at most ~2 GiB per read call


class SafetensorsReader:
    """One safetensors file: its header parsed once, tensors read on request. Raises ValueError for a
    malformed or truncated file and OSError for I/O errors (callers name the file)."""

    def __init__(self, path: str | Path):
        self.path, self.fd = Path(path), -1
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(os.pread(self.fd, n, 8))
            self.metadata = header.pop("__metadata__", None) or {}
            self.data_start = 8 + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{key}: dtype {info['dtype']} is not supported")
                begin, end = info["data_offsets"]
                dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
                if end - begin != math.prod(shape) * dtype.itemsize or self.data_start + end > size:
                    raise ValueError(f"{key}: data outside the file (truncated?)")
                self.entries[key] = (dtype, shape, self.data_start + begin, self.data_start + end)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            self.close()
            raise ValueError(f"not a valid safetensors file ({e})") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor `key` (or its slice [index] along dim 0) in the file's dtype, in fresh memory."""
        dtype, shape, _, _ = self.entries[key]
        out = torch.empty(shape if index is None else shape[1:], dtype=dtype)
        self.read_into(key, out, index)
        return out

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> None:
        """Fill the contiguous tensor `out` (the file's dtype and shape, or the shape of one [index] slice
        along dim 0) straight from the file: no intermediate copy."""
        dtype, shape, begin, end = self.entries[key]
        if index is not None:
            step = (end - begin) // shape[0]
            begin, end, shape = begin + index * step, begin + (index + 1) * step, shape[1:]
        if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"{key}: cannot read {dtype}{list(shape)} into {out.dtype}{list(out.shape)}")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < end - begin:
            n = os.preadv(self.fd, [view[done:done + MAX_READ]], begin + done)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file reading {key}")
            done += n
