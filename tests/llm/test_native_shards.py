"""The native decoder's tensor-parallel split: every head and intermediate row in exactly one shard, on boundaries
each slice's grid can hold; column slices of a grid dequantize to the grid's columns; and decodes with unequal
shards and kv heads shared between shards match the float64 re-implementation of the native step."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from netshrink.llm import RTN, compress_llm, pack_lm_head
from netshrink.llm.native import NativeDecoder
from netshrink.llm.native.layout import native_matrix, native_matvec, reference_matvec
from netshrink.llm.native.shards import column_unit, grid_columns, grid_rows, plan_shards

from test_native_decode import native_reference, needs_native, random_grid


@settings(max_examples=200, deadline=None)
@given(kv=st.integers(1, 8), group=st.integers(1, 6), head_dim=st.sampled_from([16, 32, 64, 128]),
       inter_units=st.integers(1, 40), o_group=st.sampled_from([64, 128, 256, None]),
       down_group=st.sampled_from([64, 128, 256, None]), threads=st.integers(1, 5))
def test_plan_covers_every_head_and_row_once_on_allowed_boundaries(kv, group, head_dim, inter_units, o_group,
                                                                    down_group, threads):
    heads, inter = kv * group, 64 * inter_units
    o_group, down_group = o_group or heads * head_dim, down_group or inter      # None: per channel
    plans = plan_shards(heads, kv, head_dim, inter, o_group, down_group, threads)
    assert len(plans) == threads
    assert [p.h0 for p in plans[1:]] == [p.h1 for p in plans[:-1]] and plans[0].h0 == 0 and plans[-1].h1 == heads
    assert [p.i0 for p in plans[1:]] == [p.i1 for p in plans[:-1]] and plans[0].i0 == 0 and plans[-1].i1 == inter
    for p in plans:
        assert p.h0 * head_dim % column_unit(heads * head_dim, o_group) == 0
        assert p.i0 % column_unit(inter, down_group) == 0
        needed = sorted({h // group for h in range(p.h0, p.h1)})
        assert list(range(p.j0, p.j1)) == needed                 # exactly the kv heads its q heads read
    units = -(-heads * head_dim // column_unit(heads * head_dim, o_group))
    if units >= threads and heads * head_dim % column_unit(heads * head_dim, o_group) == 0:
        sizes = [p.h1 - p.h0 for p in plans]
        assert max(sizes) - min(sizes) <= max(1, -(-column_unit(heads * head_dim, o_group) // head_dim))


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 40), blocks=st.integers(1, 12), bits=st.sampled_from([4, 8]),
       group_blocks=st.sampled_from([1, 2, 4, None]), cut=st.data(), seed=st.integers(0, 99))
def test_a_column_slice_is_the_grid_of_those_columns(rows, blocks, bits, group_blocks, cut, seed):
    cols = 64 * blocks
    group = cols if group_blocks is None else 64 * group_blocks
    qw = random_grid(rows, cols, bits, group, seed)
    unit = column_unit(cols, group)
    bounds = sorted(cut.draw(st.lists(st.integers(0, -(-cols // unit)), min_size=2, max_size=2)))
    c0, c1 = bounds[0] * unit, min(cols, bounds[1] * unit)
    if c1 <= c0:
        return
    part = grid_columns(qw, c0, c1)
    assert torch.equal(part.dequantize(torch.float64), qw.dequantize(torch.float64)[:, c0:c1])
    picked = grid_rows(qw, [(0, min(3, rows)), (rows // 2, rows)])
    want = torch.cat([qw.dequantize()[: min(3, rows)], qw.dequantize()[rows // 2:]])
    assert torch.equal(picked.dequantize(), want)


@needs_native
def test_partial_products_of_column_slices_add_up_to_the_whole_product():
    qw = random_grid(48, 384, 4, 128, seed=3)
    x = torch.randn(384)
    whole = reference_matvec(native_matrix(qw), x)
    parts = [native_matvec(native_matrix(grid_columns(qw, a, b)), x[a:b]) for a, b in [(0, 128), (128, 384)]]
    assert torch.allclose(parts[0].double() + parts[1].double(), whole, rtol=1e-5, atol=1e-5)


def smol_shaped(heads: int, kv: int, inter: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64 * heads, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=64, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@needs_native
@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("bits,group", [(4, 128), (8, None)])
def test_unequal_shards_and_shared_kv_heads_match_the_float64_reference(threads, bits, group):
    # SmolLM2's attention shape (9 heads, 3 kv heads): with 2 threads, 4 and 5 heads, kv head 1 in both shards
    model = pack_lm_head(compress_llm(smol_shaped(9, 3, 384), RTN(bits, group, symmetric=bits == 8), pack=True), 8)
    decoder = NativeDecoder(model, max_len=16, threads=threads)
    shared = [j for j in range(3) if sum(p.j0 <= j < p.j1 for p in decoder.shards) > 1]
    assert shared, decoder.shards
    assert decoder.bytes_read > decoder.weight_bytes                # a shared kv head is read by both shards
    ids = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    one = NativeDecoder(model, max_len=16, threads=1)
    errors = []
    for n in (1, 3, 6):
        for d in (decoder, one):
            d.reset()
            got = d.forward(torch.tensor(ids[:n]))
            want = native_reference(d, model, ids[:n])
            errors.append(float((got.double() - want).abs().max() / want.abs().max()))
    # float32 rounding, and at times one int8 activation code off by one: an activation within float32 rounding
    # of a step between codes (about 1% of the logits in this random model; a key or value cached at position p
    # carries it into every later prefix, so no prefix count is exact for sure). A head, kv head or partial sum
    # missed or misplaced moves the logits by tens of percent.
    assert max(errors) < 0.03, errors
