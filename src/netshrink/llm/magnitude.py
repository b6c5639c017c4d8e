"""Magnitude pruning of LLM Linears: drop the smallest |W| in each layer (or n of every m). The baseline to beat."""
from __future__ import annotations

from dataclasses import dataclass

from netshrink.llm.checks import check_sparsity
from netshrink.llm.context import BlockContext
from netshrink.llm.sparsegpt import parse_pattern
from netshrink.llm.wanda import prune_mask


@dataclass
class Magnitude:
    """Layer-wise magnitude pruning: unstructured `sparsity` over each whole layer, or an N:M `pattern`."""

    sparsity: float = 0.5
    pattern: str | None = None

    method = "magnitude"

    def __post_init__(self) -> None:
        parse_pattern(self.pattern, where="Magnitude.pattern")
        if self.pattern is None:
            check_sparsity(self)


def compress_block(ctx: BlockContext, config: Magnitude) -> None:
    """Prune every Linear of the block by weight magnitude alone."""
    def one(name, layer, _stats):
        keep = prune_mask(layer.weight.detach().abs(), config.sparsity, config.pattern, per_row=False,
                          where=f"{ctx.where}.{name}")
        ctx.set_weight(name, layer.weight.detach() * keep, None, method="magnitude",
                       sparsity=float(1 - keep.float().mean()), pattern=config.pattern or "unstructured")
    ctx.sequential(set(), one)
