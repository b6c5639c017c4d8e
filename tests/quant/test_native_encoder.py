"""The native int8 encoder (`quant.native_encoder`, `quant/encode.cpp`): its GEMM and GELU against float64, whole
BERT forwards against the eager int8 model, masks, thread splits, pruned layer sizes and the backend choice."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.quant.api import quant_report, quantize_
from netshrink.quant.configs import Int8Dynamic, Int8Static
from netshrink.quant.native_encoder import NativeEncoder, PanelLinear, keys_kept, load_library, native_available

needs_native = pytest.mark.skipif(not native_available(), reason="needs AVX-512 VNNI + BF16 and a C++ compiler")


def _tiny_bert(layers: int = 2, hidden: int = 32, heads: int = 2, inter: int = 64, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, hidden_act="gelu")
    return BertModel(config).eval()


def _inputs(batch: int, seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):                                  # every other row padded at its end
        mask[row, max(1, seq - 3 * row):] = 0
    return ids, mask


def _close_to_eager(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal up to rounding-boundary flips of the int8 codes and the BF16 value products, on the kept tokens."""
    keep = mask.bool()
    cos = F.cosine_similarity(got[keep], want[keep], dim=-1)
    assert cos.min() > 0.999, cos.min()
    assert (got[keep] - want[keep]).abs().max() < 0.05 * want[keep].abs().max()


@needs_native
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 130), st.integers(1, 100), st.integers(1, 21), st.integers(0, 2**31 - 1))
def test_gemm_matches_a_float64_reference_of_the_same_codes(n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-4
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g, dtype=torch.float64) * torch.rand(m, 1, generator=g, dtype=torch.float64) * 5
    x = x.float()
    x[0, 0] = 0.0 if m > 1 else x[0, 0]
    got = PanelLinear(codes, scale, bias)(x).double()
    amax = x.abs().amax(1, keepdim=True)                          # the codes in float32, as the kernel rounds them
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round(x * inv).clamp(-127, 127).double()
    want = (q @ codes.double().T) * (amax.double() / 127) * scale.double() + bias.double()   # the rest in float64
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-6)


@needs_native
def test_gemm_of_an_all_zero_row_is_the_bias():
    linear = PanelLinear(torch.ones(5, 8, dtype=torch.int8), torch.ones(5), torch.arange(5.0))
    assert torch.equal(linear(torch.zeros(2, 8)), torch.arange(5.0).expand(2, 5))


@needs_native
def test_gelu_is_within_1e_6_of_the_exact_one():
    x = torch.cat([torch.linspace(-12, 12, 100001), torch.tensor([0.0, -0.0, 1e-8, -1e-8, 50.0, -50.0])])
    y = x.clone()
    load_library().nse_gelu(y.data_ptr(), y.numel())
    assert (y.double() - F.gelu(x.double())).abs().max() < 1e-6


@needs_native
@pytest.mark.parametrize("batch,seq", [(1, 9), (3, 12), (4, 37)])
def test_bert_forward_matches_the_eager_int8_model(batch, seq):
    model = _tiny_bert()
    ids, mask = _inputs(batch, seq)
    eager = quantize_(model, Int8Dynamic(backend="eager"))
    native = quantize_(model, Int8Dynamic(backend="native"))
    assert quant_report(native).backend == "native" and type(native.encoder).__name__ == "NativeBertEncoder"
    assert set(native.state_dict()) == set(eager.state_dict())              # modules and weights unchanged
    with torch.no_grad():
        got = native(ids, attention_mask=mask).last_hidden_state
        want = eager(ids, attention_mask=mask).last_hidden_state
    _close_to_eager(got, want, mask)


@needs_native
def test_thread_splits_give_identical_results():
    # 3 threads over 1 x 20 tokens: rows 8 / 8 / 4, one sequence shared by all three (the barrier path); 4 x 20
    # tokens over 3 threads mixes private and shared sequences
    model = quantize_(_tiny_bert(layers=3), Int8Dynamic(backend="eager"))
    native = NativeEncoder(model.encoder)
    for batch in (1, 4):
        h = torch.randn(batch, 20, 32, generator=torch.Generator().manual_seed(batch))
        keep = _inputs(batch, 20)[1].bool()
        one = native(h, keep, threads=1)
        for threads in (2, 3):
            assert torch.equal(native(h, keep, threads=threads), one)


@needs_native
def test_padding_keys_have_no_influence():
    model = quantize_(_tiny_bert(), Int8Dynamic(backend="eager"))
    native = NativeEncoder(model.encoder)
    h = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([h, torch.randn(1, 6, 32) * 100], dim=1)             # large junk in the padding
    keep = torch.tensor([[True] * 10 + [False] * 6])
    assert torch.equal(native(padded, keep)[:, :10], native(h))


