"""Hugging Face folders: dense/pruned encoders load bit-exact; packed INT4 LLMs in the compressed-tensors layout."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from netshrink.errors import NetshrinkError
from netshrink.export.hf import pack_int32, save_hf
from netshrink.sparsity.masks import set_mask

from export_fixtures import pack_layers


def test_pruned_encoder_loads_bit_exact(minilm, minilm_inputs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model = copy.deepcopy(minilm.model)
    layer = model.backbone.encoder.layer[0].intermediate.dense
    set_mask(layer, layer.weight.abs() > layer.weight.abs().median())
    result = save_hf(minilm.with_model(model), tmp_path / "hf")
    assert result.layout == "dense"
    backbone = AutoModel.from_pretrained(result.path, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert tokenizer("hello world").input_ids == minilm.tokenizer("hello world").input_ids
    ids, mask = minilm_inputs
    with torch.no_grad():
        want = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        got = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)
    assert (backbone.encoder.layer[0].intermediate.dense.weight == 0).float().mean() >= 0.5


def test_pack_int32_matches_reference_bit_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    words = pack_int32(codes, 4)
    assert words.shape == (1, 2) and words.dtype == torch.int32
    expected = sum(int(c) << (4 * i) for i, c in enumerate(codes[0, :8].tolist()))
    assert words[0, 0].item() == expected - (1 << 32)  # the top nibble is 15: negative as int32
    assert words[0, 1].item() == 9


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_layout_decompresses_exactly(symmetric, smollm2, smollm2_ids, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = pack_layers(smollm2.model, symmetric=symmetric, blocks=(0,))
    result = save_hf(smollm2.with_model(model), tmp_path / "hf")
    assert result.layout == "compressed-tensors/pack-quantized" and len(result.quantized) == 3
    config = json.loads((result.path / "config.json").read_text())
    parsed = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = next(iter(parsed.config_groups.values()))
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 32
    assert scheme.weights.symmetric is symmetric
    tensors = load_file(str(result.path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    layer = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    assert ("weight_zero_point" in layer) is (not symmetric)
    dense = PackedQuantizationCompressor.decompress(layer, scheme)["weight"]
    assert torch.equal(dense.float(), model.model.layers[0].mlp.down_proj.dequantized_weight())
    if symmetric:  # transformers' compressed-tensors loader (asymmetric zero points: see docs/export.md)
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
        with torch.no_grad():
            want, got = model(smollm2_ids).logits, loaded(smollm2_ids).logits
        assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.999


def test_refuses_non_transformers_model(digit_cnn, tmp_path):
    with pytest.raises(NetshrinkError, match="not a transformers model"):
        save_hf(digit_cnn, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
def test_int8_encoder_in_int_quantized_layout(minilm, minilm_int8, tmp_path):
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    result = save_hf(minilm.with_model(minilm_int8), tmp_path / "hf")
    assert result.layout == "compressed-tensors/int-quantized" and len(result.quantized) == 37  # 36 + pooler
    config = json.loads((result.path / "config.json").read_text())
    scheme = next(iter(QuantizationConfig.model_validate(config["quantization_config"]).config_groups.values()))
    assert scheme.input_activations.dynamic and scheme.input_activations.strategy == "token"
    tensors = load_file(str(result.path / "model.safetensors"))
    name = "encoder.layer.2.output.dense"
    layer = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    assert layer["weight"].dtype == torch.int8
    dense = NaiveQuantizationCompressor.decompress(layer, scheme)["weight"]
    expected = minilm_int8.backbone.encoder.layer[2].output.dense.dequantized_weight()
    assert torch.equal(dense.float(), expected)
