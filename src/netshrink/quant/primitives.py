"""Affine quantization maths: the one place scale, zero point, rounding, clamping and packing are defined.

Integer formats follow the standard affine definition (Jacob et al. 2018):

    q = clamp(round(x / scale) + zero_point, qmin, qmax)      x_hat = (q - zero_point) * scale

with `round` half-to-even (as torch and ONNX do). Zero is always exactly representable: the range is widened to
contain 0 and the zero point is an integer inside [qmin, qmax].

Scale layout (what `compute_qparams` / `choose_qparams` return, what every other function accepts):

- ``granularity="tensor"``: 0-d tensors.
- ``granularity="channel"``: 1-d tensors of length ``x.shape[axis]`` (one scale per slice along `axis`;
  for a Linear or Conv weight ``axis=0`` is the output channel).
- ``granularity="group"``: `axis` is the dimension cut into consecutive groups of ``group_size``; the scale has
  ``x.shape`` with that dimension replaced by ``x.shape[axis] // group_size``. For a Linear weight
  ``[out, in]`` grouped along the input (``axis=1``) the scale is ``[out, in // group_size]``, the layout GPTQ and
  AWQ use.

Floating formats: FP16 / BF16 are plain casts; FP8 (e4m3, e5m2) uses torch's float8 dtypes with a float32 scale
chosen so the tensor's absolute maximum lands on the format's largest finite value.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from netshrink.errors import NetshrinkError

GRANULARITIES = ("tensor", "channel", "group")
GROUP_FALLBACKS = ("error", "channel")


@dataclass(frozen=True)
class QScheme:
    """How a tensor is mapped to integers: bit width, symmetric or affine, signed or unsigned, and granularity.

    `group_fallback` says what to do when `group_size` does not divide the grouped dimension:
    ``"error"`` raises NetshrinkError, ``"channel"`` uses one group spanning the whole dimension (per channel
    for a 2-d weight) and says so with a warning.
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    group_fallback: str = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise NetshrinkError(f"bit width {self.bits!r} is out of range", where="QScheme.bits",
                                 hint="integer formats take 2 to 8 bits")
        if self.granularity not in GRANULARITIES:
            raise NetshrinkError(f"unknown granularity {self.granularity!r}", where="QScheme.granularity",
                                 hint=f"choose one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise NetshrinkError(f"group granularity needs a positive group_size, got {self.group_size!r}",
                                 where="QScheme.group_size")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise NetshrinkError(f"unknown group_fallback {self.group_fallback!r}", where="QScheme.group_fallback",
                                 hint="choose 'error' or 'channel'")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype integer codes are held in (one code per element, before any packing)."""
        return torch.int8 if self.signed else torch.uint8


def _axis(x: torch.Tensor, axis: int, where: str | None) -> int:
    """Normalise a possibly negative axis, with a clear error when it does not exist."""
    if not -x.ndim <= axis < max(x.ndim, 1):
        raise NetshrinkError(f"axis {axis} does not exist for a tensor of shape {tuple(x.shape)}", where=where)
    return axis % max(x.ndim, 1)


def resolve_scheme(x: torch.Tensor, scheme: QScheme, where: str | None = None) -> QScheme:
    """Check `scheme` fits `x`; when a group size does not divide the dimension, raise or fall back as configured."""
    if scheme.granularity == "tensor":
        return scheme
    if x.ndim == 0:
        raise NetshrinkError(f"{scheme.granularity} granularity needs a tensor with dimensions, got a scalar",
                             where=where)
    axis = _axis(x, scheme.axis, where)
    if scheme.granularity == "group":
        size = x.shape[axis]
        if size % scheme.group_size != 0:
            message = (f"group size {scheme.group_size} does not divide dimension {axis} of size {size} "
                       f"(shape {tuple(x.shape)})")
            if scheme.group_fallback == "error":
                raise NetshrinkError(message, where=where,
                                     hint="pick a group size that divides it, or set group_fallback='channel'")
            warnings.warn(f"{where + ': ' if where else ''}{message}; falling back to per-channel "
                          f"(one group of {size})", stacklevel=3)
            return replace(scheme, axis=axis, group_size=size)
    return replace(scheme, axis=axis)


def _grouped(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """View `x` with the grouped axis split into (groups, group_size)."""
    axis, g = scheme.axis, scheme.group_size
    return x.reshape(*x.shape[:axis], x.shape[axis] // g, g, *x.shape[axis + 1:])


def reduce_min_max(x: torch.Tensor, scheme: QScheme, where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of `x` at the scheme's granularity, in the scale layout described in the module doc."""
    scheme = resolve_scheme(x, scheme, where)
    x = x.detach().float()
    if scheme.granularity == "tensor":
        return x.min(), x.max()
    if scheme.granularity == "channel":
        flat = x.movedim(scheme.axis, 0).reshape(x.shape[scheme.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values
    grouped = _grouped(x, scheme)
    return grouped.amin(dim=scheme.axis + 1), grouped.amax(dim=scheme.axis + 1)


def compute_qparams(x_min: torch.Tensor, x_max: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and integer zero point (int32) that map [x_min, x_max] (widened to hold 0) onto the codes."""
    x_min = torch.as_tensor(x_min, dtype=torch.float32)
    x_max = torch.as_tensor(x_max, dtype=torch.float32)
    if not (torch.isfinite(x_min).all() and torch.isfinite(x_max).all()):
        raise NetshrinkError("range contains NaN or Inf; cannot choose a scale", where="compute_qparams")
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        half = (1 << (scheme.bits - 1)) - 1          # 127 for 8 bits: the grid is symmetric around zero
        scale = torch.maximum(-x_min, x_max) / half
        zero_point = torch.full_like(scale, 0 if scheme.signed else 1 << (scheme.bits - 1), dtype=torch.int32)
    else:
        scale = (x_max - x_min) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = (qmin - torch.round(x_min / safe)).clamp(qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero_point


def choose_qparams(x: torch.Tensor, scheme: QScheme, where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from the min/max of `x` itself (the min-max observer applied to one tensor)."""
    if not torch.isfinite(x).all():
        raise NetshrinkError("tensor contains NaN or Inf", where=where)
    x_min, x_max = reduce_min_max(x, scheme, where)
    return compute_qparams(x_min, x_max, scheme)


def broadcast_param(p: torch.Tensor, x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Reshape a scale or zero point from the scale layout so it broadcasts against `x` elementwise."""
    p = torch.as_tensor(p)
    if scheme.granularity == "tensor" or p.ndim == 0:
        return p
    axis = scheme.axis % x.ndim
    if scheme.granularity == "channel":
        shape = [1] * x.ndim
        shape[axis] = -1
        return p.reshape(shape)
    groups = x.shape[axis] // p.shape[axis] if p.shape[axis] else 1
    return p.repeat_interleave(groups, dim=axis)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Integer codes of `x`: clamp(round(x / scale) + zero_point, qmin, qmax), held in int8 or uint8."""
    s = broadcast_param(scale, x, scheme).float()
    z = broadcast_param(zero_point, x, scheme).float()
    q = torch.clamp(torch.round(x.float() / s) + z, scheme.qmin, scheme.qmax)
    return q.to(scheme.storage_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Float32 values (q - zero_point) * scale."""
    s = broadcast_param(scale, q, scheme).float()
    z = broadcast_param(zero_point, q, scheme).float()
    return (q.float() - z) * s


def fake_quantize(x: torch.Tensor, scheme: QScheme, scale: torch.Tensor | None = None,
                  zero_point: torch.Tensor | None = None, where: str | None = None) -> torch.Tensor:
    """Quantize then dequantize (float reference of what the integer path computes), in the dtype of `x`.

    Without `scale` / `zero_point` they are chosen from the min/max of `x` at the scheme's granularity.
    """
    scheme = resolve_scheme(x, scheme, where)
    if scale is None or zero_point is None:
        scale, zero_point = choose_qparams(x, scheme, where)
    return dequantize(quantize(x, scale, zero_point, scheme), scale, zero_point, scheme).to(x.dtype)


def quantize_tensor(x: torch.Tensor, scheme: QScheme, where: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QScheme]:
    """Codes, scale, zero point and the resolved scheme for `x` with min-max ranges (the common one-call case)."""
    scheme = resolve_scheme(x, scheme, where)
    scale, zero_point = choose_qparams(x, scheme, where)
    return quantize(x, scale, zero_point, scheme), scale, zero_point, scheme


# --- INT4 packing -------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two to a byte along the last dimension: element 2i in the low nibble, 2i+1 in the high.

    Accepts signed codes in [-8, 7] (two's complement nibbles) or unsigned codes in [0, 15].
    """
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise NetshrinkError(f"pack_int4 takes integer codes, got {q.dtype}", where="pack_int4")
    if q.ndim == 0 or q.shape[-1] % 2:
        raise NetshrinkError(f"last dimension must be even to pack two codes a byte, shape {tuple(q.shape)}",
                             where="pack_int4")
    if q.dtype == torch.uint8:      # unsigned codes (what the LLM grids hold): no widened copies of a large weight
        if q.numel() and q.max() > 15:
            raise NetshrinkError("values outside the 4-bit range [-8, 15]", where="pack_int4")
        nibbles = q
    else:
        wide = q.to(torch.int16)
        if wide.numel() and (wide.min() < -8 or wide.max() > 15):
            raise NetshrinkError("values outside the 4-bit range [-8, 15]", where="pack_int4")
        nibbles = (wide & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes in [-8, 7] when `signed`, uint8 codes in [0, 15] otherwise."""
    if packed.dtype != torch.uint8:
        raise NetshrinkError(f"unpack_int4 takes uint8 bytes, got {packed.dtype}", where="unpack_int4")
    low = packed & 0xF
    high = packed >> 4
    q = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return (q.to(torch.int8) ^ 8) - 8          # sign-extend a two's complement nibble
    return q


# --- floating formats ---------------------------------------------------------------------------------------------

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def cast(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round `x` to FP16, BF16 or FP32 (round to nearest even, as torch's casts do)."""
    if fmt not in FLOAT_DTYPES:
        raise NetshrinkError(f"unknown float format {fmt!r}", where="cast", hint="choose fp16, bf16 or fp32")
    if fmt == "fp16" and torch.isfinite(x).all() and x.abs().max() > torch.finfo(torch.float16).max:
        raise NetshrinkError("values exceed the FP16 range (65504) and would become Inf", where="cast",
                             hint="use bf16, which has the FP32 exponent range")
    return x.to(FLOAT_DTYPES[fmt])


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Cast to IEEE half precision (refusing values that would overflow to Inf)."""
    return cast(x, "fp16")


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Cast to bfloat16 (8 exponent bits like FP32, 7 mantissa bits)."""
    return cast(x, "bf16")


def _fp8_dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise NetshrinkError(f"unknown FP8 format {fmt!r}", where="fp8", hint="choose e4m3 or e5m2")
    return FP8_DTYPES[fmt]


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", axis: int = 0,
                 where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and a float32 scale (per tensor or per channel) such that x ~= fp8.float() * scale."""
    dtype = _fp8_dtype(fmt)
    if granularity not in ("tensor", "channel"):
        raise NetshrinkError(f"FP8 supports tensor or channel granularity, got {granularity!r}", where=where)
    if not torch.isfinite(x).all():
        raise NetshrinkError("tensor contains NaN or Inf", where=where)
    xf = x.detach().float()
    if granularity == "tensor":
        amax = xf.abs().max()
        shaped = amax
    else:
        axis = _axis(xf, axis, where)
        amax = xf.abs().movedim(axis, 0).reshape(xf.shape[axis], -1).amax(dim=1)
        shape = [1] * xf.ndim
        shape[axis] = -1
        shaped = amax.reshape(shape)
    fmax = torch.finfo(dtype).max
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    shaped_scale = scale if granularity == "tensor" else scale.reshape(shaped.shape)
    q = (xf / shaped_scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Float32 values of FP8 `q` times its scale (per tensor, or per channel along `axis`)."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.ndim == 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        s = s.reshape(shape)
    return q.float() * s


def fake_quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", axis: int = 0) -> torch.Tensor:
    """Round-trip `x` through scaled FP8 (float reference for FP8 storage), in the dtype of `x`."""
    q, scale = quantize_fp8(x, fmt, granularity, axis)
    return dequantize_fp8(q, scale, axis).to(x.dtype)

