"""What a method sees of one decoder block: the block, its calibration inputs, a runner, and where to record."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from netshrink.llm.arch import LINEARS, SEQUENTIAL
from netshrink.llm.packing import QuantizedWeight
from netshrink.llm.runner import BlockRunner, InputStats

QWEIGHT_ATTR = "_netshrink_qweight"  # the grid a quantizing method left on a Linear, for packing later


@dataclass
class BlockContext:
    """One decoder block being compressed (`where` is its full name, e.g. "model.layers.3")."""

    block: nn.Module
    inputs: torch.Tensor
    runner: BlockRunner
    where: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    # called around each Linear a weight-only method compresses (streaming: load it first, pack it right after)
    on_enter: Callable[[str], None] | None = None
    on_exit: Callable[[str], None] | None = None
    # True when on_exit replaces each Linear by its packed form: a dense copy of the quantized weight would be
    # thrown away at once, so methods may skip making it (an FP32 copy of the largest Linear saved per step)
    packed_on_exit: bool = False

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def set_weight(self, name: str, weight: torch.Tensor | Callable[[], torch.Tensor],
                   qweight: QuantizedWeight | None = None, **fields: Any) -> None:
        """Install a compressed weight in Linear `name` and record what was done.

        `weight` may be a callable (e.g. `qweight.dequantize`): it is only called when the dense weight is needed,
        not when the Linear is packed right after (`packed_on_exit`)."""
        layer = self.linear(name)
        if callable(weight) and not isinstance(weight, torch.Tensor):
            weight = None if self.packed_on_exit and qweight is not None else weight()
        if weight is not None:
            layer.weight.data.copy_(weight.to(layer.weight.dtype))
        setattr(layer, QWEIGHT_ATTR, qweight)
        self.records[f"{self.where}.{name}"] = fields

    def sequential(self, want: set[str], fn: Callable[[str, nn.Linear, InputStats | None], None],
                   true_sequential: bool = True, max_samples: int = 4096) -> None:
        """Compress the Linears group by group; each group's statistics are taken after the previous groups
        were compressed (GPTQ's "true sequential"), or all at once from the float block."""
        groups = SEQUENTIAL if true_sequential else (LINEARS,)
        for group in groups:
            stats = (self.runner.collect(self.block, self.inputs, list(group), want, self.where, max_samples)
                     if want else {})
            for name in group:
                if self.on_enter is not None:
                    self.on_enter(name)
                fn(name, self.linear(name), stats.get(name))
                if self.on_exit is not None:
                    self.on_exit(name)
