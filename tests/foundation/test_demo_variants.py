"""`netshrink demo` shows the INT8 path and a pruned + INT8 variant for the CNN and the encoder: the variant table, and
the builders run on tiny models (pruning and fine-tuning stubbed out where they would take minutes)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink import demo_variants
from netshrink.data import digits
from netshrink.demo import variants_for
from netshrink.quant.api import quant_report
from netshrink.quant.modules import Int8Conv2d, Int8Linear
from netshrink.record import layer_record
from netshrink.zoo.model import ZooModel


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()


class _TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.ffn, self.out = nn.Embedding(50, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.relu(self.ffn(self.embed(input_ids))))


def _tokenizer(texts, **_kwargs):
    ids = torch.tensor([[len(word) % 50 for word in (text.split() + [""] * 8)[:8]] for text in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _int8_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (Int8Linear, Int8Conv2d))]


@pytest.mark.parametrize("kind, int8, pruned", [
    ("cnn", ("INT8 static", demo_variants._int8_static_cnn), ("pruned 50% + INT8", demo_variants._pruned_int8_cnn)),
    ("encoder", ("INT8 dynamic", demo_variants._int8_dynamic),
     ("pruned 25% + INT8", demo_variants._pruned_int8_encoder)),
])
def test_demo_variants_use_int8_and_pruned_int8(kind, int8, pruned):
    variants = {v.name: v for v in variants_for(ZooModel("m", kind, nn.Identity()))}
    for name, build in (int8, pruned):
        assert name in variants and variants[name].build is build
        assert "INT8" in variants[name].description or "W8A8" in variants[name].description


def test_cnn_int8_variant_builds_integer_layers_on_a_tiny_cnn():
    model = _tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = demo_variants._int8_static_cnn(ZooModel("tiny", "cnn", model, task="digits", input_shape=(1, 28, 28)))
    assert len(_int8_layers(q)) == 3 and quant_report(q).folded == ["0"]
    assert layer_record(q)["0"]["method"] == "int8_static"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())       # the entry's model is kept
    x, _ = digits("test", n=16)                        # inputs like the calibration set (digits train split)
    assert (q(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_cnn_pruned_variant_quantizes_the_pruned_model_to_int8(monkeypatch):
    import netshrink.sparsity
    import netshrink.sparsity.finetune

    calls = []
    small = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 13 * 13, 10))

    def prune(model, ratio, example_inputs):
        calls.append(("prune", ratio, tuple(example_inputs[0].shape[1:])))
        return small

    def finetune(model, batches, config):
        calls.append(("finetune", model is small, config.steps))

    monkeypatch.setattr(netshrink.sparsity, "structured_prune", prune)
    monkeypatch.setattr(netshrink.sparsity.finetune, "finetune", finetune)
    q = demo_variants._pruned_int8_cnn(ZooModel("tiny", "cnn", _tiny_cnn(), task="digits", input_shape=(1, 28, 28)))
    assert calls == [("prune", 0.5, (1, 28, 28)), ("finetune", True, 300)]
    assert isinstance(q[0], Int8Conv2d) and isinstance(q[3], Int8Linear) and q[0].mode == "static"
    assert type(small[0]) is nn.Conv2d                                                 # quantized on a copy


def test_encoder_variants_quantize_to_int8_dynamic(monkeypatch):
    import netshrink.sparsity

    entry = ZooModel("tiny", "encoder", _TinyEncoder(), tokenizer=_tokenizer, task="similarity")
    q = demo_variants._int8_dynamic(entry)
    assert [type(m) for m in (q.ffn, q.out)] == [Int8Linear, Int8Linear] and q.ffn.mode == "dynamic"
    assert type(q.embed) is nn.Embedding and quant_report(q).backend == "eager"

    pruned = _TinyEncoder()
    seen = {}

    def prune(model, ratio, **kwargs):
        seen.update(ratio=ratio, head_ratio=kwargs["head_ratio"], batch=kwargs["example_inputs"][0].shape)
        return pruned

    monkeypatch.setattr(netshrink.sparsity, "structured_prune", prune)
    q = demo_variants._pruned_int8_encoder(entry)
    assert seen == {"ratio": 0.25, "head_ratio": 0.25, "batch": (16, 8)}
    assert isinstance(q.ffn, Int8Linear) and q.ffn.mode == "dynamic" and type(pruned.ffn) is nn.Linear


def test_cnn_native_variant_runs_the_pruned_model_natively(monkeypatch):
    import netshrink.sparsity
    import netshrink.sparsity.finetune
    from netshrink.native.cnn import NativeCNNModule, native_available

    torch.manual_seed(2)
    small = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 10)).eval()
    calls = []
    monkeypatch.setattr(netshrink.sparsity, "structured_prune", lambda model, ratio, example_inputs: small)
    monkeypatch.setattr(netshrink.sparsity.finetune, "finetune", lambda *args: calls.append("finetune"))
    entry = ZooModel("tiny", "cnn", _tiny_cnn(), task="digits", input_shape=(1, 28, 28))
    native = demo_variants._pruned_native_cnn(entry)
    int8 = demo_variants._pruned_int8_cnn(entry)                       # shares the pruned, fine-tuned model
    assert calls == ["finetune"] and isinstance(int8[0], Int8Conv2d)
    x, _ = digits("test", n=8)
    with torch.no_grad():
        want = small(x)
        got = native(x)
    if native_available():
        assert isinstance(native, NativeCNNModule) and native.model is not small           # a copy
        assert set(native.state_dict()) == {f"model.{k}" for k in small.state_dict()}
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(native(x.requires_grad_()), native.model(x))     # with autograd: the module itself
