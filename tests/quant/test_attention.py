"""BF16 attention for encoders: the chunked score/softmax/value path against a float64 reference, and its mask."""
from __future__ import annotations

import warnings

import pytest
import torch

from netshrink.quant import attention
from netshrink.quant.attention import additive_bias, bf16_attention, padding_mask


def reference(q, k, v, keep):
    """softmax(Q K^T / sqrt(d) + mask) V in float64, as [batch, seq, heads, dim]."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("batch", [1, 5])
def test_bf16_attention_matches_float64_across_chunks(monkeypatch, batch):
    torch.manual_seed(batch)
    q, k, v = (torch.randn(batch, 4, 16, 8) for _ in range(3))
    keep = torch.ones(batch, 16, dtype=torch.int64)
    keep[-1, 11:] = 0                                   # padding in the last sequence only
    monkeypatch.setattr(attention, "SCORES_PER_CHUNK", 2 * 4 * 128 * 128)   # chunks of 2 sequences: 5 -> 2+2+1
    out, _ = bf16_attention(None, q, k, v, padding_mask(batch, 16, 16, attention_mask=keep))
    want = reference(q, k, v, keep)
    assert out.shape == want.shape == (batch, 16, 4, 8)
    # BF16 inputs (8-bit mantissa) and BF16 probabilities: error of a few parts in 1e3 of the value scale
    assert (out.double() - want).abs().max() < 0.03
    # the chunked result equals one whole-batch pass (chunking changes nothing but speed)
    monkeypatch.setattr(attention, "SCORES_PER_CHUNK", 1 << 30)
    whole, _ = bf16_attention(None, q, k, v, padding_mask(batch, 16, 16, attention_mask=keep))
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)


def test_compiled_attention_does_not_recompile_for_new_lengths():
    """The chunking depends on the head count only: new sequence lengths reuse one dynamic graph (the demo's
    quality evaluation feeds many lengths; specialising on each one hit torch.compile's recompile limit)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    fn = torch.compile(lambda q, k, v, m: bf16_attention(None, q, k, v, m)[0], backend=counter, dynamic=True)
    for seq in (16, 24, 40, 57):
        q, k, v = (torch.randn(40, 2, seq, 8) for _ in range(3))       # 40 sequences: several chunks
        keep = torch.ones(40, seq, dtype=torch.int64)
        fn(q, k, v, padding_mask(40, seq, seq, attention_mask=keep))
    assert counter.frame_count == 1


def test_padding_bias_and_masked_keys_get_no_weight():
    keep = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bias = additive_bias(keep)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.float32
    assert bias[0, 0, 0].tolist() == [0.0, 0.0, float("-inf")]
    assert padding_mask(2, 3, 3, attention_mask=None) is None
    # a value carried only by a padded key must not leak into any output
    q = torch.randn(2, 1, 3, 4)
    k = torch.randn(2, 1, 3, 4)
    v = torch.zeros(2, 1, 3, 4)
    v[0, 0, 2] = 1000.0
    out, _ = bf16_attention(None, q, k, v, bias)
    assert out.abs().max() == 0


def test_additive_bias_is_one_opaque_op_under_compile():
    fn = torch.compile(lambda keep, x: x + additive_bias(keep), fullgraph=True)   # fullgraph: no graph break
    keep = torch.tensor([[1, 0]])
    assert fn(keep, torch.zeros(1, 1, 1, 2)).tolist() == [[[[0.0, float("-inf")]]]]


@pytest.mark.slow
def test_minilm_compiled_int8_uses_bf16_attention_and_keeps_fidelity():
    from netshrink import data, zoo
    from netshrink.quant import Int8Dynamic, quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = zoo.load("minilm")
    enc = entry.tokenizer(data.sentences(40), padding=True, truncation=True, max_length=64, return_tensors="pt")
    q = quantize_(entry.model, Int8Dynamic(backend="compile"))   # compiled: attention "auto" -> bf16
    assert q.backbone.config._attn_implementation == attention.NAME
    assert entry.model.backbone.config._attn_implementation != attention.NAME   # the input model is untouched
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(enc["input_ids"], enc["attention_mask"]),
                                                    entry.model(enc["input_ids"], enc["attention_mask"]), dim=-1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.99, (cos.mean(), cos.min())
