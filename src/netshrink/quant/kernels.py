"""Integer execution: int8 x int8 -> int32 GEMMs (torch._int_mm, VNNI on x86) with the float work folded around them.

A linear layer with per-output-channel weight scales s_w and activation codes (q_x, s_x, z_x) computes exactly

    y[m, n] = s_x[m] * s_w[n] * (sum_k q_x[m, k] q_w[n, k]  -  z_x[m] * sum_k q_w[n, k]) + b[n]

The sum over k is done in int32 by `torch._int_mm`; everything else is elementwise, which torch.compile fuses with
the neighbouring layer norm / activation into one pass. Dynamic activations use one symmetric scale per token
(row), chosen at run time; static activations use one calibrated (scale, zero point) per tensor.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
TINY = 1e-12
GELU_MIN = 0.17  # |min_x x * Phi(x)| = 0.16997, reached at x = -0.7518: no GELU output is below -GELU_MIN


def quantize_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes in [-127, 127] with one scale per row: scale = max|row| / 127."""
    x2d = x2d.float()
    amax = x2d.abs().amax(dim=1, keepdim=True).clamp(min=TINY)
    q = torch.round(x2d * (INT8_MAX / amax)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def quantize_after_gelu(y2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of gelu(y), the scale taken from the row maximum of y *before* the GELU.

    GELU increases on [0, inf) and never goes below -GELU_MIN, so max|gelu(y)| <= max(gelu(max y), GELU_MIN), with
    equality whenever gelu(max y) >= GELU_MIN (any row with a clearly positive pre-activation): the same codes as
    `quantize_per_token(gelu(y))` there, never a clipped value anywhere. Compiled, the row maximum needs no erf, so
    the GELU is evaluated once per element instead of twice (once for the maximum, once for the codes).
    """
    y2d = y2d.float()
    amax = gelu_row_bound(y2d.amax(dim=1, keepdim=True))
    q = torch.round(F.gelu(y2d) * (INT8_MAX / amax)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


@torch.library.custom_op("netshrink::gelu_row_bound", mutates_args=())
def gelu_row_bound(row_max: torch.Tensor) -> torch.Tensor:
    """max(gelu(row_max), GELU_MIN): the bound on |gelu| of each row, from the row's pre-GELU maximum.

    An opaque op on purpose: left to inductor, this per-row scalar (an erf) is inlined into the quantize loop and
    re-evaluated for every 16-wide vector of the row, which measured slower than evaluating the GELU twice.
    """
    return F.gelu(row_max.float()).clamp(min=GELU_MIN)


@gelu_row_bound.register_fake
def _(row_max: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(row_max, dtype=torch.float32)


def quantize_static(x2d: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int = -128,
                    qmax: int = 127) -> torch.Tensor:
    """Signed int8 codes with one calibrated scale and zero point: clamp(round(x / s) + z, qmin, qmax).

    A narrower [qmin, qmax] runs lower-bit activations (e.g. 4-bit codes from QAT) through the same int8 kernel.
    """
    return torch.clamp(torch.round(x2d.float() / scale) + zero_point, qmin, qmax).to(torch.int8)


def row_major(m: torch.Tensor) -> torch.Tensor:
    """`m` (2-d) with the standard strides (columns, 1), copied only when it has others.

    torch._int_mm on CPU takes the strides as they are, and a matrix with a dimension of size 1 counts as contiguous
    whatever that dimension's stride (the transpose of a [1, K] or [N, 1] matrix, a one-row view): given such a
    matrix it returns wrong sums. Found by tests/quant/test_kernels_property.py (in_features=1, out_features=1)."""
    if m.stride() == (m.shape[1], 1):
        return m
    return m.clone(memory_format=torch.contiguous_format)


def int8_gemm(q_x: torch.Tensor, q_w_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = int8 [M, K] @ int8 [K, N], exact (both operands in the standard row-major layout)."""
    return torch._int_mm(row_major(q_x), row_major(q_w_t))


def linear_dynamic(x: torch.Tensor, q_w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   quantizer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = quantize_per_token
                   ) -> torch.Tensor:
    """Linear layer with int8 weights and per-token dynamically quantized int8 activations, in integer arithmetic.

    `quantizer=quantize_after_gelu` makes it the layer applied to gelu(x), with x the pre-activation."""
    shape = x.shape
    q_x, s_x = quantizer(x.reshape(-1, shape[-1]))
    acc = int8_gemm(q_x, q_w_t)
    y = acc.float() * (s_x * w_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def linear_static(x: torch.Tensor, q_w_t: torch.Tensor, w_scale: torch.Tensor, w_sum: torch.Tensor,
                  bias: torch.Tensor | None, x_scale: torch.Tensor, x_zero_point: torch.Tensor, qmin: int = -128,
                  qmax: int = 127) -> torch.Tensor:
    """Linear layer with int8 weights and statically calibrated int8 activations (W8A8), in integer arithmetic."""
    shape = x.shape
    q_x = quantize_static(x.reshape(-1, shape[-1]), x_scale, x_zero_point, qmin, qmax)
    acc = int8_gemm(q_x, q_w_t)
    y = (acc.float() - x_zero_point.float() * w_sum) * (x_scale * w_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def im2col(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """Unfold [N, C, H, W] into GEMM rows [N * L, C * kh * kw] (one row per output position) plus (H_out, W_out)."""
    n, _, h, w = x.shape
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    h_out = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return cols.transpose(1, 2).reshape(n * h_out * w_out, -1), h_out, w_out


def rows_to_image(y: torch.Tensor, n: int, h_out: int, w_out: int) -> torch.Tensor:
    """[N * L, C_out] GEMM output back to [N, C_out, H_out, W_out]."""
    return y.reshape(n, h_out * w_out, -1).transpose(1, 2).reshape(n, -1, h_out, w_out)
