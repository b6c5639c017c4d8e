"""Quantized layers that really run integer (or BF16 / FP8-storage) arithmetic, each with a float reference path.

Storage of the integer layers (what save and export read):

- ``weight_int8``: int8, the float weight's shape ([out, in] for Linear, [out, in, kh, kw] for Conv2d); symmetric,
  zero point 0, codes in [-127, 127].
- ``weight_scale``: float32 [out]; the float weight is ``weight_int8 * weight_scale[:, None, ...]``.
- ``bias``: float32 [out] or absent.
- static activations only: ``input_scale`` (float32 scalar) and ``input_zero_point`` (int32 scalar): the input codes
  are ``clamp(round(x / input_scale) + input_zero_point, -128, 127)``.
- ``mode``: ``"dynamic"`` (one symmetric scale per token, chosen at run time) or ``"static"``.

Set ``layer.reference = True`` (or use `reference_mode(model)`) to run the same quantized maths in float
(dequantized weights, fake-quantized inputs, float matmul): the check that the integer kernels are right.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.quant import kernels
from netshrink.quant.primitives import QScheme, compute_qparams, quantize_fp8, quantize_tensor

WEIGHT_SCHEME = QScheme(bits=8, symmetric=True, signed=True, granularity="channel", axis=0)
MODES = ("dynamic", "static")


def _int8_weight(weight: torch.Tensor, per_channel: bool, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and a [out] scale (per output channel, or one scale repeated when per tensor)."""
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise NetshrinkError("weight contains NaN or Inf", where=where, hint="fix or retrain the layer first")
    scheme = WEIGHT_SCHEME if per_channel else QScheme(bits=8)
    q, scale, _, _ = quantize_tensor(w, scheme, where)
    q = q.clamp(-127, 127)                            # symmetric grid: keep -128 unused so the range is balanced
    scale = scale.expand(w.shape[0]).contiguous() if scale.ndim == 0 else scale
    return q, scale.float()


