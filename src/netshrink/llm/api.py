"""`compress_llm`: the one entry point for GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda, magnitude and RTN on a
decoder LLM held in memory (for checkpoints larger than memory see `netshrink.llm.stream.compress_checkpoint`)."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm.arch import arch_of
from netshrink.llm.calibration import calibration_ids, check_ids_in_vocab
from netshrink.llm.checks import check_pack
from netshrink.llm.grid import quantize_weight
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm.pipeline import NEEDS_CALIBRATION, method_of, pack_block, run_blocks
from netshrink.llm.runner import BlockRunner
from netshrink.record import note


@torch.no_grad()
def compress_llm(model: nn.Module, config: Any, calibration: Any = None, *, tokenizer: Any = None,
                 n_samples: int = 32, seq_len: int = 512, batch_size: int = 8, pack: bool = False,
                 inplace: bool = False, seed: int = 0, progress: Callable[[int, int], None] | None = None
                 ) -> nn.Module:
    """Compress a Llama-family causal LM block by block with `config` (RTN, GPTQ, AWQ, SmoothQuant, SparseGPT,
    Wanda, Magnitude); `calibration` is token ids [n, T], a text or a list of texts (with `tokenizer`).

    Quantized Linears keep float weights equal to their dequantized grid unless `pack=True`, which swaps them for
    PackedLinear (INT4/INT3 on torch's int4 kernel, INT8 on the int8 kernel). Returns the model (a copy unless
    `inplace`), with every change recorded in its layer record.
    """
    method_of(config)
    check_pack(config, pack)
    arch = arch_of(model)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    layers = model.get_submodule(arch.layers)
    hidden = runner = None
    if calibration is not None or isinstance(config, NEEDS_CALIBRATION):
        if calibration is None:
            raise NetshrinkError(f"{type(config).__name__} needs calibration data", where="compress_llm",
                                 hint="pass calibration= text (with tokenizer=) or token ids")
        ids = calibration_ids(calibration, tokenizer, n_samples, seq_len, seed)
        embed = model.get_submodule(arch.embed)
        check_ids_in_vocab(ids, embed.weight.shape[0], arch.embed + ".weight")
        hidden = embed(ids).float()
        runner = BlockRunner(model.get_submodule("model.rotary_emb"), ids.shape[1], hidden.shape[-1], batch_size)
    records = run_blocks(layers, hidden, runner, config, arch.layers, pack, progress)
    for name, fields in records.items():
        note(model, name, **fields)
    return model


def pack_model(model: nn.Module) -> nn.Module:
    """Swap the quantized Linears of a `compress_llm(..., pack=False)` result for PackedLinear, in place."""
    arch = arch_of(model)
    for block in model.get_submodule(arch.layers):
        pack_block(block)
    return model


@torch.no_grad()
def pack_lm_head(model: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """Round the LM head to `bits` (INT8: symmetric per channel; INT4: asymmetric, `group_size`) and swap it for a
    PackedLinear, in place. At batch 1 every head weight is read once per token, and SmolLM2's 49152x576 head is
    the largest matrix it has: left in FP32 it costs more bytes per token than all 30 INT4 blocks together. A tied
    head is untied; the input embedding keeps its float table (one row of it is read per token)."""
    arch = arch_of(model)
    head = model.get_submodule(arch.lm_head)
    if not isinstance(head, nn.Linear):
        raise NetshrinkError(f"{arch.lm_head} is a {type(head).__name__}, not a Linear", where="pack_lm_head",
                             hint="pack the head once")
    symmetric = bits == 8 and group_size is None
    qw = quantize_weight(head.weight, bits, group_size, symmetric)
    parent, _, child = arch.lm_head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, PackedLinear.from_quantized(qw, head.bias))
    model.config.tie_word_embeddings = False
    note(model, arch.lm_head, method="rtn", bits=bits, granularity="group" if group_size else "channel",
         group_size=group_size, symmetric=symmetric)
    return model
