"""Property tests of the integer kernels: Int8Linear and Int8Conv2d over random shapes, value scales, activation modes
(dynamic per token, static symmetric / asymmetric), weight granularities and biases, against float64 references.

Two checks per example:
- the integer kernel computes exactly the maths its codes stand for: a float64 matmul of the decoded input codes
  and weight codes, to float32 rounding of the result;
- the output is within the scheme's analytic error of the unquantized float64 layer. With input error
  |dx| <= s_x / 2 and weight error |dw| <= s_w / 2 per element (round to nearest; a static range holds the inputs),
  x.w - x^.w^ = x.dw + dx.w - dx.dw, so |dy| <= sum|x| s_w / 2 + s_x / 2 sum|w| + K s_x s_w / 4 for K products
  (the bound test_api uses on fixed seeds).

The explicit examples with one input feature or one output channel once gave wrong sums: torch._int_mm on CPU misread
a [K, N] weight matrix with a size-1 dimension and a non-standard stride (see `kernels.row_major`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from netshrink.quant import kernels
from netshrink.quant.modules import Int8Conv2d, Int8Linear

EXAMPLES = settings(max_examples=50, deadline=None)
MODES = st.sampled_from([("dynamic", True), ("static", True), ("static", False)])   # (mode, act_symmetric)


def _data(seed: int, shape: tuple[int, ...], scale: float, outliers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if outliers:                                   # a few large values: what per-token scales are for
        mask = torch.rand(shape, generator=g) < 0.05
        x = torch.where(mask, x * 30, x)
    return x


def _fill(layer: nn.Module, seed: int, w_scale: float, skewed_bias: bool) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * w_scale)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * (10.0 if skewed_bias else 0.1))


def _input_codes(q: Int8Linear | Int8Conv2d, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 input values the kernel's codes stand for, and s_x per row ([M, 1]) for the bound."""
    if q.mode == "dynamic":
        codes, s_x = kernels.quantize_per_token(rows)
        return codes.double() * s_x.double(), s_x.double()
    codes = kernels.quantize_static(rows, q.input_scale, q.input_zero_point).double()
    s_x = q.input_scale.double()
    return (codes - float(q.input_zero_point)) * s_x, s_x.expand(rows.shape[0], 1)


def _check(y: torch.Tensor, rows: torch.Tensor, q: Int8Linear | Int8Conv2d, w: torch.Tensor,
           b: torch.Tensor | None) -> None:
    """y [M, N] from the kernel against the decoded-codes product and against the unquantized rows @ w.T + b."""
    k = rows.shape[1]
    w = w.reshape(w.shape[0], -1).double()
    w_hat = q.weight_int8.reshape(w.shape[0], -1).double() * q.weight_scale.double()[:, None]
    s_w = q.weight_scale.double()[None, :]
    x_hat, s_x = _input_codes(q, rows)
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
    y = y.double()

    exact = x_hat @ w_hat.t() + bias
    magnitude = x_hat.abs() @ w_hat.abs().t() + bias.abs()
    assert torch.all((y - exact).abs() <= 1e-5 * magnitude + 1e-30), (y - exact).abs().max()

    x = rows.double()
    assert torch.all((x - x_hat).abs() <= s_x / 2 * (1 + 1e-5)), "an input is outside the half-step of its code"
    assert torch.all((w - w_hat).abs() <= s_w.t() / 2 * (1 + 1e-5)), "a weight is outside the half-step of its code"
    bound = (x.abs().sum(1, keepdim=True) * s_w / 2 + s_x / 2 * w.abs().sum(1)[None, :] + k * s_x * s_w / 4)
    float_error = 1e-5 * (x.abs() @ w.abs().t() + bias.abs())
    error = (y - (x @ w.t() + bias)).abs()
    assert torch.all(error <= bound * (1 + 1e-5) + float_error), (error - bound).max()


@EXAMPLES
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 24), in_features=st.integers(1, 96),
       out_features=st.integers(1, 40), x_scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0, 1e3]),
       w_scale=st.sampled_from([1e-3, 0.05, 1.0, 20.0]), mode=MODES, per_channel=st.booleans(),
       bias=st.booleans(), skewed=st.booleans(), outliers=st.booleans())