@needs_native
def test_the_input_is_not_modified():
    native = NativeEncoder(quantize_(_tiny_bert(), Int8Dynamic(backend="eager")).encoder)
    h = torch.randn(2, 5, 32)
    before = h.clone()
    native(h)
    assert torch.equal(h, before)


def _drop_head_and_neurons(model: nn.Module, layer: int, head_dim: int, neurons: int) -> None:
    """Shrink one BertLayer by one attention head and `neurons` FFN neurons, as structured pruning leaves it."""
    block = model.encoder.layer[layer]
    att = block.attention.self
    keep = slice(head_dim, None)                                              # drop head 0
    for name in ("query", "key", "value"):
        old = getattr(att, name)
        new = nn.Linear(old.in_features, old.out_features - head_dim)
        new.weight.data, new.bias.data = old.weight.data[keep].clone(), old.bias.data[keep].clone()
        setattr(att, name, new)
    att.num_attention_heads -= 1
    att.all_head_size -= head_dim
    out = block.attention.output.dense
    new = nn.Linear(out.in_features - head_dim, out.out_features)
    new.weight.data, new.bias.data = out.weight.data[:, keep].clone(), out.bias.data.clone()
    block.attention.output.dense = new
    up, down = block.intermediate.dense, block.output.dense
    new_up, new_down = nn.Linear(up.in_features, up.out_features - neurons), nn.Linear(down.in_features - neurons, down.out_features)
    new_up.weight.data, new_up.bias.data = up.weight.data[neurons:].clone(), up.bias.data[neurons:].clone()
    new_down.weight.data, new_down.bias.data = down.weight.data[:, neurons:].clone(), down.bias.data.clone()
    block.intermediate.dense, block.output.dense = new_up, new_down


@needs_native
def test_pruned_layers_of_different_sizes():
    model = _tiny_bert(layers=2, hidden=64, heads=4, inter=128)
    _drop_head_and_neurons(model, 0, head_dim=16, neurons=40)                # layer 0: 3 heads, 88 neurons
    ids, mask = _inputs(3, 11)
    eager = quantize_(model, Int8Dynamic(backend="eager"))
    native = quantize_(model, Int8Dynamic(backend="native"))
    with torch.no_grad():
        _close_to_eager(native(ids, attention_mask=mask).last_hidden_state,
                        eager(ids, attention_mask=mask).last_hidden_state, mask)


@needs_native
def test_a_deep_copy_runs_natively_with_its_own_handles():
    native = quantize_(_tiny_bert(), Int8Dynamic(backend="native"))
    ids, mask = _inputs(2, 7)
    with torch.no_grad():
        want = native(ids, attention_mask=mask).last_hidden_state
        twin = copy.deepcopy(native)
        del native
        assert type(twin.encoder).__name__ == "NativeBertEncoder"
        assert torch.equal(twin(ids, attention_mask=mask).last_hidden_state, want)


@needs_native
def test_auto_picks_native_and_falls_back_to_compile_when_a_layer_is_float():
    model = _tiny_bert()
    assert quant_report(quantize_(model, Int8Dynamic())).backend == "native"
    partial = quantize_(model, Int8Dynamic(skip=("encoder.layer.1.output.dense",)))
    assert quant_report(partial).backend == "compile"
    with pytest.raises(NetshrinkError, match=r"encoder\.layer\.1\.output\.dense.*not an Int8Linear"):
        quantize_(model, Int8Dynamic(backend="native", skip=("encoder.layer.1.output.dense",)))


@needs_native
def test_native_backend_refuses_what_it_cannot_run():
    with pytest.raises(NetshrinkError, match="Int8Dynamic models only"):
        quantize_(_tiny_bert(), Int8Static(backend="native"), calibration=[(torch.randint(0, 100, (2, 6)),)])
    with pytest.raises(NetshrinkError, match="no BERT-style encoder"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), Int8Dynamic(backend="native"))
    from transformers import BertConfig, BertModel

    relu = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, hidden_act="relu")).eval()
    with pytest.raises(NetshrinkError, match="exact .erf. GELU"):
        quantize_(relu, Int8Dynamic(backend="native"))
    odd = BertModel(BertConfig(vocab_size=50, hidden_size=40, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).eval()                  # head dimension 20
    with pytest.raises(NetshrinkError, match="head dimension must be one of"):
        quantize_(odd, Int8Dynamic(backend="native"))


def test_keys_kept_reads_every_mask_form():
    pad = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(keys_kept(pad, 2, 3), pad.bool())
    assert keys_kept(None, 2, 3).all()
    additive = torch.zeros(2, 1, 1, 3)
    additive[0, 0, 0, 2] = torch.finfo(torch.float32).min
    assert torch.equal(keys_kept(additive, 2, 3), pad.bool())
    boolean = pad.bool()[:, None, None, :].expand(2, 1, 3, 3)
    assert torch.equal(keys_kept(boolean, 2, 3), pad.bool())
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None].expand(2, 1, 3, 3)
    assert keys_kept(causal, 2, 3) is None                                    # not a padding mask: not ours to run


