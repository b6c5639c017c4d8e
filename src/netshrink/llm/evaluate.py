"""Quality of a compressed LLM: perplexity on real prose and greedy-generation agreement with the float model."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netshrink.eval.perplexity import perplexity


@torch.inference_mode()
def greedy_tokens(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation [new_tokens] of one prompt (KV cache on)."""
    out = model.generate(prompt_ids[None], attention_mask=torch.ones_like(prompt_ids)[None], do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, prompt_ids.numel():]


def greedy_agreement(model: nn.Module, reference: nn.Module, tokenizer: Any, prompts: list[str],
                     new_tokens: int = 32) -> dict[str, float]:
    """Share of greedy tokens equal to the reference's, position by position, and the mean matching prefix."""
    same, total, prefix = 0, 0, 0
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        a, b = greedy_tokens(model, ids, new_tokens), greedy_tokens(reference, ids, new_tokens)
        n = min(a.numel(), b.numel())
        eq = (a[:n] == b[:n])
        same += int(eq.sum())
        total += n
        prefix += int(eq.long().cumprod(0).sum())
    return {"agreement": same / max(total, 1), "matching_prefix": prefix / max(len(prompts), 1)}


def llm_quality(model: nn.Module, tokenizer: Any, text: str, reference: nn.Module | None = None,
                prompts: list[str] | None = None, max_length: int = 512, stride: int = 256,
                max_tokens: int | None = 4096, new_tokens: int = 32) -> dict[str, float]:
    """Perplexity record, plus greedy agreement with `reference` when given."""
    record = perplexity(model, tokenizer, text, max_length=max_length, stride=stride, max_tokens=max_tokens)
    if reference is not None and prompts:
        record.update(greedy_agreement(model, reference, tokenizer, prompts, new_tokens))
    return record
