"""LogFMT-n: a logarithmic n-bit format per 1x128 tile, for communication (DeepSeek "Insights into
DeepSeek-V3", arXiv 2505.09343, sec. 3.2).

Per tile: lo, hi = min and max of ln|x| over the tile's non-zero values, lo clamped to >= hi - ln(2^32).
Each value is a sign bit and an (n-1)-bit code: code 0 is zero; codes 1 .. 2^(n-1)-1 are the
magnitudes exp(lo + (code - 1) * step), step = (hi - lo) / (2^(n-1) - 2), so code 1 is exp(lo) and the
top code exp(hi). A value is rounded to one of its two neighbouring levels by distance in linear space
(not in log space, whose midpoint, the geometric mean, sits below the arithmetic one and would bias
magnitudes upward); with `stochastic=True` it rounds up with probability proportional to that
distance, which makes every value's expected decode exactly itself. Values below exp(lo) (after the
clamp) round between 0 and exp(lo) the same way.

Payload: `codes` (uint8 for n = 8, int16 up to n = 16; sign in bit n-1) plus fp32 lo and hi per tile:
n/8 + 8/128 bytes per element. `LogFmtPayload.nbytes` counts n bits per code, as a packed wire
format would. Tiles run along the last dim (zero-padded to a multiple of the tile).

Non-finite input raises ValueError by default (one host sync); with `check_finite=False` a tile holding
inf or NaN is sent with lo = NaN and decodes to NaN as a whole (as an FP8 block does in quant.py), so
the NaN reaches the loss and the trainer's non-finite-step skip handles it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LogFmtPayload:
    codes: torch.Tensor  # [R, C_padded] integer codes, sign in bit n-1
    lo: torch.Tensor  # [R, tiles] fp32 ln|x| of code 1
    hi: torch.Tensor  # [R, tiles] fp32 ln|x| of the top code
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    tile: int = 128

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: n bits per element (packed) + lo and hi per tile."""
        n = math.prod(self.shape)
        return math.ceil(n * self.bits / 8) + (self.lo.numel() + self.hi.numel()) * 4


def _levels(bits: int) -> int:
    if not 2 <= bits <= 16:
        raise ValueError(f"LogFMT needs 2..16 bits, got {bits}")
    return 2 ** (bits - 1) - 1  # magnitude codes 1..L


def logfmt_encode(x: torch.Tensor, bits: int = 8, tile: int = 128, stochastic: bool = False,
                  generator: torch.Generator | None = None, check_finite: bool = True) -> LogFmtPayload:
    """Encode x [..., C] in tiles of `tile` along the last dim. Non-finite input raises ValueError, or
    (check_finite=False) makes its tile decode to NaN."""
    L = _levels(bits)
    shape, C = tuple(x.shape), x.shape[-1]
    xf = x.reshape(-1, C).float()
    finite = torch.isfinite(xf)
    if check_finite and not bool(finite.all()):
        raise ValueError("cannot LogFMT-encode a tensor holding inf or NaN")
    pad = (-C) % tile
    if not check_finite:
        xf = torch.where(finite, xf, torch.zeros_like(xf))
        bad = F.pad((~finite).float(), (0, pad)).view(xf.shape[0], (C + pad) // tile, tile).amax(-1) > 0  # [R, T]
    if pad:
        xf = F.pad(xf, (0, pad))
    t = xf.view(xf.shape[0], -1, tile)  # [R, T, tile]
    mag = t.abs()
    nz = mag > 0
    logm = torch.where(nz, mag, torch.ones_like(mag)).log()
    hi = logm.masked_fill(~nz, float("-inf")).amax(-1)
    lo = logm.masked_fill(~nz, float("inf")).amin(-1)
    empty = torch.isinf(hi)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    lo = torch.where(empty, torch.zeros_like(lo), torch.maximum(lo, hi - 32 * math.log(2)))
    step = (hi - lo) / max(L - 1, 1)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))[..., None]
    # Lower neighbouring level j (0-based: level j is code j + 1), then round in linear space.
    j = torch.floor((logm - lo[..., None]) / safe_step).clamp(0, max(L - 2, 0))
    below = logm < lo[..., None]  # under exp(lo): neighbours are 0 and exp(lo)
    v_lo = torch.where(below, torch.zeros_like(mag), torch.exp(lo[..., None] + j * step[..., None]))
    v_hi = torch.where(below, torch.exp(lo)[..., None].expand_as(mag),
                       torch.exp(lo[..., None] + (j + 1) * step[..., None]))
    if stochastic:
        frac = ((mag - v_lo) / (v_hi - v_lo).clamp_min(torch.finfo(torch.float32).tiny)).clamp(0, 1)
        up = torch.rand(mag.shape, generator=generator, device=mag.device) < frac
    else:
        up = (mag - v_lo) > (v_hi - mag)
    code = torch.where(below, up.float(), j + 1 + up.float())
    code = torch.where(step[..., None] > 0, code, torch.ones_like(code))  # one magnitude in the tile
    code = torch.where(nz, code, torch.zeros_like(code)).clamp(0, L)
    signed = code.to(torch.int32) | ((t < 0).to(torch.int32) << (bits - 1))
    codes = signed.to(torch.uint8 if bits <= 8 else torch.int16).view(xf.shape[0], -1)
    if not check_finite:
        lo = lo.masked_fill(bad, float("nan"))
    return LogFmtPayload(codes, lo, hi, bits, shape, x.dtype, tile)


def logfmt_decode(p: LogFmtPayload) -> torch.Tensor:
    L = _levels(p.bits)
    raw = p.codes.to(torch.int32).view(p.codes.shape[0], -1, p.tile)
    sign = (raw >> (p.bits - 1)) & 1
    code = (raw & L).float()
    step = ((p.hi - p.lo) / max(L - 1, 1))[..., None]
    mag = torch.where(code > 0, torch.exp(p.lo[..., None] + (code - 1) * step), torch.zeros_like(code))
    out = torch.where(sign.bool(), -mag, mag)
    out = out.masked_fill(torch.isnan(p.lo)[..., None], float("nan")).view(p.codes.shape[0], -1)
    C = p.shape[-1]
    return out[:, :C].reshape(p.shape).to(p.dtype)


def logfmt_roundtrip(x: torch.Tensor, bits: int = 8, **kw) -> torch.Tensor:
    return logfmt_decode(logfmt_encode(x, bits, **kw))
