"""Fuse sibling packed projections into one low-bit matmul: q/k/v, and gate/up, of every decoder block.

Decoding one token calls each block's seven Linears on a single row. At that size a packed INT4/INT8 call costs
more in fixed overhead (Python, dispatch, the kernel's start-up) than in reading its weights, so three q/k/v calls
cost far more than one call over their concatenated rows; the same holds for gate/up. The projections that read
the same input are concatenated along the output dimension into one PackedLinear; each original name then holds a
`FusedSlice` that returns its columns of the shared result, so the model's own forward code runs unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm.arch import ATTN, MLP_IN, arch_of
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm.packing import QuantizedWeight


class SharedProjection:
    """One fused PackedLinear and the result of its last call, held until every slice has taken its part.

    The result is reused only for the very tensor it was computed from, and only until each part has been taken
    once (same object and, outside inference mode, the same version counter: an in-place change of the input
    recomputes it). It keeps that tensor alive, so its identity cannot pass to another tensor meanwhile."""

    def __init__(self, fused: PackedLinear, widths: list[int]):
        self.fused, self.bounds = fused, [sum(widths[:i]) for i in range(len(widths) + 1)]
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._pending: set[int] = set()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        version = -1 if x.is_inference() else x._version   # inference tensors keep no version counter
        if not (self._input is x and self._version == version and index in self._pending):
            self._input, self._version = x, version
            self._output = self.fused(x)
            self._pending = set(range(len(self.bounds) - 1))
        out = self._output[..., self.bounds[index]: self.bounds[index + 1]]
        self._pending.discard(index)
        if not self._pending:                        # every part taken: drop the references
            self._input = self._output = None
        return out


class FusedSlice(nn.Module):
    """Stands where one of the fused projections was: its columns of the shared fused result.

    The first slice of a group owns the fused layer as a submodule (so it appears once in `modules()`, the state
    dict and byte counts); the others reach it through the shared holder only."""

    def __init__(self, shared: SharedProjection, index: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features, self.index = in_features, out_features, index
        if index == 0:
            self.fused = shared.fused
        self._shared = [shared]                      # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared[0].part(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of a fused projection, out={self.out_features}"


def concat_packed(layers: list[PackedLinear]) -> PackedLinear:
    """One PackedLinear whose output rows are the given layers' rows, in order (same bits, group size, input)."""
    first = layers[0]
    for layer in layers[1:]:
        if (layer.in_features, layer.bits, layer.group_size) != (first.in_features, first.bits, first.group_size):
            raise NetshrinkError(f"cannot fuse a {layer.extra_repr()} layer with a {first.extra_repr()} one",
                                 where="fuse_projections", hint="fuse projections quantized with the same settings")
    parts = [layer.quantized_weight() for layer in layers]
    qw = QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                         torch.cat([p.zeros for p in parts]), first.bits, first.group_size)
    biases = [layer.bias for layer in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(layer.out_features)
                          for b, layer in zip(biases, layers)])
    return PackedLinear.from_quantized(qw, bias)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """In every decoder block, fuse packed q/k/v into one PackedLinear and gate/up into another, in place.

    For decoding: the state dict's keys change (save or export before fusing). Groups whose projections are not
    all PackedLinear (a float or SmoothQuant layer, a skipped layer) are left as they are. Returns the number of
    groups fused."""
    arch = arch_of(model)
    fused = 0
    for block in model.get_submodule(arch.layers):
        for group in (ATTN, MLP_IN):
            layers = [block.get_submodule(name) for name in group]
            if not all(isinstance(layer, PackedLinear) for layer in layers):
                continue
            shared = SharedProjection(concat_packed(layers), [layer.out_features for layer in layers])
            for index, (name, layer) in enumerate(zip(group, layers)):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child,
                        FusedSlice(shared, index, layer.in_features, layer.out_features))
            fused += 1
    return fused
