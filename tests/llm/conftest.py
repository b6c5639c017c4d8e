"""Shared fixtures: a tiny random Llama (2 layers, hidden 64), a byte tokenizer, and calibration ids."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


class ByteTokenizer:
    """Text -> UTF-8 bytes as token ids (enough for calibration and perplexity on the tiny model)."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)[None]

        class Out(dict):
            input_ids = ids
        out = Out(input_ids=ids)
        return out


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def calib_ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 256, (8, 32))


@pytest.fixture()
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return dict(TINY)


@pytest.fixture(autouse=True)
def _no_grad_one_thread():
    """No autograd, and one intra-op thread: these tensors are tiny, and on a busy machine two OpenMP threads
    spin-waiting for each other made every small op 10-30x slower. The previous thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
