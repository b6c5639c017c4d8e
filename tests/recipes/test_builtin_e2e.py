"""Every built-in recipe runs end to end on the zoo model it suits (training steps and calibration shrunk)."""
from __future__ import annotations

import copy

import pytest
import torch

from netshrink import data
from netshrink.eval import accuracy
from netshrink.recipes.loader import load_recipe
from netshrink.recipes.runner import compress

pytestmark = pytest.mark.slow


def shrink(name: str, **changes: dict) -> dict:
    """The built-in recipe `name` with short training, small calibration and eager kernels (no compile wait)."""
    raw = copy.deepcopy(load_recipe(name).raw)
    for item in raw["stages"]:
        for kind, body in item.items():
            for key, small in (("steps", 4), ("calibration_samples", 64), ("samples", 4), ("seq_len", 64)):
                if key in body:
                    body[key] = small
            if kind == "quantize" and body["method"] in ("int8-static", "int8-dynamic", "bf16", "fp16"):
                body["backend"] = "eager"
            body.update(changes.get(kind, {}))
    return raw


def methods(result) -> dict[str, set]:
    """Layer name -> the `method` values the layer record holds for it."""
    return {name: {v for k, v in fields.items() if k == "method"} for name, fields in result.record.items()}


# ---- digit CNN -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_test():
    return data.digits("test", n=300)


def test_int8_ptq_on_digit_cnn(digit_cnn, digits_test):
    x, y = digits_test
    result = compress(digit_cnn, "int8-ptq")
    layers = [n for n, m in digit_cnn.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(result.record[n]["method"] == "int8_static" and result.record[n]["bits"] == 8 for n in layers)
    before = accuracy(digit_cnn.model, x, y)["accuracy"]
    after = accuracy(result.model, x, y)["accuracy"]
    assert abs(before - after) <= 0.02  # W8A8 with real calibration stays within two points here
    assert not hasattr(digit_cnn.model, "_netshrink_record") or not digit_cnn.model._netshrink_record


def test_int8_qat_on_digit_cnn(digit_cnn, digits_test):
    x, y = digits_test
    result = compress(digit_cnn, shrink("int8-qat"))
    assert {"qat"} <= set().union(*methods(result).values())
    assert accuracy(result.model, x, y)["accuracy"] >= accuracy(digit_cnn.model, x, y)["accuracy"] - 0.03


def test_structured50_int8_on_digit_cnn(digit_cnn, digits_test):
    x, y = digits_test
    result = compress(digit_cnn, shrink("cnn-structured50-int8"))
    convs = [(n, m) for n, m in digit_cnn.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for name, conv in convs:  # every conv lost half its output channels (the last layer keeps the class count)
        assert result.model.get_submodule(name).out_channels == conv.out_channels // 2
    assert [s.layers_changed > 0 for s in result.steps] == [True, False, True]
    assert accuracy(result.model, x, y)["accuracy"] > 0.5  # 4 recovery steps: degraded, but far above chance (0.1)


def test_2of4_fp16_on_digit_cnn(digit_cnn):
    result = compress(digit_cnn, shrink("gpu-2of4-fp16"))
    record = result.record
    pruned = [n for n, f in record.items() if f.get("pattern") == "2:4"]
    assert pruned
    for name in pruned:
        module = result.model.get_submodule(name)
        layer = getattr(module, "layer", getattr(module, "inner", module))
        w = layer.weight.detach().float()
        w2 = w.movedim(1, -1).reshape(w.shape[0], -1) if w.dim() == 4 else w
        if w2.shape[1] % 4 == 0:
            assert int((w2.view(w2.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name
        assert record[name]["method"] == "fp16"


def test_compress_export_onnx_runs(digit_cnn, digits_test, tmp_path):
    import numpy as np
    import onnxruntime as ort

    recipe = load_recipe("int8-ptq").with_export("onnx")
    result = compress(digit_cnn, recipe, out=tmp_path)
    path = result.exports["onnx"]
    assert path.exists()
    x, _ = digits_test
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x[:64].numpy()}
    onnx_out = session.run(None, feed)[0]
    with torch.inference_mode():
        torch_out = result.model(x[:64]).numpy()
    assert (onnx_out.argmax(1) == torch_out.argmax(1)).mean() >= 0.95
    assert np.isfinite(onnx_out).all()


def test_cli_compress_with_export(digit_cnn, tmp_path, capsys):
    from netshrink.cli import main

    out = tmp_path / "run"
    code = main(["compress", "digit-cnn", "--recipe", "bf16", "--out", str(out), "--export", "torchscript",
                 "--n", "100"])
    assert code == 0
    assert (out / "model").is_dir() and (out / "report.html").exists()
    scripted = torch.jit.load(str(out / "model-torchscript.pt"))
    x, _ = data.digits("test", n=8)
    with torch.inference_mode():
        ref = digit_cnn.model(x)
    assert (scripted(x).float().argmax(1) == ref.argmax(1)).float().mean() >= 0.75


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-ptq", "bf16"])
def test_encoder_recipes_keep_embeddings(minilm, name):
    from netshrink.eval import embedding_fidelity

    result = compress(minilm, shrink(name))
    changed = methods(result)
    assert sum(1 for m in changed.values() if m) >= 36  # every Linear of the 6 layers (+ pooler)
    fidelity = embedding_fidelity(result.model, minilm.model, minilm.tokenizer, data.sentences(16))
    assert fidelity["mean_cosine"] > 0.97, fidelity


# ---- SmolLM2 (truncated to one decoder layer) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_llm(smollm2):
    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return smollm2.with_model(model)


@pytest.mark.parametrize("name, quant, prune", [
    ("llm-edge-gptq4", "gptq", "wanda"), ("llm-edge-awq4", "awq", "wanda"),
    ("llm-edge-2of4-gptq4", "gptq", "sparsegpt")])
def test_llm_edge_recipes(small_llm, name, quant, prune):
    result = compress(small_llm, shrink(name))
    record = result.record
    proj = "model.layers.0.mlp.down_proj"
    assert record[proj]["bits"] == 4 and quant in record[proj]["method"]
    weight = result.model.get_submodule(proj).weight.detach()
    zeros = float((weight == 0).float().mean())
    if prune == "sparsegpt":  # 2:4: at most two non-zeros in every group of four inputs
        assert int((weight.view(weight.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    else:  # the 25% Wanda zeros stay zero: zero is on the grid, and GPTQ keeps pruned weights at the zero code
        assert zeros >= 0.24
    ids = small_llm.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = result.model(ids).logits
    assert torch.isfinite(logits).all()
    assert small_llm.model.model.layers[0].mlp.down_proj.weight.ne(0).float().mean() > 0.99  # input untouched
