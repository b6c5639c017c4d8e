"""Least-squares reconstruction of cut layers: float64 references, residual targets, and real MiniLM sentences."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity import Structured, prune_, structured_report
from netshrink.sparsity.structured.reconstruct import Reconstruct, reconstruct_, residual_norm


def _mlp(hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 5)).double().eval()


def _batches(n: int = 6, rows: int = 40, seed: int = 1) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 6, generator=g, dtype=torch.float64),) for _ in range(n)]


def test_refit_of_an_uncut_layer_recovers_the_original_weights():
    teacher = _mlp(40)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[2].weight.add_(0.3 * torch.randn_like(student[2].weight))
        student[2].bias.zero_()
    (result,) = reconstruct_(student, teacher, _batches(), Reconstruct(ridge=0.0), layers=["2"])
    torch.testing.assert_close(student[2].weight, teacher[2].weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(student[2].bias, teacher[2].bias, rtol=0, atol=1e-9)
    assert result.error_before > 0.01 and result.error_after < 1e-18 and result.tokens == 240


def test_refit_after_a_cut_equals_a_float64_least_squares_solution():
    teacher = _mlp(40)
    keep = torch.arange(0, 40, 2)
    student = copy.deepcopy(teacher)
    student[0] = nn.Linear(6, 20).double()
    student[2] = nn.Linear(20, 5).double()
    with torch.no_grad():
        student[0].weight.copy_(teacher[0].weight[keep]), student[0].bias.copy_(teacher[0].bias[keep])
        student[2].weight.copy_(teacher[2].weight[:, keep]), student[2].bias.copy_(teacher[2].bias)
    batches = _batches()
    (result,) = reconstruct_(student, teacher, batches, Reconstruct(ridge=0.0))
    x = torch.cat([torch.relu(student[0](b[0])) for b in batches])
    y = torch.cat([teacher(b[0]) for b in batches])
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    want = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(student[2].weight.detach(), want[:-1].T, rtol=0, atol=1e-8)
    torch.testing.assert_close(student[2].bias.detach(), want[-1], rtol=0, atol=1e-8)
    with torch.no_grad():
        direct = float((student(torch.cat([b[0] for b in batches])) - y).pow(2).sum() / y.pow(2).sum())
    assert result.layer == "2" and result.norm is None
    assert result.error_after == pytest.approx(direct, rel=1e-6) and result.error_after < result.error_before


def test_residual_norms_of_bert_and_llama_blocks():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    assert residual_norm(bert, "encoder.layer.1.attention.output.dense") == "encoder.layer.1.attention.output.LayerNorm"
    assert residual_norm(bert, "encoder.layer.0.output.dense") == "encoder.layer.0.output.LayerNorm"
    assert residual_norm(bert, "pooler.dense") is None
    llama = LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100))
    assert residual_norm(llama, "layers.0.self_attn.o_proj") == "layers.0.post_attention_layernorm"
    assert residual_norm(llama, "layers.0.mlp.down_proj") == "layers.1.input_layernorm"
    assert residual_norm(llama, "layers.1.mlp.down_proj") == "norm"


def test_reconstruction_brings_a_cut_llama_closer_to_the_original():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=200)
    model = LlamaForCausalLM(config).double().eval()
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randint(0, 200, (4, 32), generator=g),) for _ in range(16)]
    held = torch.randint(0, 200, (4, 32), generator=g)
    base = Structured(ratio=0.5, head_ratio=0.5, importance="activation")
    errors = {}
    for name, on in (("cut", False), ("refit", True)):
        cut = prune_(model, Structured(**{**base.__dict__, "reconstruct": on}), calibration=calib)
        with torch.no_grad():
            errors[name] = float((cut(held).logits - model(held).logits).pow(2).mean())
        if on:
            refits = structured_report(cut).refits
            assert [r.layer for r in refits] == [f"model.layers.{i}.{p}" for i in range(3)
                                                 for p in ("self_attn.o_proj", "mlp.down_proj")]
            applied = [r for r in refits if not r.skipped]
            assert len(applied) >= 4, [r.skipped for r in refits]
            assert all(r.error_after < r.error_before for r in applied)
            assert refits[-1].norm == "model.norm"
    assert errors["refit"] < 0.7 * errors["cut"], errors


def test_reconstruction_without_calibration_or_with_nan_is_refused():
    with pytest.raises(NetshrinkError, match="Structured.reconstruct"):
        prune_(_mlp(40), Structured(ratio=0.5, reconstruct=True), example_inputs=(torch.randn(2, 6).double(),))
    teacher = _mlp(40)
    student = copy.deepcopy(teacher)
    bad = [(torch.full((4, 6), float("nan"), dtype=torch.float64),)]
    with pytest.raises(NetshrinkError, match="^2: NaN"):
        reconstruct_(student, teacher, bad, layers=["2"])


def test_reconstruction_lifts_minilm_embeddings_on_real_sentences():
    """Half the FFN neurons and heads cut: the refit brings held-out embeddings much closer than bias
    compensation alone (0.70 -> 0.76 mean cosine here with 5 batches; 0.74 -> 0.87 with 96 batches)."""
    from netshrink import zoo
    from netshrink.data import sentences

    entry = zoo.load("minilm")
    model, tok = entry.model, entry.tokenizer
    pool = sentences()
    calib = [tuple(tok(pool[i:i + 32], padding=True, return_tensors="pt")[k] for k in ("input_ids", "attention_mask"))
             for i in range(0, 32 * 5, 32)]
    held = tok(pool[-64:], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(held["input_ids"], held["attention_mask"])
    cos = {}
    for on in (False, True):
        config = Structured(ratio=0.5, head_ratio=0.5, importance="activation", compensate=True, reconstruct=on)
        cut = prune_(model, config, calibration=calib)
        with torch.no_grad():
            cos[on] = float(torch.cosine_similarity(cut(held["input_ids"], held["attention_mask"]), ref).mean())
    assert cos[True] > cos[False] + 0.03, cos
    assert len(structured_report(cut).refits) == 12


def test_too_few_tokens_skip_the_refit_instead_of_overfitting():
    teacher = _mlp(40)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[2].weight.add_(0.3)
    before = student[2].weight.clone()
    with pytest.warns(UserWarning, match="would overfit"):
        (result,) = reconstruct_(student, teacher, _batches(n=1, rows=30), layers=["2"])
    assert result.skipped and torch.equal(student[2].weight, before)
