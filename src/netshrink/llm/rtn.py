"""Round-to-nearest: every weight to its nearest grid point, per channel or per group. The baseline to beat."""
from __future__ import annotations

from dataclasses import dataclass

from netshrink.llm.context import BlockContext
from netshrink.llm.grid import quantize_weight


@dataclass
class RTN:
    """Round-to-nearest weight quantization (group_size None = per output channel)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    method = "rtn"


def compress_block(ctx: BlockContext, config: RTN) -> None:
    """Quantize the block's Linears from their weights alone (no calibration needed)."""
    def one(name, layer, _stats):
        qw = quantize_weight(layer.weight, config.bits, config.group_size, config.symmetric)
        ctx.set_weight(name, qw.dequantize(), qw, method="rtn", bits=config.bits,
                       granularity="group" if config.group_size else "channel", group_size=config.group_size,
                       symmetric=config.symmetric)
    ctx.sequential(set(), one)
