"""The three FP8 GEMMs of a (grouped) linear layer: Fprop, Dgrad, Wgrad, on three backends.

Shapes: M rows (tokens, grouped by expert), K input features, N output features, E weight matrices
(E = 1 for a plain linear); counts [E] rows per group.

Backends (`moeforge.hardware.probe(...).fp8_gemm` picks one per device):
  BLOCKWISE  torch's native fine-grained scaled GEMM, `torch.nn.functional.scaled_mm` with
             ScalingType.BlockWise1x128 x BlockWise128x128 (Fprop, Dgrad) and 1x128 x 1x128 (Wgrad):
             cuBLASLt on Hopper (sm90), which promotes every 128-element partial sum to FP32 itself.
             torch 2.13 has no blockwise *grouped* kernel (`scaled_grouped_mm` is row-wise / MX only,
             and absent on CPU), so experts loop over their groups. Operands are zero-padded to the
             kernel's alignment (M to 4 and at least 128 rows, K and N to 128); zeros change no block's
             scale and no product. E5M2 operands (the hybrid recipe) fall back to ROWWISE or EMULATED.
  ROWWISE    DeepSeek's FP32 promotion spelled out with row-wise scaled GEMMs (`torch._scaled_mm`
             with an (m, 1) and a (1, n) scale): over each 128-wide slice of K, a 1x128 activation
             tile has one scale per row and a 128x128 weight block one scale per output column, so
             the slice is exactly one row-wise scaled FP8 GEMM; the slices are summed in an FP32
             accumulator. Runs on CPU (torch 2.13: FP8 operands, FP32 out). Tensor-wise scales take
             one `torch._scaled_mm` over the whole of K.
  EMULATED   the reference: dequantise both FP8 operands to fp32 (value x its block's scale) and
             multiply in fp32. Every FP8 value has a 4-bit significand, so a dequantised value is exact
             for power-of-two scales and within one fp32 rounding otherwise; the kernels above give the
             same numbers up to fp32 summation order (tests compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import E4M3, Quantized

EMULATED, ROWWISE, BLOCKWISE = "emulated", "rowwise", "blockwise"
BACKENDS = (EMULATED, ROWWISE, BLOCKWISE)
SLICE = 128  # the promotion interval: DeepSeek-V3 adds each 128-element partial sum into FP32


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor | None, trans_b: bool) -> torch.Tensor:
    """out[rows of group e] = a[rows of e] @ (b[e]^T if trans_b else b[e]); a [M, *], b [E, *, *]."""
    bt = b.transpose(-2, -1) if trans_b else b
    if b.shape[0] == 1:
        return a @ bt[0]
    if a.device.type == "cpu" and a.shape[1] % 4 == 0 and bt.shape[2] % 4 == 0:
        return torch._grouped_mm(a, bt, offs=counts.cumsum(0).to(torch.int32))
    parts = [ae @ be for ae, be in zip(a.split(counts.tolist()), bt.unbind(0))]
    return torch.cat(parts)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: torch.Tensor | None, n_groups: int) -> torch.Tensor:
    """dw[e] = dy[rows of e]^T @ x[rows of e]: dy [M, N], x [M, K] -> [E, N, K] (K of this GEMM = rows)."""
    if n_groups == 1:
        return (dy.t() @ x).unsqueeze(0)
    if dy.device.type == "cpu" and dy.shape[1] % 4 == 0 and x.shape[1] % 4 == 0:
        return torch._grouped_mm(dy.t(), x, offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.stack([de.t() @ xe for de, xe in zip(dy.split(sizes), x.split(sizes))])


def fp8_mm(a: Quantized, b: Quantized, counts: torch.Tensor | None, trans_b: bool,
           backend: str = EMULATED) -> torch.Tensor:
    """Fprop (trans_b: out = a @ b[e]^T) or Dgrad (out = a @ b[e]) per group of rows; a [M, .] FP8 in
    1x128 tiles (or one scale), b [E, N, K] FP8 in 128x128 blocks (or one scale each); fp32 out."""
    if backend == BLOCKWISE and _blockwise_fits(a, b, (1, SLICE), (SLICE, SLICE)):
        return _per_group(a, b, counts, trans_b, _blockwise_group_mm)
    if backend in (ROWWISE, BLOCKWISE) and (backend == ROWWISE or _tensorwise(a) and _tensorwise(b)):
        return _per_group(a, b, counts, trans_b, _rowwise_group_mm)
    return grouped_mm(a.dequantize(), b.dequantize(), counts, trans_b)


def fp8_wgrad(dy: Quantized, x: Quantized, counts: torch.Tensor | None, n_groups: int,
              backend: str = EMULATED) -> torch.Tensor:
    """dw[e] = dy[rows of e]^T @ x[rows of e] -> fp32 [E, N, K]; dy [M, N] and x [M, K] FP8 in tiles
    along the tokens (128 x 1, restarting at every group: `quantize_row_tiles`), or one scale each."""
    rowwise = backend == ROWWISE
    blockwise = backend == BLOCKWISE and _blockwise_fits(dy, x, (SLICE, 1), (SLICE, 1))
    if not (rowwise or blockwise):
        return grouped_wgrad(dy.dequantize(), x.dequantize(), counts, n_groups)
    M, N = dy.data.shape
    K = x.data.shape[1]
    out = dy.data.new_zeros((n_groups, N, K), dtype=torch.float32)
    dy_t, x_t = dy.data.t().contiguous(), x.data.t().contiguous()  # [N, M], [K, M]: tokens along rows' K
    dy_s, x_s = _row_slice_scales(dy), _row_slice_scales(x)  # [tiles, N], [tiles, K]
    for e, tiles in enumerate(_token_tiles(dy, [M] if n_groups == 1 else counts.tolist())):
        if not tiles:
            continue
        if blockwise:  # one 1x128 x 1x128 GEMM per group over its whole run of token tiles
            r0, r1, t0, t1 = tiles[0][0], tiles[-1][1], tiles[0][2], tiles[-1][2] + 1
            out[e] = _cublas_blockwise(dy_t[:, r0:r1], dy_s[t0:t1].t(), x_t[:, r0:r1], x_s[t0:t1].t(),
                                       F.ScalingType.BlockWise1x128)
        else:
            for r0, r1, t in tiles:
                out[e].add_(_scaled(dy_t[:, r0:r1], x_t[:, r0:r1], dy_s[t], x_s[t]))
    return out


# --- ROWWISE: 128-wide slices of K, one row-wise scaled GEMM each, summed in fp32 -------------------

def _scaled(a: torch.Tensor, bt: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(sa[i] a[i, :]) . (sb[j] bt[j, :]) for all i, j -> fp32 [m, n]: a [m, k], bt [n, k] FP8; sa [m]
    and sb [n] fp32 (row-wise), or both 0-dim (tensor-wise)."""
    n = bt.shape[0]
    gpu = a.device.type != "cpu"  # CPU takes any layout
    if gpu and (n % 16 or not all(t.shape[1] % 16 == 0 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
                                  for t in (a, bt))):
        k16 = _round_up(a.shape[1], 16)  # cuBLASLt: K and N multiples of 16, 16-byte rows and starts
        a, bt = _padded(a, a.shape[0], k16), _padded(bt, _round_up(n, 16), k16)
        sb = _padded(sb[None], 1, bt.shape[0], 1.0)[0] if sb.dim() else sb
    out = torch._scaled_mm(a, bt.t(), scale_a=sa[:, None] if sa.dim() else sa,
                           scale_b=sb[None] if sb.dim() else sb, out_dtype=torch.float32)
    return out[:, :n] if out.shape[1] != n else out


