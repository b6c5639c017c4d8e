"""Compact, lossless storage of one weight tensor: N:M values + indices, or integer codes + scales, else dense.

Each compact form is used only when decoding it gives back exactly the same tensor (checked at save time with
`torch.equal`), so a checkpoint always reproduces the in-memory model bit for bit:

- ``nm``: in every run of M consecutive inputs (per output row) at most N weights are non-zero (2:4 is what
  sparse tensor cores read). Stored as the N kept values per group plus their 4-bit positions.
- ``int``: the weight lies on an affine integer grid (a fake-quantized weight). Stored as packed codes, scale and
  zero point from `netshrink.quant.primitives`, in the layer record's bits and group size.
- ``dense``: the tensor as is.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from netshrink.quant.primitives import QScheme, dequantize, pack_int4, quantize_tensor, unpack_int4

Tensors = dict[str, torch.Tensor]


def parse_pattern(pattern: Any) -> tuple[int, int] | None:
    """(N, M) from a record's pattern such as "2:4" or (2, 4); None for anything else."""
    if isinstance(pattern, (list, tuple)) and len(pattern) == 2:
        return int(pattern[0]), int(pattern[1])
    if isinstance(pattern, str) and (m := re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)):
        return int(m.group(1)), int(m.group(2))
    return None


def _as_rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)


def compress_nm(w: torch.Tensor, n: int, m: int) -> Tensors | None:
    """Kept values [rows, groups*n] and packed 4-bit positions, or None when `w` is not exactly N:M sparse."""
    rows = _as_rows(w)
    if not (0 < n < m <= 16) or rows.shape[1] % m or not w.is_floating_point():
        return None
    groups = rows.reshape(rows.shape[0], -1, m)
    idx = groups.abs().float().topk(n, dim=-1).indices.sort(dim=-1).values
    values = groups.gather(-1, idx)
    rebuilt = torch.zeros_like(groups).scatter(-1, idx, values)
    if not torch.equal(rebuilt, groups):
        return None
    flat_idx = idx.reshape(-1).to(torch.uint8)
    if flat_idx.numel() % 2:
        flat_idx = torch.cat([flat_idx, flat_idx.new_zeros(1)])
    return {"values": values.reshape(rows.shape[0], -1).contiguous(), "indices": pack_int4(flat_idx).contiguous()}


def decompress_nm(t: Tensors, shape: list[int], n: int, m: int) -> torch.Tensor:
    """Inverse of `compress_nm`."""
    values = t["values"]
    rows = values.shape[0]
    groups = values.shape[1] // n
    idx = unpack_int4(t["indices"], signed=False)[: rows * groups * n].to(torch.int64).reshape(rows, groups, n)
    dense = torch.zeros(rows, groups, m, dtype=values.dtype).scatter(-1, idx, values.reshape(rows, groups, n))
    return dense.reshape(shape)


def _schemes(record: dict[str, Any], w: torch.Tensor) -> list[QScheme]:
    bits = record.get("bits")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        return []
    group = record.get("group_size")
    cols = _as_rows(w).shape[1]
    out = []
    for symmetric in (bool(record.get("symmetric", True)), not record.get("symmetric", True)):
        if isinstance(group, int) and 0 < group < cols and cols % group == 0:
            out.append(QScheme(bits=bits, symmetric=symmetric, granularity="group", axis=1, group_size=group))
        out.append(QScheme(bits=bits, symmetric=symmetric, granularity="channel", axis=0))
    return out


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4 and q.shape[-1] % 2 == 0:
        return pack_int4(q)
    return q


def _exact_per_slice(deq: torch.Tensor, target: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """For each scale slot (a channel, or a group of a channel): whether every element is reproduced exactly."""
    same = deq == target
    if scheme.granularity == "channel":
        return same.all(dim=1)
    return same.reshape(same.shape[0], -1, scheme.group_size).all(dim=2)


def _snap_scales(rows: torch.Tensor, target: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 scheme: QScheme, steps: int = 4) -> torch.Tensor | None:
    """Scales reproducing `target` exactly from codes `q`: the min-max scale recomputed from on-grid values can be
    a few ulps off the one that made them, so try its float neighbours slot by slot."""
    best = scale.clone()
    done = _exact_per_slice(dequantize(q, best, zero, scheme).to(target.dtype), target, scheme)
    for direction in (1.0, -1.0):
        cand = scale.clone()
        for _ in range(steps):
            if bool(done.all()):
                return best
            cand = torch.nextafter(cand, torch.full_like(cand, direction * float("inf")))
            ok = _exact_per_slice(dequantize(q, cand, zero, scheme).to(target.dtype), target, scheme) & ~done
            best = torch.where(ok, cand, best)
            done |= ok
    return best if bool(done.all()) else None


def compress_int(w: torch.Tensor, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]] | None:
    """Integer codes, scale and zero point when `w` lies exactly on the grid the record describes, else None."""
    if not w.is_floating_point() or w.numel() == 0 or not torch.isfinite(w).all():
        return None
    target = _as_rows(w)
    rows = target.float()
    for scheme in _schemes(record, w):
        q, scale, zero, scheme = quantize_tensor(rows, scheme)
        scale = _snap_scales(rows, target, q, scale, zero, scheme)
        if scale is not None and torch.equal(dequantize(q, scale, zero, scheme).to(w.dtype), target):
            meta = {"bits": scheme.bits, "symmetric": scheme.symmetric, "signed": scheme.signed,
                    "granularity": scheme.granularity, "axis": scheme.axis, "group_size": scheme.group_size,
                    "packed": scheme.bits == 4 and q.shape[-1] % 2 == 0}
            return {"codes": _pack(q, scheme.bits).contiguous(), "scale": scale.contiguous(),
                    "zero_point": zero.contiguous()}, meta
    return None


def decompress_int(t: Tensors, meta: dict[str, Any], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `compress_int`."""
    scheme = QScheme(bits=meta["bits"], symmetric=meta["symmetric"], signed=meta["signed"],
                     granularity=meta["granularity"], axis=meta["axis"], group_size=meta["group_size"])
    q = unpack_int4(t["codes"], signed=scheme.signed) if meta["packed"] else t["codes"]
    return dequantize(q, t["scale"], t["zero_point"], scheme).to(dtype).reshape(shape)


def encode_weight(w: torch.Tensor, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
    """The most compact exact form of `w` given its layer record: tensors plus a meta dict naming the layout."""
    w = w.detach().contiguous()
    meta: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}
    nm = parse_pattern(record.get("pattern"))
    if nm is None and w.ndim > 1 and w.is_floating_point() and w.shape[-1] % 4 == 0:
        nm = (2, 4) if bool((_as_rows(w).reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all()) else None
    if nm is not None and (packed := compress_nm(w, *nm)) is not None:
        return packed, {**meta, "layout": "nm", "n": nm[0], "m": nm[1]}
    if (grid := compress_int(w, record)) is not None:
        return grid[0], {**meta, "layout": "int", **grid[1]}
    return {"dense": w}, {**meta, "layout": "dense"}


def decode_weight(t: Tensors, meta: dict[str, Any]) -> torch.Tensor:
    """Inverse of `encode_weight`."""
    dtype = getattr(torch, meta["dtype"])
    if meta["layout"] == "nm":
        return decompress_nm(t, meta["shape"], meta["n"], meta["m"]).to(dtype)
    if meta["layout"] == "int":
        return decompress_int(t, meta, meta["shape"], dtype)
    return t["dense"]
