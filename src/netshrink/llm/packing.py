"""Group-wise low-bit weight storage: a canonical packed form (INT3/INT4/INT8) and torch's CPU kernel layouts.

Canonical form, the one checkpoints and exporters read (see docs/llm.md):
  codes  uint8 [out, in]        unsigned codes in [0, 2**bits - 1]
  scales float32 [out, groups]  one scale per `group_size` input columns (groups = ceil(in / group_size))
  zeros  uint8 [out, groups]    integer zero points: w = (code - zero) * scale
`pack_codes` turns codes into `qweight` bytes: INT8 one code a byte, INT4 two (low nibble = even column),
INT3 eight codes in three bytes (code i in bits 3i..3i+2, little-endian).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from netshrink.errors import NetshrinkError

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes torch's CPU int4 kernel accepts


@dataclass
class QuantizedWeight:
    """A weight on a group-wise affine grid: the result every quantizing method hands to packing and export."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # uint8 [out, groups]
    bits: int
    group_size: int  # == in_features for per-channel

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """Repeat a per-group tensor [out, groups] over its columns [out, in]."""
        return t.repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]

    def dequantize(self, dtype: torch.dtype = torch.float32, rows_per_chunk: int = 1024) -> torch.Tensor:
        """The float weight this grid stands for: (code - zero) * scale.

        Computed in row chunks into one output, so the temporaries stay small next to the result (a 14336 x 4096
        weight would otherwise hold three more float copies of itself at once).
        """
        out = torch.empty(self.codes.shape, dtype=dtype)
        for a in range(0, self.codes.shape[0], rows_per_chunk):
            b = a + rows_per_chunk
            zeros, scales = self.expand(self.zeros[a:b].float()), self.expand(self.scales[a:b].float())
            out[a:b] = ((self.codes[a:b].float() - zeros) * scales).to(dtype)
        return out


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def pad_columns(t: torch.Tensor, multiple: int, value: int = 0) -> torch.Tensor:
    """Pad the last dimension of `t` up to a multiple of `multiple`."""
    extra = (-t.shape[-1]) % multiple
    if extra == 0:
        return t
    return torch.nn.functional.pad(t, (0, extra), value=value)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [out, in] into bytes (INT8: as is; INT4: 2 a byte; INT3: 8 in 3 bytes), padding `in`."""
    if codes.dtype != torch.uint8:
        raise NetshrinkError(f"codes must be uint8, got {codes.dtype}", where="pack_codes")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise NetshrinkError(f"a code does not fit in {bits} bits", where="pack_codes")
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        from netshrink.quant.primitives import pack_int4

        return pack_int4(pad_columns(codes, 2)).contiguous()
    if bits == 3:
        c = pad_columns(codes, 8).to(torch.int32).reshape(codes.shape[0], -1, 8)
        word = torch.zeros(c.shape[:2], dtype=torch.int32)
        for i in range(8):
            word |= c[..., i] << (3 * i)
        out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(3)], dim=-1)
        return out.reshape(codes.shape[0], -1).to(torch.uint8)
    raise NetshrinkError(f"unsupported bit width {bits}", where="pack_codes", hint="use 3, 4 or 8")


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: bytes back to uint8 codes [out, in_features]."""
    if bits == 8:
        return qweight[:, :in_features].contiguous()
    if bits == 4:
        from netshrink.quant.primitives import unpack_int4

        return unpack_int4(qweight, signed=False)[:, :in_features].to(torch.uint8).contiguous()
    if bits == 3:
        b = qweight.to(torch.int32).reshape(qweight.shape[0], -1, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        c = torch.stack([(word >> (3 * i)) & 0x7 for i in range(8)], dim=-1)
        return c.reshape(qweight.shape[0], -1)[:, :in_features].to(torch.uint8).contiguous()
    raise NetshrinkError(f"unsupported bit width {bits}", where="unpack_codes", hint="use 3, 4 or 8")


def kernel_group(group_size: int, in_features: int) -> int:
    """The int4-kernel group size for a canonical `group_size`: one of 256/128/64/32 that divides it (per channel:
    any), choosing the one that pads `in_features` least, then the largest. 576 columns in groups of 128 run as
    groups of 64 (each scale repeated twice): no padded weight columns and no padding of every activation."""
    per_channel = group_size >= in_features
    fits = [g for g in KERNEL_GROUPS if per_channel or group_size % g == 0]
    if not fits:
        raise NetshrinkError(
            f"group size {group_size} has no int4 kernel layout",
            where=f"in_features={in_features}",
            hint=f"use a multiple of 32 ({', '.join(map(str, KERNEL_GROUPS))}) or per-channel",
        )
    return min(fits, key=lambda g: ((-in_features) % g, -g))


def to_int4_kernel(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Convert a 3- or 4-bit grid to torch's CPU int4 layout: (packed uint8, scale_and_zero bf16 [G, N16, 2], group).

    The kernel computes w = (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale; INT3 codes are shifted by 4
    into the middle of the 4-bit range (exact). Rows are padded to a multiple of 16, columns to the group.
    """
    if qw.bits not in (3, 4):
        raise NetshrinkError(f"the int4 kernel takes 3- or 4-bit weights, got {qw.bits}", where="to_int4_kernel")
    out_f, in_f = qw.codes.shape
    shift = 4 if qw.bits == 3 else 0
    per_channel = qw.group_size >= in_f
    kg = kernel_group(qw.group_size, in_f)
    k_pad = in_f + (-in_f) % kg
    n_pad = out_f + (-out_f) % 16
    zeros = qw.zeros.float() + shift
    scales = qw.scales.float()
    if per_channel:  # one scale per row, repeated over kernel groups
        scales, zeros = scales.expand(out_f, k_pad // kg), zeros.expand(out_f, k_pad // kg)
    else:
        reps = qw.group_size // kg
        scales = scales.repeat_interleave(reps, 1)
        zeros = zeros.repeat_interleave(reps, 1)
        g = k_pad // kg  # the canonical groups cover at least k_pad columns
        scales, zeros = scales[:, :g], zeros[:, :g]
    zero_f = (8.0 - zeros) * scales
    scales = torch.nn.functional.pad(scales, (0, 0, 0, n_pad - out_f))
    zero_f = torch.nn.functional.pad(zero_f, (0, 0, 0, n_pad - out_f))
    sz = torch.stack([scales, zero_f], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    # The converter takes int32 codes, 4 bytes per weight: rows go through 256 at a time (each row's packed bytes
    # depend on that row alone; tested against one whole conversion), in one int32 buffer filled in place (a
    # temporary per slab would be freed and reallocated, and glibc keeps such freed megabytes resident).
    packed = torch.empty(n_pad, k_pad // 2, dtype=torch.uint8)
    buffer = torch.empty(min(256, n_pad), k_pad, dtype=torch.int32)
    for a in range(0, n_pad, 256):
        b = min(a + 256, n_pad)
        rows = buffer[: b - a]
        rows.fill_(8)                                                       # padding: code 8 (weight 0 + zero_f)
        real = max(0, min(b, out_f) - a)
        if real:
            rows[:real, :in_f].copy_(qw.codes[a: a + real])
            if shift:
                rows[:real, :in_f] += shift
        packed[a:b] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
    return packed, sz, kg


def to_int8_kernel(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's `_weight_int8pack_mm` layout (int8 [N, K], bf16 scales [N]) when the grid is symmetric per channel."""
    if qw.bits != 8 or qw.scales.shape[1] != 1 or not bool((qw.zeros == 128).all()):
        return None
    w8 = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    return w8, qw.scales[:, 0].to(torch.bfloat16).contiguous()
