"""The native kernel's weight layout: tiles of 16 rows, codes interleaved so that lanes are rows.

A weight on a group-wise grid w = (code - zero) * scale becomes, per tile of 16 rows (rows padded with zeros),
  codes   a run of 64-byte chunks; in each, row i owns bytes 4i..4i+3:
          INT8: the codes of 4 consecutive columns; INT4/INT3: 8 columns, k..k+3 in the low nibbles and k+4..k+7
          in the high ones; the tiles a thread computes together (4, or its last 1-3) are interleaved chunk by
          chunk, so that each thread streams its rows from one sequential run of memory;
  scales  float32 [tile, group, 16], and the integer zero points, uint8 in the same shape,
so one AVX-512 VNNI instruction multiplies 16 rows by 4 broadcast int8 activations with each output lane a row
(no horizontal sums), and the zero points cost one multiply-add per group. The grid is the model's, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from netshrink.errors import NetshrinkError
from netshrink.llm.packing import QuantizedWeight

BLOCK = 64    # activation block: one int8 scale per 64 columns; weight groups are whole blocks
TILE = 16     # rows per tile: one output lane each
GROUP = 4     # tiles computed (and stored interleaved) together


@dataclass
class NativeMatrix:
    codes: torch.Tensor          # uint8 [tiles, bytes per tile], see module docstring
    scales: torch.Tensor         # float32 [tiles, groups, 16]
    zeros: torch.Tensor          # uint8 [tiles, groups, 16]
    bias: torch.Tensor | None    # float32 [out]
    rows: int
    cols: int
    bits: int                    # 8, or 4 for INT4 and INT3 codes
    groups: int
    blocks_per_group: int
    threads: int                 # the thread count the tile groups were laid out for

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for one token."""
        tensors = [self.codes, self.scales, self.zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def check_native(in_features: int, bits: int, group_size: int, where: str) -> None:
    """Refuse grids the kernel has no layout for, naming the layer (from the grid's shape and settings alone)."""
    if bits not in (3, 4, 8):
        raise NetshrinkError(f"{bits}-bit weights have no native layout", where=where, hint="use 3, 4 or 8 bits")
    if in_features % 64:
        raise NetshrinkError(f"in_features={in_features} is not a multiple of 64", where=where,
                             hint="the native kernel reads blocks of 64 columns")
    if group_size < in_features and group_size % BLOCK:
        raise NetshrinkError(f"group size {group_size} is not a multiple of {BLOCK}", where=where,
                             hint="quantize with group_size 64, 128, 256, ... or per channel")
    if group_size < in_features and -(-in_features // group_size) > 1024:
        raise NetshrinkError(f"in_features={in_features} makes more than 1024 groups of {group_size}", where=where,
                             hint="use a larger group size")


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, (-t.shape[0]) % TILE))


