"""Packing round trips and the low-bit kernels against the dequantized weights."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from netshrink.errors import NetshrinkError
from netshrink.llm.grid import quantize_weight
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm.packing import QuantizedWeight, pack_codes, unpack_codes


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([3, 4, 8]), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 10**6))
def test_pack_round_trip(bits, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[1] == {8: cols, 4: (cols + 1) // 2, 3: 3 * ((cols + 7) // 8)}[bits]
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_int3_bit_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack_codes(codes, 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


def test_code_out_of_range_refused():
    with pytest.raises(NetshrinkError):
        pack_codes(torch.tensor([[16]], dtype=torch.uint8), 4)


def test_dequantize_matches_float64_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 80, dtype=torch.float64)
    qw = quantize_weight(w, 4, 32, symmetric=False)  # groups of 32, 32, 16
    assert qw.scales.shape == (8, 3)
    for j, (a, b) in enumerate([(0, 32), (32, 64), (64, 80)]):
        g = w[:, a:b]
        lo, hi = g.min(1).values.clamp(max=0), g.max(1).values.clamp(min=0)
        s = (hi - lo) / 15
        z = torch.round(-lo / s).clamp(0, 15)
        q = torch.clamp(torch.round(g / s[:, None]) + z[:, None], 0, 15)
        ref = (q - z[:, None]) * s[:, None]
        torch.testing.assert_close(qw.dequantize(torch.float64)[:, a:b], ref, atol=1e-6, rtol=1e-5)
    assert (qw.dequantize(torch.float64) - w).abs().max() <= qw.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("bits,group,shape,sym", [
    (4, 128, (192, 576), False), (4, 32, (64, 96), False), (4, None, (100, 576), False), (4, 64, (40, 200), True),
    (3, 64, (48, 128), False), (3, None, (32, 72), False), (8, None, (64, 96), True), (8, 32, (64, 96), False)])
def test_packed_linear_matches_dequantized(bits, group, shape, sym):
    torch.manual_seed(0)
    out_f, in_f = shape
    qw = quantize_weight(torch.randn(out_f, in_f), bits, group, sym)
    bias = torch.randn(out_f)
    layer = PackedLinear.from_quantized(qw, bias)
    expected_path = "int4" if bits in (3, 4) else ("int8" if sym and group is None else "dequant")
    assert layer.prepare() == expected_path
    x = torch.randn(2, 3, in_f)
    y = layer(x)
    ref = (x.double().bfloat16().double() @ qw.dequantize(torch.float64).t()) + bias.double()
    assert y.shape == (2, 3, out_f) and y.dtype == torch.float32
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-2, err  # BF16 activations / scales
    assert torch.equal(layer.quantized_weight().codes, qw.codes)


def test_state_dict_round_trip_rebuilds_kernel():
    torch.manual_seed(0)
    a = PackedLinear.from_quantized(quantize_weight(torch.randn(32, 64), 4, 32, False))
    b = PackedLinear.from_quantized(quantize_weight(torch.randn(32, 64), 4, 32, False))
    x = torch.randn(1, 64)
    b(x)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))
    assert set(a.state_dict()) == {"qweight", "scales", "zeros"}
    assert a.qweight.dtype == torch.uint8 and a.qweight.shape == (32, 32)


@pytest.mark.parametrize("group,in_f,kernel,k_pad", [
    (128, 576, 64, 576), (None, 576, 64, 576), (128, 1536, 128, 1536), (None, 1536, 256, 1536), (None, 72, 32, 96),
    (256, 640, 128, 640), (64, 200, 32, 224)])
def test_kernel_group_avoids_padding(group, in_f, kernel, k_pad):
    """SmolLM2's 576 columns in groups of 128 run as kernel groups of 64: no padded columns, no per-call x padding."""
    from netshrink.llm.packing import kernel_group

    assert kernel_group(group or in_f, in_f) == kernel
    torch.manual_seed(0)
    layer = PackedLinear.from_quantized(quantize_weight(torch.randn(16, in_f), 4, group, False))
    layer.prepare()
    assert layer._kernel[3] == kernel and layer._kernel[4] == k_pad
    x = torch.randn(1, in_f)
    ref = x.bfloat16().double() @ layer.dequantized_weight().double().t()
    assert float((layer(x).double() - ref).abs().max() / ref.abs().max()) < 1e-2


def test_kernel_group_refuses_odd_groups():
    from netshrink.llm.packing import kernel_group

    with pytest.raises(NetshrinkError, match="no int4 kernel layout"):
        kernel_group(48, 576)


def test_chunked_dequantize_equals_the_one_pass_formula():
    torch.manual_seed(0)
    from netshrink.llm.grid import quantize_weight

    w = torch.randn(37, 96)
    qw = quantize_weight(w, 4, 32, False)
    whole = (qw.codes.float() - qw.expand(qw.zeros.float())) * qw.expand(qw.scales.float())
    for rows in (1, 5, 1024):
        assert torch.equal(qw.dequantize(rows_per_chunk=rows), whole)
    assert qw.dequantize(torch.bfloat16, rows_per_chunk=4).dtype == torch.bfloat16
