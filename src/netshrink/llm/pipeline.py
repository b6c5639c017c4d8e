"""Layer-by-layer compression: calibrate and compress one decoder block at a time.

Block i is calibrated on the outputs of blocks 0..i-1 *after* they were compressed, so each block corrects for
the error already made before it; only one block's statistics and the calibration activations [n, T, hidden]
are alive at once. This module runs on a model in memory; `netshrink.llm.stream` runs the same loop on weights
streamed from (sharded) safetensors.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm import awq, gptq, magnitude, rtn, smoothquant, sparsegpt, wanda
from netshrink.llm.arch import LINEARS
from netshrink.llm.checks import check_block_finite
from netshrink.llm.context import QWEIGHT_ATTR, BlockContext
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm.runner import BlockRunner

METHODS: dict[type, Callable] = {
    rtn.RTN: rtn.compress_block,
    gptq.GPTQ: gptq.compress_block,
    awq.AWQ: awq.compress_block,
    smoothquant.SmoothQuant: smoothquant.compress_block,
    sparsegpt.SparseGPT: sparsegpt.compress_block,
    wanda.Wanda: wanda.compress_block,
    magnitude.Magnitude: magnitude.compress_block,
}
NEEDS_CALIBRATION = (gptq.GPTQ, awq.AWQ, smoothquant.SmoothQuant, sparsegpt.SparseGPT, wanda.Wanda)


def method_of(config: Any) -> Callable:
    """The block function for a config object."""
    fn = METHODS.get(type(config))
    if fn is None:
        raise NetshrinkError(f"unknown LLM compression config {type(config).__name__}", where="compress_llm",
                             hint=f"use one of {', '.join(c.__name__ for c in METHODS)}")
    return fn


def pack_block(block: nn.Module) -> None:
    """Swap every Linear that carries a quantized grid for a PackedLinear (real low-bit storage and kernel)."""
    for name in LINEARS:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        layer = getattr(parent, child)
        qw = getattr(layer, QWEIGHT_ATTR, None)
        if isinstance(layer, nn.Linear) and qw is not None:
            setattr(parent, child, PackedLinear.from_quantized(qw, layer.bias))


def compress_block(block: nn.Module, hidden: torch.Tensor | None, runner: BlockRunner | None, config: Any,
                   where: str, pack: bool) -> tuple[dict[str, dict], torch.Tensor | None]:
    """Compress one block in place; returns its records and its outputs (the next block's inputs)."""
    if hidden is not None and not torch.isfinite(hidden).all():
        raise NetshrinkError("input hidden states are NaN or Inf", where=where,
                             hint="an earlier block or the embeddings produce non-finite values")
    check_block_finite(block, where)
    ctx = BlockContext(block, hidden, runner, where)
    method_of(config)(ctx, config)
    if pack:
        pack_block(block)
    out = runner.run(block, hidden, where) if hidden is not None else None
    return ctx.records, out


def run_blocks(layers: nn.ModuleList, hidden: torch.Tensor | None, runner: BlockRunner | None, config: Any,
               prefix: str, pack: bool, progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Compress every block of an in-memory model, feeding each the outputs of the compressed ones before it."""
    records: dict[str, dict] = {}
    for i, block in enumerate(layers):
        recs, hidden = compress_block(block, hidden, runner, config, f"{prefix}.{i}", pack)
        records.update(recs)
        if progress is not None:
            progress(i + 1, len(layers))
    return records
