"""quantize_ on the real transformers: all-MiniLM-L6-v2 (encoder) and SmolLM2-135M (decoder), plus the compiled path."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from netshrink.quant.api import quant_report, quantize_
from netshrink.quant.configs import Int8Dynamic
from netshrink.quant.modules import Int8Linear, reference_mode


@pytest.fixture(scope="module")
def minilm():
    from netshrink import data, zoo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = zoo.load("minilm")
    enc = entry.tokenizer(data.sentences(24), padding=True, truncation=True, max_length=64, return_tensors="pt")
    return entry, (enc["input_ids"], enc["attention_mask"])


@pytest.mark.slow
def test_minilm_int8_dynamic_keeps_embeddings(minilm):
    entry, inputs = minilm
    q = quantize_(entry.model, Int8Dynamic(backend="eager"))
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 36 + 1                       # 6 layers x (q, k, v, o, fc1, fc2) + pooler
    assert not any(isinstance(m, Int8Linear) for m in entry.model.modules())
    with torch.no_grad():
        ref = entry.model(*inputs)
        out = q(*inputs)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        assert cos.mean() >= 0.995 and cos.min() >= 0.99, (cos.mean(), cos.min())
        with reference_mode(q):                          # float reference of the same quantized maths: equal up
            ref_q = q(*inputs)                           # to rare rounding-boundary flips compounding over 6 layers
        agree = torch.nn.functional.cosine_similarity(ref_q, out, dim=-1)
        assert agree.mean() > 0.998 and agree.min() > 0.99, agree
    per_tensor = quantize_(entry.model, Int8Dynamic(backend="eager", per_channel=False))
    with torch.no_grad():
        cos_t = torch.nn.functional.cosine_similarity(per_tensor(*inputs), ref, dim=-1)
    assert cos_t.mean() < cos.mean()                     # per-channel weights beat per-tensor on outlier channels
    assert "Embedding" in quant_report(q).skipped["backbone.embeddings.word_embeddings"]


@pytest.mark.slow
def test_smollm2_linear_layers_int8():
    from netshrink import data, zoo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = zoo.load("smollm2")
    ids = entry.tokenizer(data.prose("lee")[:600], return_tensors="pt").input_ids[:, :96]
    q = quantize_(entry.model, Int8Dynamic(backend="eager", skip=("lm_head",)))
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 30 * 7
    with torch.no_grad():
        ref = entry.model(ids).logits[0, :-1].float()
        out = q(ids).logits[0, :-1].float()
    nll = lambda logits: nn.functional.cross_entropy(logits, ids[0, 1:]).item()  # noqa: E731
    assert nll(out) < nll(ref) * 1.05                    # perplexity within ~5 %
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85


def test_compiled_backend_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64)).eval()
    x = torch.randn(4, 16, 64)
    eager = quantize_(model, Int8Dynamic(backend="eager"))
    compiled = quantize_(model, Int8Dynamic(backend="compile"))
    assert quant_report(compiled).backend == "compile"
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), atol=1e-3)


def test_compiling_raises_the_recompile_limit_for_several_variants():
    """Variants of one model class share the compiled forward's cache; 8 entries would send later ones to eager."""
    import torch._dynamo

    model = nn.Sequential(nn.Linear(16, 16)).eval()
    quantize_(model, Int8Dynamic(backend="compile"))
    assert torch._dynamo.config.recompile_limit >= 64
