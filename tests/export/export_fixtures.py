"""Compressed variants of the zoo models for the export tests, built cheaply (a few layers, exact patterns)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from netshrink.llm.grid import quantize_weight
from netshrink.llm.packed_linear import PackedLinear
from netshrink.quant.primitives import QScheme, fake_quantize
from netshrink.record import note
from netshrink.sparsity.masks import set_mask


def pack_layers(model: nn.Module, symmetric: bool, blocks=(0, 1), group_size: int = 32) -> nn.Module:
    """A copy of a Llama model with some projections of `blocks` swapped for netshrink's PackedLinear (INT4)."""
    m = copy.deepcopy(model)
    for i in blocks:
        blk = m.model.layers[i]
        for parent, name in ((blk.self_attn, "q_proj"), (blk.self_attn, "k_proj"), (blk.mlp, "down_proj")):
            lin = getattr(parent, name)
            qw = quantize_weight(lin.weight, 4, group_size, symmetric)
            setattr(parent, name, PackedLinear.from_quantized(qw, lin.bias))
            note(m, f"model.layers.{i}.{'self_attn' if parent is blk.self_attn else 'mlp'}.{name}", method="rtn",
                 bits=4, group_size=group_size, symmetric=symmetric)
    return m


def compressed_cnn(model: nn.Module) -> nn.Module:
    """The digit CNN with one magnitude mask, one exactly 2:4-sparse layer and one fake-quantized INT4 layer."""
    m = copy.deepcopy(model)
    conv = m.conv_layers[3]
    set_mask(conv, conv.weight.abs() > conv.weight.abs().median(), where="conv_layers.3")
    note(m, "conv_layers.3", method="magnitude", sparsity=0.5)
    fc = m.fc_layers[0]
    w = fc.weight.data.view(fc.out_features, -1, 4)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter(-1, w.abs().topk(2, -1).indices, True)
    fc.weight.data = (w * keep).view(fc.out_features, -1)
    note(m, "fc_layers.0", method="nm", pattern="2:4", sparsity=0.5)
    last = m.fc_layers[2]
    last.weight.data = fake_quantize(last.weight.data, QScheme(bits=4, granularity="group", axis=1, group_size=32))
    note(m, "fc_layers.2", method="rtn", bits=4, group_size=32)
    return m
