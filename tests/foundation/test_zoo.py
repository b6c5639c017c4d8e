"""Every zoo entry on its real weights, and each kind of user model."""
from __future__ import annotations

import torch
import pytest

from netshrink import eval as evaluation
from netshrink import zoo
from netshrink.errors import NetshrinkError


def test_digit_cnn_scores_about_90_percent_on_digits(digit_cnn):
    scores = evaluation.evaluate(digit_cnn)
    assert scores["samples"] == 1797
    assert 0.89 <= scores["accuracy"] <= 0.92  # the package's CNN scores about 90.7% on scikit-learn digits


def test_minilm_ranks_related_sentences_above_unrelated(minilm):
    texts = ["A man is playing a guitar on stage.", "Someone performs music with a guitar.",
             "The stock market fell sharply on Tuesday."]
    vectors = evaluation.embed(minilm.model, minilm.tokenizer, texts)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    related, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert related > 0.5 > unrelated


def test_minilm_agrees_with_sentence_transformers_pooling(minilm):
    """Mean pooling over the attention mask, as sentence-transformers defines it, computed by hand."""
    enc = minilm.tokenizer(["short one", "a noticeably longer sentence with padding in the batch"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = minilm.model.backbone(**enc).last_hidden_state.double()
        got = minilm.model(enc["input_ids"], enc["attention_mask"]).double()
    mask = enc["attention_mask"].unsqueeze(-1).double()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)


def test_smollm2_perplexity_on_real_prose_is_plausible(smollm2):
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.model.config.num_key_value_heads == 3
    scores = evaluation.perplexity(smollm2.model, smollm2.tokenizer, __import__("netshrink").data.prose("lee"),
                                   max_length=256, stride=128, max_tokens=512)
    assert scores["tokens"] == 511
    assert 5 < scores["perplexity"] < 60


def test_example_inputs_have_requested_shape(minilm, smollm2, digit_cnn):
    ids, mask = minilm.example_inputs(batch=4, seq_len=64)
    assert ids.shape == mask.shape == (4, 64) and not torch.equal(ids[0], ids[1])
    (tokens,) = smollm2.example_inputs(batch=2, seq_len=16)
    assert tokens.shape == (2, 16)
    (images,) = digit_cnn.example_inputs(batch=3)
    assert images.shape == (3, 1, 28, 28)


def test_user_models_hf_dir_torchscript_onnx_and_module_attr(tmp_path, digit_cnn):
    from netshrink.zoo.builtin import minilm_dir

    hf = zoo.load(str(minilm_dir()))
    assert hf.kind == "encoder" and hf.tokenizer is not None

    x = digit_cnn.example_inputs(batch=2)[0]
    with torch.inference_mode():
        want = digit_cnn.model(x)
    scripted = torch.jit.trace(digit_cnn.model, x)
    ts_path = tmp_path / "cnn.pt"
    torch.jit.save(scripted, ts_path)
    assert torch.allclose(zoo.load(str(ts_path)).model(x), want, atol=1e-5)

    onnx_path = tmp_path / "cnn.onnx"
    torch.onnx.export(digit_cnn.model, (x,), str(onnx_path), input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    onnx_entry = zoo.load(str(onnx_path))
    assert onnx_entry.kind == "onnx" and onnx_entry.input_shape == (1, 28, 28)
    assert torch.allclose(onnx_entry.model(x), want, atol=1e-4)

    from safetensors.torch import save_file

    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in digit_cnn.model.state_dict().items()}, str(weights))
    user = zoo.load("netshrink.zoo.builtin:DigitCNN", weights=str(weights))
    assert torch.allclose(user.model(x), want)


def test_unknown_model_suggests_close_name():
    with pytest.raises(NetshrinkError, match="did you mean 'minilm'"):
        zoo.load("minilmm")