@example(seed=0, rows=1, in_features=1, out_features=2, x_scale=1.0, w_scale=1.0, mode=("dynamic", True),
         per_channel=True, bias=False, skewed=False, outliers=False)                 # K = 1
@example(seed=1, rows=3, in_features=9, out_features=1, x_scale=1.0, w_scale=1.0, mode=("static", False),
         per_channel=False, bias=True, skewed=True, outliers=False)                  # N = 1
def test_int8_linear_is_exact_on_its_codes_and_within_the_scheme_error(seed, rows, in_features, out_features,
                                                                      x_scale, w_scale, mode, per_channel, bias,
                                                                      skewed, outliers):
    lin = nn.Linear(in_features, out_features, bias=bias)
    _fill(lin, seed, w_scale, skewed)
    x = _data(seed, (rows, in_features), x_scale, outliers)
    if skewed:
        x = x.abs() + 0.1 * x_scale                # after a ReLU-like layer: asymmetric codes use the zero point
    mode, symmetric = mode
    q = Int8Linear(lin, mode=mode, per_channel=per_channel, act_symmetric=symmetric, where="fc",
                   input_range=(x.min(), x.max()) if mode == "static" else None)
    y = q(x)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    _check(y, x, q, lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
    # leading dimensions are only a reshape around the same GEMM
    assert torch.equal(q(x.reshape(1, rows, in_features)).reshape(rows, out_features), y)


@st.composite
def conv_shapes(draw) -> dict:
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 10))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 10))
    return dict(n=draw(st.integers(1, 3)), c_in=draw(st.integers(1, 5)), c_out=draw(st.integers(1, 8)), h=h, w=w,
                kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation)


@EXAMPLES
@given(seed=st.integers(0, 2**31 - 1), shape=conv_shapes(), x_scale=st.sampled_from([1e-2, 1.0, 50.0]),
       w_scale=st.sampled_from([1e-3, 0.2, 5.0]), mode=MODES, per_channel=st.booleans(), bias=st.booleans(),
       skewed=st.booleans(), outliers=st.booleans())
@example(seed=2, shape=dict(n=1, c_in=1, c_out=3, h=4, w=4, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                           dilation=(1, 1)), x_scale=1.0, w_scale=0.2, mode=("dynamic", True), per_channel=True,
         bias=True, skewed=False, outliers=False)                                   # K = 1
@example(seed=3, shape=dict(n=2, c_in=2, c_out=1, h=5, w=5, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                           dilation=(1, 1)), x_scale=1.0, w_scale=0.2, mode=("static", True), per_channel=False,
         bias=False, skewed=False, outliers=True)                                   # N = 1
def test_int8_conv2d_is_exact_on_its_codes_and_within_the_scheme_error(seed, shape, x_scale, w_scale, mode,
                                                                      per_channel, bias, skewed, outliers):
    conv = nn.Conv2d(shape["c_in"], shape["c_out"], shape["kernel"], stride=shape["stride"], padding=shape["padding"],
                     dilation=shape["dilation"], bias=bias)
    _fill(conv, seed, w_scale, skewed)
    x = _data(seed, (shape["n"], shape["c_in"], shape["h"], shape["w"]), x_scale, outliers)
    if skewed:
        x = x.abs() + 0.1 * x_scale
    mode, symmetric = mode
    q = Int8Conv2d(conv, mode=mode, per_channel=per_channel, act_symmetric=symmetric, where="conv",
                   input_range=(x.min(), x.max()) if mode == "static" else None)
    y = q(x)
    reference = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                         conv.stride, conv.padding, conv.dilation)
    assert y.shape == reference.shape and y.dtype == torch.float32
    # the same check as the Linear on the GEMM rows: one row per output position (the zero padding is exact)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    y_rows = y.reshape(shape["n"], shape["c_out"], -1).transpose(1, 2).reshape(-1, shape["c_out"])
    ref_rows = reference.reshape(shape["n"], shape["c_out"], -1).transpose(1, 2).reshape(-1, shape["c_out"])
    w = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()
    assert torch.allclose(rows.double() @ w.reshape(w.shape[0], -1).double().t()
                          + (0 if b is None else b.double()), ref_rows, rtol=1e-9, atol=1e-9)   # rows are the conv
    _check(y_rows, rows, q, w, b)
