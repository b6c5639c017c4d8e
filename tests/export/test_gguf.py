"""GGUF: SmolLM2 written as Q8_0 / Q4_0, read back with gguf.GGUFReader, loaded by transformers and llama.cpp."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.export.gguf import export_gguf, permute_rope, read_gguf


@pytest.fixture(scope="module")
def q8(smollm2, tmp_path_factory):
    return export_gguf(smollm2, tmp_path_factory.mktemp("gguf") / "smollm2-q8_0.gguf", qtype="Q8_0")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].double()


def test_read_back_metadata_and_tensors(q8, smollm2):
    back = read_gguf(q8.path)
    meta = back["metadata"]
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert meta["llama.attention.head_count"] == 9 and meta["llama.attention.head_count_kv"] == 3
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 49152
    assert len(back["tensors"]) == 272  # tied embeddings: no separate output.weight
    kind, w = back["tensors"]["blk.3.ffn_up.weight"]
    assert kind == "Q8_0" and back["tensors"]["blk.3.attn_norm.weight"][0] == "F32"
    ref = smollm2.model.model.layers[3].mlp.up_proj.weight.detach().numpy()
    assert np.abs(w - ref).max() <= np.abs(ref).max() / 127  # within one Q8_0 step of the block maximum
    _, q = back["tensors"]["blk.3.attn_q.weight"]
    q_ref = permute_rope(smollm2.model.model.layers[3].self_attn.q_proj.weight.detach().numpy(), 9)
    assert np.abs(q - q_ref).max() <= np.abs(q_ref).max() / 127


def test_transformers_loads_the_export(q8, smollm2, smollm2_ids):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(q8.path.parent, gguf_file=q8.path.name, dtype=torch.float32).eval()
    ref, got = _logits(smollm2.model, smollm2_ids), _logits(loaded, smollm2_ids)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)  # one per position; Q8_0 re-rounds every weight
    assert cos.min() > 0.995 and cos.mean() > 0.999
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95


def test_q4_0_with_tokenizer_from_hugging_face_and_sizes(smollm2, q8, tmp_path):
    # the bare module + HF tokenizer: tokenizer metadata built from the BPE vocabulary and merges
    q4 = export_gguf(smollm2.model, tmp_path / "q4.gguf", qtype="Q4_0", tokenizer=smollm2.tokenizer)
    meta = read_gguf(q4.path)["metadata"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.eos_token_id"] == 2
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) > 48000
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        llm = Llama(model_path=str(q4.path), n_ctx=64, n_threads=2, verbose=False)
        text = "In 2023, 1234567 people said: héllo!  ok"
        assert llm.tokenize(text.encode(), add_bos=False) == smollm2.tokenizer(text).input_ids
    assert set(q4.tensor_types.values()) == {"Q4_0", "Q8_0", "F32"}  # embeddings kept at Q8_0, as llama.cpp does
    assert q4.tensor_types["token_embd.weight"] == "Q8_0"
    params = sum(p.numel() for p in smollm2.model.parameters())
    assert q8.size_bytes < params * 1.1 and q4.size_bytes < 0.7 * q8.size_bytes


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_export_like_netshrink(q8, smollm2):
    from llama_cpp import Llama

    llm = Llama(model_path=str(q8.path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    prompt = "The capital of France is"
    ids = smollm2.tokenizer(prompt).input_ids
    assert llm.tokenize(prompt.encode(), add_bos=False) == ids  # same tokenizer from the GGUF metadata
    text = llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    with torch.no_grad():
        out = smollm2.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert text == smollm2.tokenizer.decode(out[0, len(ids):])
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    ref = _logits(smollm2.model, torch.tensor([ids])).numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99

    # Perplexity of the same real prose under llama.cpp and under netshrink's model (which the export came from).
    prose = smollm2.tokenizer(__import__("netshrink").data.prose("lee")).input_ids[:120]
    llm.reset()
    llm.eval(prose)
    def ppl(logits: np.ndarray) -> float:
        logits = logits[:-1] - logits[:-1].max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return float(np.exp(-logp[np.arange(len(prose) - 1), prose[1:]].mean()))
    ppl_llama = ppl(np.array(llm.scores[: len(prose)], dtype=np.float64))
    ppl_netshrink = ppl(_logits(smollm2.model, torch.tensor([prose])).numpy().astype(np.float64))
    assert abs(ppl_llama / ppl_netshrink - 1) < 0.03  # Q8_0 re-rounding of Q4_1-grid weights costs well under 3%


def test_refuses_other_architectures_and_types(digit_cnn, smollm2, tmp_path):
    with pytest.raises(NetshrinkError, match="cannot be expressed by this GGUF exporter"):
        export_gguf(digit_cnn, tmp_path / "cnn.gguf")
    with pytest.raises(NetshrinkError, match="Q4_K.*cannot be written"):
        export_gguf(smollm2, tmp_path / "k.gguf", qtype="Q4_K")
    assert list(tmp_path.iterdir()) == []
