"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, comparing weights within each output row; no update.

The score of a weight is its magnitude times the L2 norm of the input feature it multiplies over the calibration
tokens; each output row keeps its highest-scoring weights (unstructured), or the top (m - n) of every m (N:M).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from netshrink.llm.checks import check_sparsity
from netshrink.llm.context import BlockContext
from netshrink.llm.sparsegpt import check_nm_fits, parse_pattern


@dataclass
class Wanda:
    """Wanda settings: per-row unstructured `sparsity`, or an N:M `pattern` ("2:4" prunes 2 of every 4)."""

    sparsity: float = 0.5
    pattern: str | None = None
    true_sequential: bool = True

    method = "wanda"

    def __post_init__(self) -> None:
        parse_pattern(self.pattern, where="Wanda.pattern")
        if self.pattern is None:
            check_sparsity(self)


def prune_mask(score: torch.Tensor, sparsity: float, pattern: str | None, per_row: bool = True,
               where: str = "N:M pattern") -> torch.Tensor:
    """Keep-mask removing the lowest scores: per row (or over the whole layer) or n of every m along a row
    (`where`, the layer's name, is what an error names)."""
    out_f, in_f = score.shape
    n, m = parse_pattern(pattern)
    if n:
        check_nm_fits(in_f, pattern, where)
        groups = score.reshape(out_f, in_f // m, m)
        drop = torch.topk(groups, n, dim=-1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return mask.reshape(out_f, in_f)
    mask = torch.ones_like(score, dtype=torch.bool)
    if per_row:
        k = int(in_f * sparsity)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    else:
        k = int(score.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
    return mask


def wanda_scores(W: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 from the summed squares of each input feature."""
    return W.detach().float().abs() * torch.sqrt(sq_norm.float()).reshape(1, -1)


def compress_block(ctx: BlockContext, config: Wanda) -> None:
    """Wanda every Linear of the block, input norms from the calibration activations."""
    def one(name, layer, stats):
        keep = prune_mask(wanda_scores(layer.weight, stats.sq_norm), config.sparsity, config.pattern,
                          where=f"{ctx.where}.{name}")
        ctx.set_weight(name, layer.weight.detach() * keep, None, method="wanda",
                       sparsity=float(1 - keep.float().mean()), pattern=config.pattern or "unstructured")
    ctx.sequential({"sq_norm"}, one, config.true_sequential)
