"""Round-to-nearest: every weight to its nearest grid point, per channel or per group. The baseline to beat."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from netshrink.llm.checks import check_grid
from netshrink.llm.context import BlockContext
from netshrink.llm.grid import quantize_weight
from netshrink.llm.packing import QuantizedWeight


@dataclass
class RTN:
    """Round-to-nearest weight quantization (group_size None = per output channel)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    method = "rtn"

    def __post_init__(self) -> None:
        check_grid(self)


def record(config: RTN) -> dict:
    """What the manifest says about a Linear quantized by RTN."""
    return dict(method="rtn", bits=config.bits, granularity="group" if config.group_size else "channel",
                group_size=config.group_size, symmetric=config.symmetric)


def compress_block(ctx: BlockContext, config: RTN) -> None:
    """Quantize the block's Linears from their weights alone (no calibration needed)."""
    def one(name, layer, _stats):
        qw = quantize_weight(layer.weight, config.bits, config.group_size, config.symmetric)
        ctx.set_weight(name, qw.dequantize, qw, **record(config))
    ctx.sequential(set(), one)


def quantize_in_row_chunks(read_rows: Callable[[int, int], torch.Tensor], out_features: int, config: RTN,
                           chunk_rows: int = 64) -> QuantizedWeight:
    """RTN of a weight read `chunk_rows` output rows at a time: every row has its own grid, so the result equals
    `quantize_weight` on the whole weight while only a slab of it is ever in memory (streaming from disk)."""
    codes = scales = zeros = None
    for start in range(0, out_features, chunk_rows):
        stop = min(start + chunk_rows, out_features)
        part = quantize_weight(read_rows(start, stop), config.bits, config.group_size, config.symmetric)
        if codes is None:
            codes = torch.empty(out_features, part.codes.shape[1], dtype=part.codes.dtype)
            scales = torch.empty(out_features, part.scales.shape[1], dtype=part.scales.dtype)
            zeros = torch.empty(out_features, part.zeros.shape[1], dtype=part.zeros.dtype)
        codes[start:stop], scales[start:stop], zeros[start:stop] = part.codes, part.scales, part.zeros
    return QuantizedWeight(codes, scales, zeros, part.bits, part.group_size)
