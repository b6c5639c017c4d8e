"""Structured pruning of all-MiniLM-L6-v2 (FFN neurons, heads) and SmolLM2 (GQA): cut == masked on real text."""
from __future__ import annotations

import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.sparsity import Structured, apply_plan, plan_structured, prune_, resize_to_pruned, structured_report

from sparsity_helpers import frozen_copy


@pytest.fixture(scope="module")
def minilm():
    from netshrink import zoo

    entry = zoo.load("minilm")
    return entry.model, entry.example_inputs(batch=4, seq_len=48), entry.tokenizer


@pytest.fixture(scope="module")
def smollm2_4_layers():
    """SmolLM2-135M cut to its first 4 decoder layers (real weights), in float64 so equality is exact."""
    from netshrink import zoo

    entry = zoo.load("smollm2")
    model = entry.model
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    (ids,) = entry.example_inputs(batch=2, seq_len=24)
    return model.double().eval(), ids


def _twins(model, config):
    plan = plan_structured(model, config)
    cut, masked = frozen_copy(model), frozen_copy(model)
    apply_plan(cut, plan, physical=True)
    apply_plan(masked, plan, physical=False)
    return plan, cut.eval(), masked.eval()


def test_minilm_half_ffn_half_heads_cut_equals_masked(minilm):
    model, (ids, mask), _ = minilm
    plan, cut, masked = _twins(model, Structured(ratio=0.5, head_ratio=0.5))
    with torch.no_grad():
        a, b, ref = cut(ids, mask), masked(ids, mask), model(ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(torch.cosine_similarity(a, ref).mean()) < 0.999, "pruning changed nothing"
    for layer in cut.backbone.encoder.layer:
        assert layer.attention.self.query.out_features == 6 * 32 and layer.attention.self.num_attention_heads == 6
        assert layer.intermediate.dense.out_features == 768 and layer.output.dense.in_features == 768
    cfg = cut.backbone.config
    assert cfg.intermediate_size == 768 and cfg.netshrink_pruned_layers["encoder.layer.0"]["heads"] == 6
    assert model.backbone.config.intermediate_size == 1536, "the original config was changed"
    report = structured_report(cut)
    assert report.params_after < 0.8 * report.params_before


def test_activation_importance_and_bias_compensation_help_minilm(minilm):
    """On real sentences: data-aware selection beats weight norms, and folding the removed units' mean
    contribution into the biases brings the embeddings closer still (same units, cut == masked)."""
    from netshrink.data import sentences

    model, _, tok = minilm
    pool = sentences()
    calib = [tuple(tok(pool[i:i + 16], padding=True, return_tensors="pt")[k] for k in ("input_ids", "attention_mask"))
             for i in range(0, 64, 16)]
    held = tok(pool[-48:], padding=True, return_tensors="pt")
    ids, mask = held["input_ids"], held["attention_mask"]
    with torch.no_grad():
        ref = model(ids, mask)
    cos = {}
    for name, kw in (("l2", {}), ("activation", {}), ("activation+comp", {"compensate": True})):
        config = Structured(ratio=0.5, head_ratio=0.5, importance=name.split("+")[0], **kw)
        plan, cut, masked = _twins_cal(model, config, calib)
        with torch.no_grad():
            out = cut(ids, mask)
            torch.testing.assert_close(out, masked(ids, mask), rtol=1e-5, atol=1e-6)
        cos[name] = float(torch.cosine_similarity(out, ref).mean())
    assert cos["l2"] < cos["activation"] < cos["activation+comp"], cos


def _twins_cal(model, config, calibration):
    plan = plan_structured(model, config, calibration=calibration)
    cut, masked = frozen_copy(model), frozen_copy(model)
    apply_plan(cut, plan, physical=True)
    apply_plan(masked, plan, physical=False)
    return plan, cut.eval(), masked.eval()


def test_minilm_reloads_from_its_pruned_config(minilm):
    from transformers import BertModel

    from netshrink.zoo import SentenceEncoder

    model, (ids, mask), _ = minilm
    cut = prune_(model, Structured(ratio=0.25, head_ratio=0.5, per_group={"*layer.5.ffn": 0.75}))
    fresh = BertModel(cut.backbone.config)
    resize_to_pruned(fresh)
    fresh.load_state_dict(cut.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(SentenceEncoder(fresh.eval())(ids, mask), cut(ids, mask))
    assert fresh.encoder.layer[5].intermediate.dense.out_features == 384
    assert fresh.encoder.layer[0].intermediate.dense.out_features == 1152


@pytest.mark.parametrize("gqa,head_ratio,heads,kv", [("query_heads", 1 / 3, 6, 3), ("kv_groups", 1 / 3, 6, 2)])
def test_smollm2_gqa_cut_equals_masked(smollm2_4_layers, gqa, head_ratio, heads, kv):
    from transformers import LlamaForCausalLM

    model, ids = smollm2_4_layers
    plan, cut, masked = _twins(model, Structured(ratio=0.5, head_ratio=head_ratio, gqa=gqa))
    attn = torch.ones_like(ids)
    attn[1, :5] = 0  # left padding takes the masked (non-fused) attention path
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": attn}):
            a, b = cut(ids, **kwargs).logits, masked(ids, **kwargs).logits
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(a, model(ids, attention_mask=attn).logits, atol=1e-2)
    cfg = cut.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (heads, kv, 64, 768)
    assert all(layer.self_attn.num_key_value_groups == heads // kv for layer in cut.model.layers)
    assert model.config.num_attention_heads == 9
    fresh = LlamaForCausalLM(cfg).double().eval()
    fresh.load_state_dict(cut.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, cut(ids).logits)


def test_smollm2_masked_twin_is_sensitive_to_which_heads(smollm2_4_layers):
    """The equality above is not vacuous: masking other heads than those cut gives different logits."""
    model, ids = smollm2_4_layers
    plan = plan_structured(model, Structured(ratio=0.0, head_ratio=1 / 3, gqa="kv_groups", targets=("heads",)))
    cut = frozen_copy(model)
    apply_plan(cut, plan, physical=True)
    other = frozen_copy(model)
    plan.removed = {k: (v + 1) % 3 for k, v in plan.removed.items()}
    apply_plan(other, plan, physical=False)
    with torch.no_grad():
        assert not torch.allclose(cut(ids).logits, other(ids).logits, atol=1e-4)


def test_removing_every_head_is_refused(minilm):
    model, _, _ = minilm
    with pytest.raises(NetshrinkError) as info:
        prune_(model, Structured(ratio=0.5, per_group={"*layer.2.attention.heads": 1.0}))
    assert info.value.where == "backbone.encoder.layer.2.attention.heads" and "zero attention heads" in info.value.what
    assert model.backbone.encoder.layer[2].attention.self.query.out_features == 384