@pytest.mark.slow
@needs_native
def test_minilm_native_int8_keeps_the_embeddings(minilm):
    from netshrink import data

    enc = minilm.tokenizer(data.sentences(64), padding="max_length", truncation=True, max_length=128,
                           return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    native = quantize_(minilm.model, Int8Dynamic())
    assert quant_report(native).backend == "native"
    eager = quantize_(minilm.model, Int8Dynamic(backend="eager"))
    with torch.no_grad():
        ref, got, plain = minilm.model(*inputs), native(*inputs), eager(*inputs)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.99, (cos.mean(), cos.min())
    agree = F.cosine_similarity(got, plain, dim=-1)      # two int8 models: each rounds its own way, both near FP32
    assert agree.mean() > 0.996 and agree.min() > 0.99, (agree.mean(), agree.min())


@needs_native
def test_exporters_and_tracing_see_the_plain_modules():
    from netshrink.export.lowering import float_twin

    model = _tiny_bert()
    native = quantize_(model, Int8Dynamic(backend="native"))
    twin, _ = float_twin(native)
    twin_of_eager, _ = float_twin(quantize_(model, Int8Dynamic(backend="eager")))
    assert type(twin.encoder).__name__ == "BertEncoder" and type(native.encoder).__name__ == "NativeBertEncoder"
    ids, mask = _inputs(2, 9)
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask).last_hidden_state,
                           twin_of_eager(ids, attention_mask=mask).last_hidden_state)
        traced = torch.jit.trace(native, (ids, mask), strict=False, check_trace=False)
        other, other_mask = _inputs(2, 9, seed=7)                             # not a constant baked in at trace time
        eager = quantize_(model, Int8Dynamic(backend="eager"))
        assert torch.allclose(traced(other, other_mask)["last_hidden_state"],
                              eager(other, attention_mask=other_mask).last_hidden_state, atol=1e-5)


@needs_native
def test_model_level_fast_path_and_its_fallbacks_agree():
    model = _tiny_bert()
    native = quantize_(model, Int8Dynamic(backend="native"))
    assert type(native).__name__ == "NativeBertModel"
    ids, mask = _inputs(3, 10)
    with torch.no_grad():
        fast = native(input_ids=ids, attention_mask=mask)
        full = native(input_ids=ids, attention_mask=mask, output_hidden_states=True)   # the original forward
        embeds = native(inputs_embeds=native.embeddings.word_embeddings(ids), attention_mask=mask)
        no_mask = native(input_ids=ids)
    assert full.hidden_states is not None and len(full.hidden_states) == 3
    keep = mask.bool()
    _close_to_eager(fast.last_hidden_state, full.last_hidden_state, mask)
    assert torch.equal(fast.last_hidden_state[keep], embeds.last_hidden_state[keep])   # the encoder is native in both
    assert torch.allclose(fast.pooler_output, native.pooler(fast.last_hidden_state))
    assert torch.equal(no_mask.last_hidden_state[0], fast.last_hidden_state[0])        # row 0 is unpadded


@needs_native
def test_calls_from_several_python_threads_do_not_share_buffers_mid_forward():
    from concurrent.futures import ThreadPoolExecutor

    native = NativeEncoder(quantize_(_tiny_bert(), Int8Dynamic(backend="eager")).encoder)
    inputs = [torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    want = [native(h) for h in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(native, inputs * 5))
    assert all(torch.equal(g, want[i % 8]) for i, g in enumerate(got))


@needs_native
def test_a_saved_checkpoint_loads_back_onto_the_native_runtime(tmp_path):
    from netshrink.export.checkpoint import load_checkpoint, save_checkpoint

    model = _tiny_bert()
    native = quantize_(model, Int8Dynamic(backend="native"))
    loaded = load_checkpoint(save_checkpoint(native, tmp_path / "ck"), model=model)
    assert type(loaded.encoder).__name__ == "NativeBertEncoder"
    eager = load_checkpoint(save_checkpoint(quantize_(model, Int8Dynamic(backend="eager")), tmp_path / "ck2"),
                            model=model)
    assert type(eager.encoder).__name__ == "BertEncoder"                     # eager stays eager
    ids, mask = _inputs(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state,
                           native(ids, attention_mask=mask).last_hidden_state)


@needs_native
def test_with_gradients_enabled_it_warns_and_runs_the_eager_layers():
    model = _tiny_bert()
    native = quantize_(model, Int8Dynamic(backend="native"))
    eager = quantize_(model, Int8Dynamic(backend="eager"))
    ids, mask = _inputs(2, 6)
    with pytest.warns(UserWarning, match="runs without autograd"):
        got = native(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, eager(ids, attention_mask=mask).last_hidden_state)