def thread_tile_groups(rows: int, threads: int) -> list[tuple[int, int]]:
    """(first tile, tiles) of each group the kernel computes together: every thread's rows (equal shares in
    multiples of 16, as decode.cpp's thread_rows) in groups of 4 tiles, the last 1-3 together."""
    per = (-(-rows // threads) + 15) // 16 * 16
    groups = []
    for t in range(threads):
        r0 = min(rows, t * per)
        r1 = min(rows, r0 + per)
        if r0 >= r1:
            continue
        first, end = r0 // TILE, -(-r1 // TILE)
        groups += [(a, min(GROUP, end - a)) for a in range(first, end, GROUP)]
    return groups


def tile_codes(codes: torch.Tensor, bits: int, threads: int = 1) -> torch.Tensor:
    """uint8 codes [out, in] -> the kernel's bytes [tiles, 16 * in * bits / 8] (bits 8, or 4 for codes < 16):
    tiles of 16 rows in 64-byte chunks, each group of tiles (see `thread_tile_groups`) interleaved chunk by chunk."""
    c = _pad_rows(codes)
    tiles, in_f = c.shape[0] // TILE, c.shape[1]
    if bits == 8:
        chunks = c.reshape(tiles, TILE, in_f // 4, 4).permute(0, 2, 1, 3)       # [tiles, in / 4, 16, 4]
    else:
        halves = c.reshape(tiles, TILE, in_f // 8, 2, 4)
        packed = halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)                 # [tiles, 16, in / 8, 4]
        chunks = packed.permute(0, 2, 1, 3)                                     # [tiles, in / 8, 16, 4]
    chunks = chunks.reshape(tiles, -1, 64)
    out = torch.empty_like(chunks)
    for first, n in thread_tile_groups(codes.shape[0], threads):
        out[first: first + n] = chunks[first: first + n].transpose(0, 1).reshape(n, -1, 64)
    return out.reshape(tiles, -1)


def untile_codes(tiled: torch.Tensor, bits: int, out_f: int, in_f: int, threads: int = 1) -> torch.Tensor:
    """Inverse of `tile_codes`: codes [out_f, in_f]."""
    tiles = tiled.shape[0]
    chunks = tiled.reshape(tiles, -1, 64).clone()
    for first, n in thread_tile_groups(out_f, threads):
        chunks[first: first + n] = tiled.reshape(tiles, -1, 64)[first: first + n].reshape(-1, n, 64).transpose(0, 1)
    if bits == 8:
        c = chunks.reshape(tiles, in_f // 4, TILE, 4).permute(0, 2, 1, 3).reshape(tiles * TILE, in_f)
    else:
        p = chunks.reshape(tiles, in_f // 8, TILE, 4).permute(0, 2, 1, 3)     # [tiles, 16, in / 8, 4]
        c = torch.stack([p & 0xF, p >> 4], dim=3).reshape(tiles * TILE, in_f)
    return c[:out_f].contiguous()


def tile_groups(t: torch.Tensor) -> torch.Tensor:
    """[out, groups] -> [tiles, groups, 16] (padding rows: 0)."""
    p = _pad_rows(t)
    return p.reshape(-1, TILE, p.shape[1]).permute(0, 2, 1).contiguous()


def untile_groups(t: torch.Tensor, out_f: int) -> torch.Tensor:
    return t.permute(0, 2, 1).reshape(-1, t.shape[1])[:out_f]


def native_matrix(qw: QuantizedWeight, bias: torch.Tensor | None = None, where: str = "layer",
                  threads: int = 1) -> NativeMatrix:
    """The kernel's layout of one grid (see the module docstring), for a decoder running `threads` threads."""
    check_native(qw.shape[1], qw.bits, qw.group_size, where)
    out_f, in_f = qw.shape
    per_channel = qw.group_size >= in_f
    groups = 1 if per_channel else qw.scales.shape[1]
    blocks_per_group = -(-in_f // BLOCK) if per_channel else qw.group_size // BLOCK
    bits = 8 if qw.bits == 8 else 4
    codes = tile_codes(qw.codes, bits, threads)
    scales, zeros = tile_groups(qw.scales[:, :groups].float()), tile_groups(qw.zeros[:, :groups])
    bias = None if bias is None else bias.detach().float().contiguous()
    return NativeMatrix(codes, scales, zeros, bias, out_f, in_f, bits, groups, blocks_per_group, threads)


def layout_nbytes(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> int:
    """Bytes `native_matrix(qw, bias)` occupies (and a token reads), without building it."""
    out_f, in_f = qw.shape
    tiles = -(-out_f // TILE)
    groups = 1 if qw.group_size >= in_f else qw.scales.shape[1]
    bits = 8 if qw.bits == 8 else 4
    return tiles * TILE * in_f * bits // 8 + tiles * groups * TILE * 5 + (0 if bias is None else out_f * 4)


def native_matvec(m: NativeMatrix, x: torch.Tensor) -> torch.Tensor:
    """y = W x through the native kernel on the calling thread (float32 [in] -> float32 [out])."""
    from netshrink.llm.native.build import load_library

    x = x.detach().float().contiguous()
    if x.shape != (m.cols,):
        raise NetshrinkError(f"x has shape {tuple(x.shape)}, the matrix takes ({m.cols},)", where="native_matvec")
    y = torch.empty(m.rows)
    load_library().nsd_matvec(m.codes.data_ptr(), m.scales.data_ptr(), m.zeros.data_ptr(),
                              None if m.bias is None else m.bias.data_ptr(), m.rows, m.cols, m.bits, m.groups,
                              m.blocks_per_group, m.threads, x.data_ptr(), y.data_ptr())
    return y


def reference_matvec(m: NativeMatrix, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: activations quantized per 64-column block, then the grid's matvec.
    For tests: the kernel must match this to float32 rounding."""
    xq, a = quantize_activation(x)
    codes = untile_codes(m.codes, m.bits, m.rows, m.cols, m.threads).double()
    blocks = torch.arange(m.cols) // BLOCK
    group = blocks // m.blocks_per_group
    scales, zeros = untile_groups(m.scales, m.rows).double(), untile_groups(m.zeros, m.rows).double()
    w = (codes - zeros[:, group]) * scales[:, group]
    y = w @ (xq * a[blocks])
    return y + m.bias.double() if m.bias is not None else y


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 64 values, in float32 as the kernel does: (codes, absmax / 127 per block)."""
    x32 = x.float()
    blocks = torch.arange(x32.shape[0]) // BLOCK
    amax = torch.zeros(int(blocks[-1]) + 1).scatter_reduce(0, blocks, x32.abs(), "amax")
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.clamp(torch.round(x32 * inv[blocks]), -127, 127)
    return q.double(), (amax / 127).double()
