"""The GELU folded into FC2's per-token quantizer (`quant.ffn`, `kernels.quantize_after_gelu`)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.quant import kernels
from netshrink.quant.api import quantize_
from netshrink.quant.configs import Int8Dynamic
from netshrink.quant.ffn import feed_forward_chunk, fold_gelu_into_int8, is_exact_gelu
from netshrink.quant.modules import Int8Linear, reference_mode


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.floats(0.05, 20.0), st.floats(-3.0, 3.0), st.integers(0, 2**31 - 1))
def test_scale_from_the_pre_gelu_maximum_never_clips_and_matches_where_it_can(rows, cols, spread, shift, seed):
    y = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread + shift
    y = y.float()
    q, scale = kernels.quantize_after_gelu(y)
    g = F.gelu(y).double()
    bound = scale.double() * 127
    assert (g.abs() <= bound * (1 + 1e-6)).all()                          # no value outside the grid: nothing clips
    assert ((g - q.double() * scale.double()).abs() <= scale.double() / 2 * (1 + 1e-5) + 1e-12).all()  # half a step
    q_ref, scale_ref = kernels.quantize_per_token(F.gelu(y))
    exact = F.gelu(y.amax(dim=1)) >= kernels.GELU_MIN                       # rows where the two scales coincide
    assert torch.allclose(scale[exact], scale_ref[exact], rtol=1e-6, atol=0)
    assert (q[exact].int() - q_ref[exact].int()).abs().max().item() <= 1 if exact.any() else True
    assert (scale >= scale_ref * (1 - 1e-6)).all()                           # elsewhere only coarser, never finer


def test_gelu_minimum_bound_is_tight():
    x = torch.linspace(-3, 0, 300001, dtype=torch.float64)
    lowest = F.gelu(x).min().item()
    assert -kernels.GELU_MIN <= lowest < -kernels.GELU_MIN + 1e-3


def test_linear_after_gelu_matches_a_float64_reference():
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(48, 16))
    y = torch.randn(5, 7, 48) * 2
    got = layer.forward_after_gelu(y)
    q, s = kernels.quantize_after_gelu(y.reshape(-1, 48))
    want = (q.double() * s.double()) @ layer.dequantized_weight().double().T + layer.bias.double()
    assert torch.allclose(got.reshape(-1, 16).double(), want, atol=1e-4)
    with reference_mode(layer):                                                # the float path: layer(gelu(y))
        assert torch.allclose(layer.forward_after_gelu(y), layer(F.gelu(y)))


def test_only_exact_gelu_counts():
    from transformers.activations import ACT2FN

    assert is_exact_gelu(ACT2FN["gelu"]) and is_exact_gelu(F.gelu)
    assert not is_exact_gelu(ACT2FN["gelu_new"]) and not is_exact_gelu(torch.nn.ReLU()) and not is_exact_gelu(None)


def _tiny_bert(hidden_act: str = "gelu"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_act=hidden_act)
    return BertModel(config).eval()


def test_compiled_bert_folds_the_gelu_and_matches_the_unfolded_model():
    model = _tiny_bert()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    eager = quantize_(model, Int8Dynamic(backend="eager"))
    assert fold_gelu_into_int8(copy.deepcopy(eager)) == ["encoder.layer.0", "encoder.layer.1"]
    compiled = quantize_(model, Int8Dynamic(backend="compile", attention="fp32"))
    layers = compiled.encoder.layer
    assert all(layer.feed_forward_chunk.__func__ is feed_forward_chunk for layer in layers)
    twin = copy.deepcopy(compiled)                                            # the fold follows the copy
    assert twin.encoder.layer[0].feed_forward_chunk.__self__ is twin.encoder.layer[0]
    assert set(compiled.state_dict()) == set(eager.state_dict())              # modules and weights unchanged
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).last_hidden_state
        want = eager(ids, attention_mask=mask).last_hidden_state
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.999


def test_other_activations_are_left_alone():
    eager = quantize_(_tiny_bert("relu"), Int8Dynamic(backend="eager"))
    assert fold_gelu_into_int8(eager) == []


@pytest.mark.slow
def test_minilm_folded_ffn_equals_the_unfolded_one(minilm):
    from netshrink import data

    enc = minilm.tokenizer(data.sentences(16), padding=True, truncation=True, max_length=64, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    plain = quantize_(minilm.model, Int8Dynamic(backend="eager"))
    folded = copy.deepcopy(plain)
    assert len(fold_gelu_into_int8(folded)) == 6
    with torch.no_grad():
        a, b = plain(*inputs), folded(*inputs)
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.9999
