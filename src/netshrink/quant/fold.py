"""Fold BatchNorm into the convolution before it: conv(x) * g / sqrt(var + eps) + (b - mean) * g / sqrt(var + eps) + beta
is one convolution with rescaled weights and a new bias, so the BN costs nothing and is quantized with the conv."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Rewrite `conv` in place to include `bn` (its running statistics and affine parameters)."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    shape = [-1] + [1] * (conv.weight.ndim - 1)
    conv.weight.copy_((conv.weight.double() * factor.reshape(shape)).to(conv.weight.dtype))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
    new_bias = ((bias - bn.running_mean.double()) * factor + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


@torch.no_grad()
def _unfold(parent: nn.Module, bn_key: str, conv: nn.Module, bn: nn.Module, weight: torch.Tensor,
            bias: torch.Tensor | None) -> None:
    """Put a folded pair back as it was: the conv's own weight and bias (same Parameter objects) and the BatchNorm."""
    conv.weight.copy_(weight)
    if bias is None:
        conv.register_parameter("bias", None)
    else:
        conv.bias.copy_(bias)
    parent._modules[bn_key] = bn


def fold_batchnorms(model: nn.Module, undo: list[Callable[[], None]] | None = None) -> list[str]:
    """Fold every Conv -> BatchNorm pair that sits next to each other in an nn.Sequential; returns the conv names.

    With an `undo` list, a function that restores each folded pair is appended to it (call them in reverse order
    to put the model back, e.g. when an in-place quantization fails after folding)."""
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, CONVS) and isinstance(bn, NORMS) and bn.track_running_stats \
                    and bn.running_mean is not None and conv.out_channels == bn.num_features:
                if undo is not None:
                    bias = None if conv.bias is None else conv.bias.detach().clone()
                    undo.append(functools.partial(_unfold, parent, second, conv, bn, conv.weight.detach().clone(),
                                                  bias))
                fold_conv_bn(conv, bn)
                parent._modules[second] = nn.Identity()
                folded.append(f"{parent_name}.{first}" if parent_name else first)
    return folded
