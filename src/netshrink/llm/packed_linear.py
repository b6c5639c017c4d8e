"""A Linear that stores group-wise packed INT3/INT4/INT8 weights and multiplies with torch's low-bit CPU kernels.

Decoding one token is memory-bound: reading 4-bit weights instead of 16- or 32-bit ones is the whole win, so the
layer runs torch's `_weight_int4pack_mm_for_cpu` (INT4, and INT3 shifted into the INT4 range) or
`_weight_int8pack_mm` (symmetric per-channel INT8). Those kernels are fast with BF16 activations only (FP32 falls
onto a reference path), so activations are cast to BF16 inside the layer and the result back to the input dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from netshrink.llm.packing import QuantizedWeight, n_groups, pack_codes, to_int4_kernel, to_int8_kernel, unpack_codes


class PackedLinear(nn.Module):
    """y = x W^T + b with W = (code - zero) * scale held packed: buffers qweight, scales, zeros (+ bias)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size or in_features
        groups = n_groups(in_features, self.group_size)
        probe = pack_codes(torch.zeros(1, in_features, dtype=torch.uint8), bits)
        self.register_buffer("qweight", torch.zeros(out_features, probe.shape[1], dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel: tuple | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "PackedLinear":
        """Pack a QuantizedWeight (and an optional float bias) into a new layer."""
        out_f, in_f = qw.shape
        layer = cls(in_f, out_f, qw.bits, qw.group_size, bias=bias is not None)
        layer.qweight.copy_(pack_codes(qw.codes, qw.bits))
        layer.scales.copy_(qw.scales)
        layer.zeros.copy_(qw.zeros)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    def quantized_weight(self, start: int = 0, stop: int | None = None) -> QuantizedWeight:
        """The canonical grid (codes unpacked) of output rows [start, stop) (all by default)."""
        codes = unpack_codes(self.qweight[start:stop], self.bits, self.in_features)
        return QuantizedWeight(codes, self.scales[start:stop], self.zeros[start:stop], self.bits, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the packed codes stand for."""
        return self.quantized_weight().dequantize()

    def _load_from_state_dict(self, *args, **kwargs):  # new codes: rebuild the kernel layout on next use
        self._kernel = None
        return super()._load_from_state_dict(*args, **kwargs)

    def prepare(self) -> str:
        """Build the kernel layout once; returns which path runs ("int4", "int8" or "dequant")."""
        if self._kernel is None:
            qw = self.quantized_weight()
            if self.bits in (3, 4):
                packed, sz, kg = to_int4_kernel(qw)
                self._kernel = ("int4", packed, sz, kg, kg * sz.shape[0])
            elif (int8 := to_int8_kernel(qw)) is not None:
                self._kernel = ("int8", *int8)
            else:
                self._kernel = ("dequant", qw.dequantize(torch.bfloat16))
        return self._kernel[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel
        if kernel is None:
            self.prepare()
            kernel = self._kernel
        # At batch 1 the kernels take a few microseconds, so every extra op here shows: cast only when needed,
        # pad only when the kernel group does not divide in_features, slice only when rows were padded.
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if kernel[0] == "int4":
            _, packed, sz, kg, k_pad = kernel
            if k_pad != self.in_features:
                x2 = nn.functional.pad(x2, (0, k_pad - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, kg, sz)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        elif kernel[0] == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), kernel[1], kernel[2])
        else:
            y = nn.functional.linear(x2, kernel[1])
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