def _rowwise_group_mm(a: Quantized, rows: slice, w: Quantized, trans_b: bool) -> torch.Tensor:
    """One group's Fprop or Dgrad, promoted to fp32 every 128 elements of K (see module docstring)."""
    ad = a.data[rows]
    bt = w.data if trans_b else w.data.t().contiguous()  # [n, k]: K along the rows of both operands
    if _tensorwise(a) and _tensorwise(w):  # one slice: the whole of K
        return _scaled(ad, bt, a.scale.reshape(()), w.scale.reshape(()))
    sa = _col_slice_scales(a)[:, rows]  # [slices, m]
    sb = _col_slice_scales(w) if trans_b else _row_slice_scales(w)  # [slices, n]
    width = a.block[1]
    out = None
    for s, k0 in enumerate(range(0, ad.shape[1], width)):
        part = _scaled(ad[:, k0:k0 + width], bt[:, k0:k0 + width], sa[s], sb[s])
        out = part if out is None else out.add_(part)
    return out


def _col_slice_scales(q: Quantized) -> torch.Tensor:
    """Scales for contracting q [R, C] along C in slices of its block width: [slices, R], [s, r] = the
    scale of row r in slice s."""
    br = q.block[0]
    return q.scale.t().repeat_interleave(br, dim=1)[:, :q.data.shape[0]].contiguous()


