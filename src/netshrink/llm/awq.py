"""AWQ (Lin et al. 2023): protect the weights that multiply large activations by scaling them up before rounding.

For Linears sharing an input X, W x = (W diag(s)) (diag(s)^-1 x): the per-input-channel scale s = mean|X|^a
(optionally / mean|W_norm|^(1-a), "duo scaling") is searched over a grid of a in [0, 1) to minimise the output
error of the quantized Linears, ||Q(W s)(X/s) - W X||^2, then folded into the operation that produces X (an RMSNorm
weight, or the rows of the Linear before). A second search shrinks each group's weight range (clipping), again
minimising the output error on calibration tokens. Finally the weights are rounded to the nearest grid point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from netshrink.llm.arch import LINEARS, SCALE_PAIRS
from netshrink.llm.checks import check, check_grid, is_int, is_real
from netshrink.llm.context import BlockContext
from netshrink.llm.grid import group_bounds, quantize_weight


@dataclass
class AWQ:
    """AWQ settings (group_size None = per output channel)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    max_shrink: float = 0.5
    n_tokens: int = 4096  # calibration rows kept per Linear for the searches
    clip_tokens: int = 512

    method = "awq"

    def __post_init__(self) -> None:
        check_grid(self)
        check(self, "n_grid", is_int(self.n_grid) and self.n_grid > 0, "a positive integer")
        check(self, "max_shrink", is_real(self.max_shrink) and 0 <= self.max_shrink < 1, "in [0, 1)")
        check(self, "n_tokens", is_int(self.n_tokens) and self.n_tokens > 0, "a positive integer")
        check(self, "clip_tokens", is_int(self.clip_tokens) and self.clip_tokens > 0, "a positive integer")


def fake_quant(W: torch.Tensor, config: AWQ) -> torch.Tensor:
    return quantize_weight(W, config.bits, config.group_size, config.symmetric).dequantize()


def weight_importance(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its group's max (AutoAWQ's w_max), per input channel."""
    W = W.abs()
    out = torch.empty_like(W)
    for a, b in group_bounds(W.shape[1], group_size):
        out[:, a:b] = W[:, a:b] / W[:, a:b].amax(dim=1, keepdim=True).clamp(min=1e-8)
    return out.mean(0)


@torch.no_grad()
def search_scale(X: torch.Tensor, weights: list[torch.Tensor], config: AWQ) -> tuple[torch.Tensor, dict]:
    """Per-input-channel scale minimising the summed output error of the quantized `weights` on inputs X [n, in]."""
    x_mean = X.abs().mean(0)
    w_mean = weight_importance(torch.cat(weights), config.group_size)
    refs = [X @ W.t() for W in weights]
    best, best_err, best_ratio = torch.ones_like(x_mean), float("inf"), 0.0
    base_err = None
    for step in range(config.n_grid):
        ratio = step / config.n_grid
        if config.duo_scaling:
            s = (x_mean.pow(ratio) / w_mean.pow(1 - ratio).clamp(min=1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(((X / s) @ fake_quant(W * s, config).t() - r).pow(2).mean()) for W, r in zip(weights, refs))
        if step == 0:
            base_err = err
        if err < best_err:
            best, best_err, best_ratio = s, err, ratio
    return best, {"ratio": best_ratio, "error": best_err, "error_unscaled": base_err}


@torch.no_grad()
def search_clip(X: torch.Tensor, W: torch.Tensor, config: AWQ) -> torch.Tensor:
    """Per (row, group) max |w| minimising the group's output error after clamping and rounding (llm-awq auto_clip)."""
    X = X[: config.clip_tokens]
    bounds = group_bounds(W.shape[1], config.group_size)
    best_max = torch.empty(W.shape[0], len(bounds))
    for j, (a, b) in enumerate(bounds):
        w, x = W[:, a:b], X[:, a:b]
        ref = x @ w.t()
        org_max = w.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((W.shape[0],), float("inf"))
        best = org_max.squeeze(1).clone()
        for i_s in range(int(config.max_shrink * config.n_grid)):
            m = org_max * (1 - i_s / config.n_grid)
            wq = quantize_weight(torch.clamp(w, -m, m), config.bits, None, config.symmetric).dequantize()
            err = (x @ wq.t() - ref).pow(2).mean(0)
            better = err < best_err
            best_err[better] = err[better]
            best[better] = m.squeeze(1)[better]
        best_max[:, j] = best
    return best_max


def clamp_groups(W: torch.Tensor, max_val: torch.Tensor, group_size: int | None) -> torch.Tensor:
    W = W.clone()
    for j, (a, b) in enumerate(group_bounds(W.shape[1], group_size)):
        m = max_val[:, j: j + 1]
        W[:, a:b] = torch.clamp(W[:, a:b], -m, m)
    return W


def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's output channels / s, the Linears' input columns * s: the float function is unchanged."""
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s.reshape(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm / LayerNorm weight
        prev.weight.data.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    for layer in linears:
        layer.weight.data.mul_(s.reshape(1, -1).to(layer.weight.dtype))


def compress_block(ctx: BlockContext, config: AWQ) -> None:
    """Search and fold AWQ scales for each (producer, Linears) pair, search clipping, then round."""
    stats = ctx.runner.collect(ctx.block, ctx.inputs, list(LINEARS), {"samples"}, ctx.where, config.n_tokens)
    X = {n: s.samples() for n, s in stats.items()}
    info = {}
    for prev_name, names in SCALE_PAIRS:
        prev = ctx.block.get_submodule(prev_name)
        layers = [ctx.linear(n) for n in names]
        if isinstance(prev, nn.Linear) and prev.out_features != layers[0].in_features:
            continue  # grouped-query attention: v_proj rows do not map one-to-one onto o_proj columns
        s, found = search_scale(X[names[0]], [layer.weight.detach().float() for layer in layers], config)
        fold_scale(prev, layers, s)
        for n in names:
            X[n] = X[n] / s
            info[n] = found
    for name in LINEARS:
        layer = ctx.linear(name)
        W = layer.weight.detach().float()
        if config.clip and name not in ("self_attn.q_proj", "self_attn.k_proj"):
            W = clamp_groups(W, search_clip(X[name], W, config), config.group_size)
        qw = quantize_weight(W, config.bits, config.group_size, config.symmetric)
        ctx.set_weight(name, qw.dequantize(), qw, method="awq", bits=config.bits,
                       granularity="group" if config.group_size else "channel", group_size=config.group_size,
                       symmetric=config.symmetric, scale_ratio=info.get(name, {}).get("ratio"))
