"""Every method on the real SmolLM2-135M, on a very small calibration set (4 x 64 tokens of Austen's Emma)."""
from __future__ import annotations

import copy

import pytest
import torch

from netshrink.data.text import austen, prose
from netshrink.eval.perplexity import perplexity
from netshrink.llm import AWQ, GPTQ, RTN, Magnitude, SmoothQuant, SparseGPT, Wanda, calibration_ids, compress_llm
from netshrink.llm.pipeline import compress_block
from netshrink.llm.runner import BlockRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from netshrink.zoo import load

    zm = load("smollm2")
    ids = calibration_ids(austen("emma"), zm.tokenizer, n_samples=4, seq_len=64)
    return zm.model, zm.tokenizer, ids


@pytest.fixture(scope="module")
def first_block_io(smol):
    model, _, ids = smol
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids).float()
    runner = BlockRunner(model.model.rotary_emb, ids.shape[1], hidden.shape[-1], batch_size=4)
    block = model.model.layers[0]
    return block, hidden, runner, runner.run(block, hidden)


def block_error(config, first_block_io) -> float:
    block, hidden, runner, ref = first_block_io
    block = copy.deepcopy(block)
    records, out = compress_block(block, hidden, runner, config, "model.layers.0", pack=False)
    assert len(records) == 7 and torch.isfinite(out).all()
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("bits,group", [(3, 128)])
def test_gptq_and_awq_beat_rtn_on_a_real_block(first_block_io, bits, group):
    rtn = block_error(RTN(bits, group), first_block_io)
    assert block_error(GPTQ(bits, group), first_block_io) < rtn
    assert block_error(AWQ(bits, group), first_block_io) < rtn


def test_pruning_and_smoothquant_on_a_real_block(first_block_io):
    mag = block_error(Magnitude(0.5), first_block_io)
    assert block_error(Wanda(0.5), first_block_io) < mag
    assert block_error(SparseGPT(0.5), first_block_io) < mag
    assert block_error(SmoothQuant(0.5), first_block_io) < 0.01


def test_packed_int4_end_to_end_perplexity(smol):
    model, tok, ids = smol
    text = prose("lee")
    base = perplexity(model, tok, text, max_length=256, stride=256, max_tokens=512)["perplexity"]
    packed = compress_llm(model, RTN(4, 128), pack=True)
    assert type(packed.model.layers[5].mlp.down_proj).__name__ == "PackedLinear"
    ppl = perplexity(packed, tok, text, max_length=256, stride=256, max_tokens=512)["perplexity"]
    assert base < ppl < 1.6 * base