def _row_slice_scales(q: Quantized) -> torch.Tensor:
    """Scales for contracting q [R, C] along R in slices of its block height: [slices, C]."""
    bc = q.block[1]
    return q.scale.repeat_interleave(bc, dim=1)[:, :q.data.shape[1]].contiguous()


def _token_tiles(q: Quantized, sizes: list[int]) -> list[list[tuple[int, int, int]]]:
    """Per group, its tiles of rows (row0, row1, tile index into q's scales); tiles never straddle
    groups (row tiles number consecutively; plain blocks count from row 0; one scale: tile 0)."""
    step = max(q.block[0], 1)
    out, start, t = [], 0, 0
    for m in sizes:
        tiles = []
        for r in range(start, start + m, step):
            tiles.append((r, min(r + step, start + m), t if q.row_tile is not None else r // step))
            t += 1
        out.append(tiles)
        start += m
    return out


def _tensorwise(q: Quantized) -> bool:
    return q.row_tile is None and q.scale.shape[-2:] == (1, 1) and q.block == tuple(q.data.shape[-2:])


def _per_group(a: Quantized, b: Quantized, counts: torch.Tensor | None, trans_b: bool, group_mm):
    E, R, C = b.data.shape
    if E == 1:
        return group_mm(a, slice(None), Quantized(b.data[0], b.scale[0], b.block, b.fmt), trans_b)
    out = a.data.new_zeros((a.data.shape[0], R if trans_b else C), dtype=torch.float32)
    start = 0
    for e, m in enumerate(counts.tolist()):
        if m:
            rows = slice(start, start + m)
            out[rows] = group_mm(a, rows, Quantized(b.data[e], b.scale[e], b.block, b.fmt), trans_b)
        start += m
    return out


# --- BLOCKWISE: torch.nn.functional.scaled_mm with DeepSeek's scaling recipes (cuBLASLt, sm90) -------

def _blockwise_fits(a: Quantized, b: Quantized, block_a, block_b) -> bool:
    return a.fmt == E4M3 and b.fmt == E4M3 and a.block == block_a and b.block == block_b


def _blockwise_group_mm(a: Quantized, rows: slice, w: Quantized, trans_b: bool) -> torch.Tensor:
    if trans_b:  # Fprop: x [m, K] tiles x W [N, K] blocks
        return _cublas_blockwise(a.data[rows], a.scale[rows], w.data, w.scale, F.ScalingType.BlockWise128x128)
    # Dgrad: dy [m, N] tiles x W used as [N, K]; B^T = W^T [K, N], whose blocks are W's transposed
    return _cublas_blockwise(a.data[rows], a.scale[rows], w.data.t().contiguous(), w.scale.t(),
                             F.ScalingType.BlockWise128x128)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _padded(t: torch.Tensor, rows: int, cols: int, fill: float = 0.0) -> torch.Tensor:
    if tuple(t.shape) == (rows, cols) and t.is_contiguous():
        return t
    out = torch.full((rows, cols), fill, dtype=t.dtype, device=t.device)
    out[:t.shape[0], :t.shape[1]] = t
    return out


def _cublas_blockwise(a: torch.Tensor, sa: torch.Tensor, bt: torch.Tensor, sb: torch.Tensor,
                      recipe_b) -> torch.Tensor:
    """a [m, k] FP8 with 1x128 scales sa [m, ceil(k/128)] times B = bt^T, bt [n, k] FP8 with
    128x128 block scales sb [ceil(n/128), ceil(k/128)] (BlockWise128x128) or 1x128 scales
    sb [n, ceil(k/128)] (BlockWise1x128) -> fp32 [m, n]. Pads to cuBLASLt's alignment and lays the
    scales out as torch 2.13 requires (column-major; 128x128 scales with K blocks padded to 4)."""
    m, k = a.shape
    n = bt.shape[0]
    mp, kp = max(_round_up(m, 4), 128), _round_up(k, SLICE)  # small or odd m: no cuBLASLt heuristic
    npad = _round_up(n, SLICE if recipe_b == F.ScalingType.BlockWise128x128 else 16)
    kb = kp // SLICE
    a_p, bt_p = _padded(a, mp, kp), _padded(bt, npad, kp)
    sa_p = _padded(sa.t(), kb, mp, 1.0).t()  # [mp, kb], stride [1, mp]
    if recipe_b == F.ScalingType.BlockWise128x128:
        sb_p = _padded(sb, npad // SLICE, _round_up(kb, 4), 1.0).t()  # [L4, n/128], stride [1, L4]
    else:
        sb_p = _padded(sb.t(), kb, npad, 1.0).t()  # [npad, kb], stride [1, npad]
    out = F.scaled_mm(a_p, bt_p.t(), sa_p, F.ScalingType.BlockWise1x128, sb_p, recipe_b,
                      output_dtype=torch.float32)
    return out[:m, :n]


def check_backend(backend: str, device: str) -> None:
    """Run every GEMM of `backend` once on `device` against the emulation; raises if one fails or
    disagrees. hardware.probe uses it to pick the FP8 path (a layout the kernel misreads shows here)."""
    from .quant import quantize, quantize_row_tiles

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(256, 256, generator=g), torch.randn(256, 384, generator=g)
    w = torch.randn(2, 384, 256, generator=g)
    x, dy, w = x.to(device), dy.to(device), w.to(device)
    counts = torch.tensor([128, 128], device=device)
    xq, dyq, wq = quantize(x), quantize(dy), quantize(w, (SLICE, SLICE))
    dyt, xt = quantize_row_tiles(dy, counts), quantize_row_tiles(x, counts)
    pairs = [(fp8_mm(xq, wq, counts, True, backend), fp8_mm(xq, wq, counts, True)),
             (fp8_mm(dyq, wq, counts, False, backend), fp8_mm(dyq, wq, counts, False)),
             (fp8_wgrad(dyt, xt, counts, 2, backend), fp8_wgrad(dyt, xt, counts, 2))]
    for got, ref in pairs:
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max())):
            raise RuntimeError(f"FP8 backend {backend} disagrees with the emulation on {device}")


def limited_precision_dot(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 14,
                          promote_every: int | None = None, truncate: bool = False) -> torch.Tensor:
    """Row-wise dot products sum_k a[:, k] * b[:, k] through an accumulator that keeps only
    `mantissa_bits` fraction bits (DeepSeek-V3 sec. 3.3.2: Hopper's FP8 tensor cores keep about 14),
    rounding to nearest (or truncating, `truncate`), optionally flushing it into an exact fp32 sum every `promote_every` elements of K (FP32 promotion).
    Products are exact (FP8 x FP8 fits in fp32); only the running sum is rounded. Used by
    benchmarks/fp8_fidelity.py to reproduce the accumulation-error experiment."""
    prod = a.float() * b.float()  # [R, K]
    acc = torch.zeros(prod.shape[0], dtype=torch.float64)
    total = torch.zeros(prod.shape[0], dtype=torch.float64)
    for k in range(prod.shape[1]):
        acc = round_mantissa(acc + prod[:, k].double(), mantissa_bits, truncate)
        if promote_every and (k + 1) % promote_every == 0:
            total += acc
            acc.zero_()
    return (total + acc).float()


def round_mantissa(x: torch.Tensor, bits: int, truncate: bool = False) -> torch.Tensor:
    """Keep `bits` fraction bits of x (float64): round to nearest, or truncate toward zero."""
    mant, exp = torch.frexp(x)  # x = mant * 2^exp, 0.5 <= |mant| < 1
    scale = 2.0 ** (bits + 1)
    return torch.ldexp((torch.trunc if truncate else torch.round)(mant * scale) / scale, exp)
