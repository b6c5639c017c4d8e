"""Causal-LM perplexity with a sliding window (each token scored once, with up to max_length - stride of context)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from netshrink.errors import NetshrinkError


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer: Any, text: str, max_length: int = 512, stride: int = 256,
               max_tokens: int | None = 4096) -> dict[str, float]:
    """exp(mean negative log-likelihood) of `text`, as in Hugging Face's fixed-length-model perplexity guide."""
    if not 0 < stride <= max_length:
        raise NetshrinkError(f"need 0 < stride <= max_length, got stride={stride}, max_length={max_length}", where="perplexity")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise NetshrinkError("text is too short to score (fewer than 2 tokens)", where="perplexity")
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        new = end - prev_end  # tokens not scored by an earlier window
        output = model(window)
        logits = getattr(output, "logits", output)[0, :-1].float()
        targets = window[0, 1:]
        losses = nn.functional.cross_entropy(logits, targets, reduction="none")
        losses = losses[-min(new, losses.numel()):]
        nll_sum += float(losses.double().sum())
        scored += losses.numel()
        prev_end = end
        if end == ids.numel():
            break
    mean_nll = nll_sum / scored
    if not math.isfinite(mean_nll):
        raise NetshrinkError("perplexity is not finite: the model produced NaN or Inf logits", where="perplexity")
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": float(scored)}
