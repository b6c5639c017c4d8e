"""The weight grid every LLM method rounds onto: group-wise affine codes built on `netshrink.quant.primitives`.

Groups are consecutive input columns of a Linear weight [out, in]; a last group shorter than `group_size`
(e.g. 576 columns in groups of 128) is allowed, as in the GPTQ and AWQ reference code.
"""
from __future__ import annotations

import torch

from netshrink.llm.packing import QuantizedWeight
from netshrink.quant.primitives import QScheme, compute_qparams, dequantize, quantize, reduce_min_max


def row_scheme(bits: int, symmetric: bool) -> QScheme:
    """Unsigned codes with one scale and zero point per output row of a column slice."""
    return QScheme(bits=bits, symmetric=symmetric, signed=False, granularity="channel", axis=0)


def slice_qparams(w: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor | float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for a column slice `w` [out, width] (its range optionally shrunk by `clip`)."""
    scheme = row_scheme(bits, symmetric)
    lo, hi = reduce_min_max(w, scheme)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    return compute_qparams(lo, hi, scheme)


def round_slice(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and dequantized values of `w` [out, width] (or [out]) on a per-row grid."""
    scheme = row_scheme(bits, symmetric)
    q = quantize(w, scale, zero, scheme)
    return q, dequantize(q, scale, zero, scheme)


def group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    """Column ranges of the groups (one range for per-channel)."""
    g = group_size or in_features
    return [(i, min(i + g, in_features)) for i in range(0, in_features, g)]


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest of a whole weight [out, in], group by group; `clip` [out, groups] shrinks each range."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = group_size or in_f
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales, zeros = [], []
    for j, (a, b) in enumerate(group_bounds(in_f, group_size)):
        s, z = slice_qparams(w[:, a:b], bits, symmetric, None if clip is None else clip[:, j])
        codes[:, a:b] = quantize(w[:, a:b], s, z, row_scheme(bits, symmetric))
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(codes, torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.uint8), bits, gs)


def assemble(codes: torch.Tensor, scales: list[torch.Tensor], zeros: list[torch.Tensor], bits: int,
             group_size: int | None) -> QuantizedWeight:
    """A QuantizedWeight from codes and per-group lists of row scales / zero points."""
    return QuantizedWeight(codes.to(torch.uint8), torch.stack(scales, 1).float(),
                           torch.stack(zeros, 1).to(torch.uint8), bits, group_size or codes.shape[1])