class _Int8Base(nn.Module):
    """Shared storage and helpers of the int8 Linear and Conv2d."""

    def _init_storage(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, per_channel: bool,
                      input_range: tuple[torch.Tensor, torch.Tensor] | None, act_symmetric: bool, where: str) -> None:
        if mode not in MODES:
            raise NetshrinkError(f"unknown activation mode {mode!r}", where=where, hint="choose dynamic or static")
        q, scale = _int8_weight(weight, per_channel, where)
        self.mode = mode
        self.reference = False
        self.act_qmin, self.act_qmax = -128, 127
        self.where = where
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if mode == "static":
            if input_range is None:
                raise NetshrinkError("static quantization needs a calibrated input range", where=where)
            scheme = QScheme(bits=8, symmetric=act_symmetric, signed=True)
            s, z = compute_qparams(input_range[0], input_range[1], scheme)
            self.register_buffer("input_scale", s.float().reshape(()))
            self.register_buffer("input_zero_point", z.to(torch.int32).reshape(()))
        self._prepare()

    def _prepare(self) -> None:
        """Derived, non-saved tensors: the [K, N] weight codes _int_mm wants, and their column sums."""
        q2d = self.weight_int8.reshape(self.weight_int8.shape[0], -1)
        self.register_buffer("q_w_t", kernels.row_major(q2d.t().contiguous()), persistent=False)
        self.register_buffer("w_sum", q2d.sum(1, dtype=torch.int32).float(), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # keep derived tensors in step with loaded codes
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    def set_codes(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                  input_zero_point: int = 0, act_range: tuple[int, int] = (-128, 127)) -> None:
        """Install given integer codes and scales (e.g. learned by QAT, possibly fewer than 8 bits) exactly."""
        self.weight_int8.copy_(weight_codes.to(torch.int8).reshape(self.weight_int8.shape))
        self.weight_scale.copy_(weight_scale.float().reshape(-1).expand_as(self.weight_scale))
        if input_scale is not None and self.mode == "static":
            self.input_scale.copy_(input_scale.float().reshape(()))
            self.input_zero_point.fill_(int(input_zero_point))
            self.act_qmin, self.act_qmax = act_range
        self._prepare()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the integer codes stand for."""
        shape = [-1] + [1] * (self.weight_int8.ndim - 1)
        return self.weight_int8.float() * self.weight_scale.reshape(shape)

    def fake_quantize_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """The float values the input codes stand for (reference path)."""
        if self.mode == "dynamic":
            q, s = kernels.quantize_per_token(x2d)
            return q.float() * s
        q = kernels.quantize_static(x2d, self.input_scale, self.input_zero_point, self.act_qmin, self.act_qmax)
        return (q.float() - self.input_zero_point.float()) * self.input_scale

    def _gemm(self, x2d: torch.Tensor) -> torch.Tensor:
        """[M, K] float rows -> [M, N] float outputs through the int8 kernel (or the float reference)."""
        if self.reference:
            w = self.dequantized_weight().reshape(self.weight_int8.shape[0], -1)
            return F.linear(self.fake_quantize_input(x2d), w, self.bias)
        if self.mode == "dynamic":
            return kernels.linear_dynamic(x2d, self.q_w_t, self.weight_scale, self.bias)
        return kernels.linear_static(x2d, self.q_w_t, self.weight_scale, self.w_sum, self.bias,
                                     self.input_scale, self.input_zero_point, self.act_qmin, self.act_qmax)


class Int8Linear(_Int8Base):
    """nn.Linear with int8 weights (per output channel) and int8 activations, run by int8 x int8 -> int32 GEMMs."""

    def __init__(self, linear: nn.Linear, mode: str = "dynamic", per_channel: bool = True,
                 input_range: tuple[torch.Tensor, torch.Tensor] | None = None, act_symmetric: bool = False,
                 where: str = "linear") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_storage(linear.weight, linear.bias, mode, per_channel, input_range, act_symmetric, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._gemm(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def forward_after_gelu(self, y: torch.Tensor) -> torch.Tensor:
        """self(gelu(y)) for a layer fed by an exact GELU, with the per-token scale from y's row maximum
        (`kernels.quantize_after_gelu`); the reference path and static layers take gelu(y) the ordinary way."""
        if self.reference or self.mode != "dynamic":
            return self(F.gelu(y))
        return kernels.linear_dynamic(y, self.q_w_t, self.weight_scale, self.bias, kernels.quantize_after_gelu)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, int8"


class Int8Conv2d(_Int8Base):
    """nn.Conv2d (groups=1, zero padding) with int8 weights and activations: im2col rows through the int8 GEMM."""

    def __init__(self, conv: nn.Conv2d, mode: str = "dynamic", per_channel: bool = True,
                 input_range: tuple[torch.Tensor, torch.Tensor] | None = None, act_symmetric: bool = False,
                 where: str = "conv") -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NetshrinkError("only groups=1 convolutions with numeric zero padding have an int8 kernel",
                                 where=where)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self._init_storage(conv.weight, conv.bias, mode, per_channel, input_range, act_symmetric, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows, h_out, w_out = kernels.im2col(x.float(), self.kernel_size, self.stride, self.padding, self.dilation)
        return kernels.rows_to_image(self._gemm(rows), n, h_out, w_out).to(x.dtype)

    def extra_repr(self) -> str:
        return f"out={self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, mode={self.mode}, int8"


class CastLayer(nn.Module):
    """Runs a layer in BF16 or FP16: weights stored in that dtype, input cast in, output cast back."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(self.dtype)).to(x.dtype)


class FP8Linear(nn.Module):
    """nn.Linear whose weight is stored in FP8 (e4m3 / e5m2) with a per-output-channel float32 scale.

    This CPU has no FP8 arithmetic, so FP8 is a storage format here: the weight is expanded to `compute_dtype`
    (BF16 by default, fast on AVX-512 BF16) for the matmul.
    """

    def __init__(self, linear: nn.Linear, fmt: str = "e4m3", compute_dtype: torch.dtype = torch.bfloat16,
                 where: str = "linear") -> None:
        super().__init__()
        if not torch.isfinite(linear.weight).all():
            raise NetshrinkError("weight contains NaN or Inf", where=where)
        q, scale = quantize_fp8(linear.weight.detach(), fmt, "channel", 0, where)
        self.fmt, self.compute_dtype = fmt, compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(self.compute_dtype)
        b = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fp8={self.fmt}"


INT8_LAYERS = (Int8Linear, Int8Conv2d)


@contextlib.contextmanager
def reference_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Run every int8 layer of `model` through its float reference path inside the block."""
    layers = [m for m in model.modules() if isinstance(m, INT8_LAYERS)]
    before = [m.reference for m in layers]
    for m in layers:
        m.reference = enabled
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.reference = flag
