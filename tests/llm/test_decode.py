"""LeanDecoder: the same logits and greedy tokens as the model's own forward, for float and packed models."""
from __future__ import annotations

import copy

import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.llm import RTN, compress_llm, fuse_projections, pack_lm_head
from netshrink.llm.decode import LeanDecoder

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),                     # q/k/v carry biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),       # q/k RMSNorm per head
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def family_model(name: str) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, **extra)
    config._attn_implementation = "sdpa"
    return getattr(transformers, model_cls)(config).eval()


def reference_decode(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits from the model's own forward with its KV cache."""
    with torch.inference_mode():
        out = model(prompt[None], use_cache=True)
        logits, cache = [out.logits[0, -1]], out.past_key_values
        tokens = [int(logits[-1].argmax())]
        for _ in range(steps - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def lean_decode(decoder: LeanDecoder, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    decoder.reset()
    logits = [decoder.forward(prompt)]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        logits.append(decoder.forward(torch.tensor([tokens[-1]])))
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float_models_match_their_own_forward(family):
    model = family_model(family)
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(1))
    want_tokens, want_logits = reference_decode(model, prompt, 6)
    got_tokens, got_logits = lean_decode(LeanDecoder(model, max_len=64), prompt, 6)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_packed_models_match_their_own_forward_and_stay_unchanged(tiny_llama, bits, group):
    packed = pack_lm_head(compress_llm(tiny_llama, RTN(bits, group, symmetric=group is None), pack=True), 8)
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(2))
    want_tokens, want_logits = reference_decode(packed, prompt, 8)
    decoder = LeanDecoder(packed, max_len=32)
    got_tokens, got_logits = lean_decode(decoder, prompt, 8)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits):              # the same kernels on the same BF16 inputs
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    after = packed.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fused = copy.deepcopy(packed)                                # a model fused beforehand decodes the same
    fuse_projections(fused)
    assert lean_decode(LeanDecoder(fused, max_len=32), prompt, 8)[0] == want_tokens


def test_appending_several_tokens_after_a_prefill_matches_one_forward(tiny_llama):
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = tiny_llama(ids[None]).logits[0, -1]
    decoder = LeanDecoder(tiny_llama, max_len=16)
    decoder.forward(ids[:5])
    got = decoder.forward(ids[5:])                               # 7 new tokens see the cache and each other
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert decoder.pos == 12


def test_generate_and_bf16(tiny_llama):
    prompt = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(4))
    want, _ = reference_decode(tiny_llama, prompt, 5)
    assert LeanDecoder(tiny_llama, max_len=16).generate(prompt, 5) == want
    bf16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    want16, logits16 = reference_decode(bf16, prompt, 3)
    got16, got_logits16 = lean_decode(LeanDecoder(bf16, max_len=16), prompt, 3)
    assert got_logits16[0].dtype == torch.bfloat16
    assert torch.allclose(got_logits16[0].float(), logits16[0].float(), atol=0.1, rtol=0.05)


def test_clear_errors(tiny_llama):
    decoder = LeanDecoder(tiny_llama, max_len=8)
    with pytest.raises(NetshrinkError, match="exceeds the decoder's cache of 8"):
        decoder.forward(torch.arange(9))
    model = family_model("mistral")
    model.config.sliding_window = 4
    with pytest.raises(NetshrinkError, match="sliding window of 4"):
        LeanDecoder(model, max_len=16).forward(torch.arange(6))
    with pytest.raises(NetshrinkError, match="unsupported architecture"):
        LeanDecoder(torch.nn.Linear(2, 2))


def test_decode_speed_uses_the_lean_loop_where_supported(tiny_llama):
    from netshrink.bench import decode_tokens_per_second

    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    lean = decode_tokens_per_second(tiny_llama, prompt, new_tokens=4, num_threads=1)
    plain = decode_tokens_per_second(tiny_llama, prompt, new_tokens=4, num_threads=1, runtime="transformers")
    assert lean["lean"] == 1.0 and plain["lean"] == 0.0
    assert lean["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0
    with pytest.raises(NetshrinkError, match="unknown decode runtime"):
        decode_tokens_per_second(tiny_llama, prompt, runtime="fast")
