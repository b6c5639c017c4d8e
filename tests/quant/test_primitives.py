"""Property tests for the affine quantization maths: round trips, exact grids, packing, float formats, bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.errors import NetshrinkError
from netshrink.quant.primitives import (
    QScheme, broadcast_param, cast, choose_qparams, compute_qparams, dequantize, dequantize_fp8, fake_quantize,
    pack_int4, quantize, quantize_fp8, quantize_tensor, reduce_min_max, resolve_scheme, unpack_int4,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def schemes(draw, ndim: int = 3):
    """Every integer scheme: 2..8 bits, symmetric or not, signed or not, tensor/channel/group on any axis."""
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    axis = draw(st.integers(-ndim, ndim - 1))
    group = draw(st.sampled_from([1, 2, 3, 4])) if granularity == "group" else None
    return QScheme(bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()), signed=draw(st.booleans()),
                   granularity=granularity, axis=axis, group_size=group)


@st.composite
def tensors_and_schemes(draw):
    scheme = draw(schemes())
    shape = [draw(st.integers(1, 4)) for _ in range(3)]
    if scheme.granularity == "group":
        shape[scheme.axis % 3] = scheme.group_size * draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    offset = draw(st.sampled_from([0.0, 0.5, -3.0]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + offset) * spread
    return x, scheme


@SETTINGS
@given(tensors_and_schemes())
def test_round_trip_within_half_a_step(case):
    x, scheme = case
    q, scale, zp, scheme = quantize_tensor(x, scheme)
    assert q.dtype == (torch.int8 if scheme.signed else torch.uint8)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    err = (dequantize(q, scale, zp, scheme) - x).abs()
    step = broadcast_param(scale, x, scheme).expand_as(x)
    assert torch.all(err <= 0.5 * step * (1 + 1e-5) + 1e-7 * x.abs().max()), float((err / step).max())


@SETTINGS
@given(schemes(), st.integers(0, 2**31 - 1))
def test_representable_values_round_trip_exactly(scheme, seed):
    shape = [2, 4, 6] if scheme.granularity != "group" else [12, 12, 12]
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(shape, generator=g) * 3
    scheme = resolve_scheme(probe, scheme)
    scale, zp = choose_qparams(probe, scheme)
    q = torch.randint(scheme.qmin, scheme.qmax + 1, shape, generator=g).to(scheme.storage_dtype)
    x = dequantize(q, scale, zp, scheme)
    assert torch.equal(quantize(x, scale, zp, scheme), q)
    assert torch.equal(dequantize(quantize(x, scale, zp, scheme), scale, zp, scheme), x)


@SETTINGS
@given(tensors_and_schemes())
def test_zero_is_exactly_representable(case):
    x, scheme = case
    x = x.clone()
    x.view(-1)[0] = 0.0
    assert fake_quantize(x, scheme).view(-1)[0].item() == 0.0


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 8), st.booleans(), st.integers(0, 2**31 - 1))
def test_pack_unpack_int4_exact(rows, half_cols, signed, seed):
    g = torch.Generator().manual_seed(seed)
    low, high = (-8, 8) if signed else (0, 16)
    q = torch.randint(low, high, (rows, 2 * half_cols), generator=g).to(torch.int8 if signed else torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(unpack_int4(packed, signed=signed), q)


def test_pack_int4_nibble_order():
    assert pack_int4(torch.tensor([1, 2], dtype=torch.int8)).item() == 0x21
    assert pack_int4(torch.tensor([-1, 0], dtype=torch.int8)).item() == 0x0F
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)             # the uint8 fast path = the widened one
    assert torch.equal(pack_int4(codes), pack_int4(codes.to(torch.int16)))
    with pytest.raises(NetshrinkError, match="4-bit range"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))


def test_hand_computed_qparams():
    # asymmetric uint8 over [-1, 3]: scale 4/255, zero point round(255/4) = 64
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), QScheme(bits=8, symmetric=False, signed=False))
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 64
    # symmetric int8 over [-2, 1]: scale 2/127, zero point 0
    scale, zp = compute_qparams(torch.tensor(-2.0), torch.tensor(1.0), QScheme(bits=8))
    assert scale.item() == pytest.approx(2 / 127) and zp.item() == 0
    # range [1, 5] is widened to contain 0: int4 asymmetric signed -> scale 5/15, zp -8
    scale, zp = compute_qparams(torch.tensor(1.0), torch.tensor(5.0), QScheme(bits=4, symmetric=False))
    assert scale.item() == pytest.approx(1 / 3) and zp.item() == -8
    # half-to-even rounding of codes: 2.5 steps -> 2, 3.5 steps -> 4
    s = QScheme(bits=8)
    q = quantize(torch.tensor([2.5, 3.5, 1000.0, -1000.0]), torch.tensor(1.0), torch.tensor(0), s)
    assert q.tolist() == [2, 4, 127, -128]


def test_granularity_layouts_match_float64_reference():
    w = torch.randn(6, 8, dtype=torch.float64)
    lo, hi = reduce_min_max(w.float(), QScheme(granularity="channel", axis=0))
    assert torch.allclose(lo.double(), w.min(dim=1).values, atol=1e-6)
    lo, hi = reduce_min_max(w.float(), QScheme(granularity="channel", axis=1))
    assert torch.allclose(hi.double(), w.max(dim=0).values, atol=1e-6)
    lo, hi = reduce_min_max(w.float(), QScheme(granularity="group", axis=1, group_size=4))
    assert lo.shape == (6, 2)
    assert torch.allclose(lo.double(), w.reshape(6, 2, 4).min(dim=2).values, atol=1e-6)
    scheme = QScheme(bits=4, symmetric=False, granularity="group", axis=1, group_size=4)
    q, scale, zp, scheme = quantize_tensor(w.float(), scheme)
    ref = w.reshape(6, 2, 4)
    amin = ref.min(2, keepdim=True).values.clamp(max=0)
    amax = ref.max(2, keepdim=True).values.clamp(min=0)
    s64 = (amax - amin) / 15
    z64 = (-8 - torch.round(amin / s64)).clamp(-8, 7)
    q64 = torch.clamp(torch.round(ref / s64) + z64, -8, 7).reshape(6, 8)
    assert (q.double() - q64).abs().max() <= 1          # float32 vs float64 may differ at an exact .5 tie
    assert (q.double() != q64).float().mean() < 0.05


def test_bits_out_of_range():
    for bits in (1, 9, 16):
        with pytest.raises(NetshrinkError, match="bit width"):
            QScheme(bits=bits)


def test_group_size_that_does_not_divide_errors_or_falls_back():
    w = torch.randn(4, 10)
    scheme = QScheme(granularity="group", axis=1, group_size=4)
    with pytest.raises(NetshrinkError, match="does not divide"):
        fake_quantize(w, scheme, where="encoder.layer.0.fc")
    fallback = QScheme(granularity="group", axis=1, group_size=4, group_fallback="channel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = resolve_scheme(w, fallback, where="fc")
    assert resolved.group_size == 10 and any("per-channel" in str(c.message) for c in caught)
    per_channel = fake_quantize(w, QScheme(granularity="channel", axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(fake_quantize(w, fallback), per_channel)


def test_nan_is_refused_with_the_layer_name():
    x = torch.tensor([1.0, float("nan")])
    with pytest.raises(NetshrinkError, match="layer3"):
        choose_qparams(x, QScheme(), where="layer3")


def test_float_casts_and_fp8():
    x = torch.randn(64, 32, dtype=torch.float64) * 4
    assert cast(x.float(), "bf16").dtype == torch.bfloat16
    assert (cast(x.float(), "fp16").double() - x).abs().max() <= x.abs().max() * 2**-11
    with pytest.raises(NetshrinkError, match="FP16"):
        cast(torch.tensor([1e6]), "fp16")
    for fmt, mantissa in (("e4m3", 3), ("e5m2", 2)):
        for granularity in ("tensor", "channel"):
            q, scale = quantize_fp8(x.float(), fmt, granularity)
            assert q.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
            back = dequantize_fp8(q, scale).double()
            # relative rounding error of a normal FP8 number is at most 2^-(mantissa+1)
            big = x.abs() > x.abs().max() * 2**-5
            rel = ((back - x).abs() / x.abs())[big]
            assert rel.max() <= 2 ** -(mantissa + 1) * 1.001
            assert back.abs().max() == pytest.approx(float(x.abs().max()), rel=2 ** -(mantissa + 1))


def test_asymmetric_uses_the_whole_grid_on_skewed_data():
    x = torch.linspace(0, 1, 1001)
    asym = (fake_quantize(x, QScheme(symmetric=False, signed=False)) - x).abs().max()
    sym = (fake_quantize(x, QScheme()) - x).abs().max()
    assert asym < 0.6 * sym
    assert np.isclose(float(asym), 0.5 / 255, rtol=0.02)
