"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then run W8A8.

Per input channel j of Linears sharing an input, s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha); dividing the
producing RMSNorm's weight by s and multiplying the Linears' columns by s leaves the float function unchanged but
flattens the activations. Every Linear then runs with INT8 weights (symmetric, per output channel) and INT8
activations quantized per token at run time, multiplied in integers (torch._int_mm, int32 accumulation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from netshrink.llm.arch import LINEARS, SCALE_PAIRS
from netshrink.llm.awq import fold_scale
from netshrink.llm.checks import check, is_real
from netshrink.llm.context import BlockContext
from netshrink.quant.primitives import QScheme, choose_qparams, quantize


@dataclass
class SmoothQuant:
    """SmoothQuant settings: migration strength alpha; INT8 weights per channel, INT8 activations per token."""

    alpha: float = 0.5
    smooth: bool = True

    method = "smoothquant"

    def __post_init__(self) -> None:
        check(self, "alpha", is_real(self.alpha) and 0 <= self.alpha <= 1, "in [0, 1]")


WEIGHT_SCHEME = QScheme(bits=8, symmetric=True, signed=True, granularity="channel", axis=0)
TOKEN_SCHEME = QScheme(bits=8, symmetric=True, signed=True, granularity="channel", axis=0)


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) over all Linears reading X."""
    w_max = torch.cat([w.detach().abs().float() for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


class W8A8Linear(nn.Module):
    """INT8 weight (per output channel) x INT8 activation (per token, dynamic), int32 accumulation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "W8A8Linear":
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        W = layer.weight.detach().float()
        scale, zero = choose_qparams(W, WEIGHT_SCHEME)
        new.weight_int8.copy_(quantize(W, scale, zero, WEIGHT_SCHEME))
        new.weight_scale.copy_(scale)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach().float())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        a_scale, a_zero = choose_qparams(x2, TOKEN_SCHEME)  # one scale per token (row)
        xq = quantize(x2, a_scale, a_zero, TOKEN_SCHEME)
        acc = torch._int_mm(xq, self.weight_int8.t())
        y = acc.float() * a_scale.reshape(-1, 1) * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8 per-channel x per-token"


def compress_block(ctx: BlockContext, config: SmoothQuant) -> None:
    """Smooth the norm -> Linear pairs of the block with calibration maxima, then swap every Linear for W8A8."""
    if config.smooth:
        stats = ctx.runner.collect(ctx.block, ctx.inputs, list(LINEARS), {"abs_max"}, ctx.where)
        for prev_name, names in SCALE_PAIRS:
            prev = ctx.block.get_submodule(prev_name)
            if isinstance(prev, nn.Linear):
                continue  # SmoothQuant folds into normalisation layers only
            layers = [ctx.linear(n) for n in names]
            s = smooth_scales(stats[names[0]].abs_max, [layer.weight for layer in layers], config.alpha)
            fold_scale(prev, layers, s)
    for name in LINEARS:
        parent_name, _, child = name.rpartition(".")
        parent = ctx.block.get_submodule(parent_name)
        setattr(parent, child, W8A8Linear.from_linear(getattr(parent, child)))
        ctx.records[f"{ctx.where}.{name}"] = dict(method="smoothquant", bits=8, activation_bits=8,
                                                  granularity="channel", activation_granularity="token",
                                                  alpha=config.alpha if config.smooth else None)
