"""fuse_projections: one packed matmul for q/k/v and one for gate/up, with the model's outputs unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm import RTN, PackedLinear, compress_llm, quantize_weight, weight_bytes_per_token
from netshrink.llm.fuse import FusedSlice, concat_packed, fuse_projections


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_fused_model_equals_unfused(tiny_llama, bits, group):
    packed = compress_llm(tiny_llama, RTN(bits, group, symmetric=group is None), pack=True)
    fused = copy.deepcopy(packed)
    assert fuse_projections(fused) == 2 * len(fused.model.layers)
    block = fused.model.layers[0]
    assert all(isinstance(m, FusedSlice) for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                                                     block.self_attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj))
    assert isinstance(block.self_attn.o_proj, PackedLinear) and isinstance(block.mlp.down_proj, PackedLinear)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fused(ids).logits, packed(ids).logits)
    with torch.inference_mode():                       # decoding with a KV cache, as the decode benchmark does
        a, b = packed(ids[:1], use_cache=True), fused(ids[:1], use_cache=True)
        nxt = a.logits[:, -1:].argmax(-1)
        assert torch.equal(packed(nxt, past_key_values=a.past_key_values).logits,
                           fused(nxt, past_key_values=b.past_key_values).logits)
    # the fused layers are counted once: the same bytes are read per token
    for m in (packed, fused):
        for layer in m.modules():
            if isinstance(layer, PackedLinear):
                layer.prepare()
    assert weight_bytes_per_token(fused) == pytest.approx(weight_bytes_per_token(packed), rel=0.02)


def test_fused_weights_match_the_float64_reference():
    torch.manual_seed(0)
    layers = [PackedLinear.from_quantized(quantize_weight(torch.randn(n, 64), 4, 32, False), torch.randn(n))
              for n in (24, 8, 8)]
    fused = concat_packed(layers)
    x = torch.randn(3, 64, dtype=torch.float64)
    reference = torch.cat([x @ layer.dequantized_weight().double().T + layer.bias.double() for layer in layers], -1)
    assert torch.allclose(fused.dequantized_weight().double(),
                          torch.cat([layer.dequantized_weight() for layer in layers]).double())
    # the kernel runs with BF16 activations: within BF16's rounding of x and of the products
    assert torch.allclose(fused(x.float()).double(), reference, rtol=0.02, atol=0.05 * reference.abs().max().item())


def test_slices_recompute_for_a_new_or_changed_input():
    torch.manual_seed(0)
    q = PackedLinear.from_quantized(quantize_weight(torch.randn(16, 32), 8, None, True))
    k = PackedLinear.from_quantized(quantize_weight(torch.randn(8, 32), 8, None, True))
    from netshrink.llm.fuse import SharedProjection
    shared = SharedProjection(concat_packed([q, k]), [16, 8])
    fq, fk = FusedSlice(shared, 0, 32, 16), FusedSlice(shared, 1, 32, 8)
    x = torch.randn(2, 32)
    assert torch.equal(fq(x), q(x)) and torch.equal(fk(x), k(x))
    y = torch.randn(2, 32)
    assert torch.equal(fk(y), k(y)) and torch.equal(fq(y), q(y))      # order does not matter
    fq(x)
    x.mul_(2)                                                           # changed in place before k reads it
    assert torch.equal(fk(x), k(x))
    assert torch.equal(fq(x), q(x)) and torch.equal(fq(x), q(x))      # a part asked twice is recomputed
    assert shared._input is not None                                   # k has not taken the last result yet
    fk(x)
    assert shared._input is None and shared._output is None            # every part taken: references dropped


def test_mismatched_groups_are_refused_and_float_groups_skipped(tiny_llama):
    a = PackedLinear.from_quantized(quantize_weight(torch.randn(8, 64), 4, 32, False))
    b = PackedLinear.from_quantized(quantize_weight(torch.randn(8, 64), 4, 64, False))
    with pytest.raises(NetshrinkError, match="fuse"):
        concat_packed([a, b])
    model = copy.deepcopy(tiny_llama)                                   # nothing packed: nothing to fuse
    assert fuse_projections(model) == 0
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
