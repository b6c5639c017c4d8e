"""N:M masks (exact counts per group), the compressed layout round trip, padding/skipping, hardware statement."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from netshrink.errors import NetshrinkError
from netshrink.sparsity import NM, compress_nm, decompress_nm, nm_mask, prune_, to_semi_structured
from netshrink.sparsity.masks import get_mask
from netshrink.sparsity.nm import execution_statement, pack_bits, reduction_view, unpack_bits

from sparsity_helpers import state_equal, frozen_copy


@st.composite
def nm_case(draw):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    rows = draw(st.integers(1, 6))
    k = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 10_000))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if draw(st.booleans()):
        w[w.abs() < 0.5] = 0  # exact zeros and ties must not confuse the layout
    return n, m, w


@settings(max_examples=150, deadline=None)
@given(nm_case())
def test_mask_keeps_the_n_largest_of_every_m(case):
    n, m, w = case
    mask = nm_mask(w, n, m)
    rows, k = w.shape
    for g in range(0, k, m):
        block, kept = w[:, g:g + m].abs().double(), mask[:, g:g + m]
        assert bool((kept.sum(1) == min(n, block.shape[1])).all())
        if (~kept).any():
            lowest_kept = torch.where(kept, block, torch.inf).min(1).values
            dropped_max = torch.where(~kept, block, -torch.inf).max(1).values
            assert bool((dropped_max <= lowest_kept).all())


@settings(max_examples=150, deadline=None)
@given(nm_case())
def test_compressed_layout_round_trips_exactly(case):
    n, m, w = case
    c = compress_nm(w, n, m)
    rows, k = w.shape
    groups = -(-k // m)
    assert c.values.shape == (rows, groups * n) and c.values.dtype == w.dtype
    assert c.indices.dtype == torch.uint8
    assert c.indices.numel() == -(-rows * groups * n * c.index_bits // 8)
    assert torch.equal(decompress_nm(c), w * nm_mask(w, n, m))
    sparse = w * nm_mask(w, n, m)
    assert torch.equal(decompress_nm(compress_nm(sparse, n, m)), sparse)  # already N:M: identity


def test_two_four_layout_is_two_bit_indices_low_bits_first():
    w = torch.tensor([[0.0, 5.0, 0.0, -7.0, 1.0, 0.0, 0.0, 2.0]])
    c = compress_nm(w, 2, 4)
    assert c.values.tolist() == [[5.0, -7.0, 1.0, 2.0]]
    # group 0 keeps positions 1 and 3, group 1 keeps 0 and 3: 1 | 3<<2 | 0<<4 | 3<<6
    assert c.indices.tolist() == [1 | (3 << 2) | (0 << 4) | (3 << 6)]
    assert c.nbytes() == 4 * 4 + 1


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 7), st.lists(st.integers(0, 127), min_size=1, max_size=40))
def test_pack_bits_round_trip(bits, values):
    vals = torch.tensor([v % (1 << bits) for v in values])
    assert torch.equal(unpack_bits(pack_bits(vals, bits), bits, len(values)), vals)


def test_nm_prune_on_real_cnn_pads_the_first_conv_and_groups_input_channels(digit_cnn, digits_batch):
    with pytest.warns(UserWarning, match=r"^2:4 sparsity: padded .*: conv_layers\.0$"):
        model = prune_(digit_cnn, NM(2, 4))
    result = model._netshrink_nm_result
    assert result.padded == ["conv_layers.0"]  # 1 input channel x 3 x 3 = 9, not divisible by 4
    for name in ("conv_layers.3", "conv_layers.6", "fc_layers.0", "fc_layers.2"):
        m = model.get_submodule(name)
        view = reduction_view(get_mask(m))
        assert bool((view.view(view.shape[0], -1, 4).sum(-1) == 2).all()), name
    conv = model.conv_layers[3]
    kept = get_mask(conv).permute(0, 2, 3, 1)  # channels-last: groups of 4 consecutive input channels
    assert bool((kept.reshape(64, 3, 3, 8, 4).sum(-1) == 2).all())
    assert "no 2:4 speedup" in result.execution or "2:4 sparse tensor cores" in result.execution
    x, _ = digits_batch
    with torch.no_grad():
        assert model(x).shape == (256, 10)


def test_skip_policy_leaves_layer_dense_and_says_so(digit_cnn):
    with pytest.warns(UserWarning, match=r"^2:4 sparsity: skipped, left dense .*: conv_layers\.0$"):
        model = prune_(digit_cnn, NM(2, 4, indivisible="skip"))
    assert model._netshrink_nm_result.skipped == ["conv_layers.0"]
    assert get_mask(model.conv_layers[0]) is None
    assert "not divisible by 4" in model._netshrink_record["conv_layers.0"]["nm_skipped"]
    assert any("skipped" in line for line in model._netshrink_nm_result.lines())


@pytest.mark.parametrize("n,m,where", [(3, 2, "NM.n"), (0, 4, "NM"), (2, 4.0, "NM")])
def test_bad_n_m_refused_and_model_untouched(digit_cnn, n, m, where):
    before = frozen_copy(digit_cnn)
    with pytest.raises(NetshrinkError) as info:
        prune_(digit_cnn, NM(n, m), inplace=True)
    assert info.value.where == where
    assert state_equal(before, digit_cnn)


def test_hardware_statement_is_plain():
    cpu = SimpleNamespace(cuda_capability=None)
    turing = SimpleNamespace(cuda_capability=(7, 5))
    ampere = SimpleNamespace(cuda_capability=(8, 0))
    assert "no 2:4 speedup" in execution_statement(NM(), cpu)
    assert "no 2:4 speedup" in execution_statement(NM(), turing) and "7.5" in execution_statement(NM(), turing)
    assert "sparse tensor cores" in execution_statement(NM(), ampere)
    assert "no hardware kernel" in execution_statement(NM(1, 4), ampere)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path; the GPU path needs CUDA")
def test_semi_structured_conversion_is_a_no_op_without_capable_gpu(digit_cnn):
    model = prune_(digit_cnn, NM(2, 4))
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    outcome = to_semi_structured(model)
    assert list(outcome) == ["*"] and "no 2:4 speedup" in outcome["*"]
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
