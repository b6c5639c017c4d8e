"""BF16 attention for transformers models: the score and value matmuls in BF16 (AVX-512 BF16), softmax in FP32.

With int8 projections the attention matmuls and softmax become the largest remaining cost of an encoder
(at 128 tokens they are ~10% of the FLOPs but run at FP32 speed). Registered as a transformers attention
implementation, so the model's own modules call it and torch.compile fuses the mask, scaling and softmax.
"""
from __future__ import annotations

import torch
from torch import nn

NAME = "netshrink_bf16"


def bf16_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """softmax(Q K^T * scale + mask) V with BF16 matmuls; returns [batch, seq, heads, head_dim] like SDPA does."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.to(torch.bfloat16), key.to(torch.bfloat16).transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    out = torch.matmul(probs, value.to(torch.bfloat16)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Additive [batch, 1, 1, kv] mask (0 keep, -inf drop) from the padding mask of a bidirectional encoder.

    Broadcast over queries instead of a materialised [batch, 1, q, kv] boolean mask, so the fused softmax reads one
    value per key rather than evaluating the mask per score.
    """
    if attention_mask is None:
        return None
    keep = attention_mask[:, kv_offset: kv_offset + kv_length].bool()
    zero = torch.zeros((), dtype=torch.float32, device=keep.device)
    return torch.where(keep, zero, torch.full_like(zero, float("-inf")))[:, None, None, :]


def register() -> str:
    """Register the BF16 attention and its padding mask with transformers; returns the implementation name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, bf16_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, padding_mask)
    return NAME


def is_bidirectional(model: nn.Module) -> bool:
    """True when `model` has attention modules and none of them is causal (an encoder such as BERT)."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def use_bf16_attention(model: nn.Module) -> bool:
    """Switch the transformers encoders inside `model` to BF16 attention; False when there is none to switch.

    Decoders keep their own attention: the padding mask above has no causal part.
    """
    switched = False
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(sub, "set_attn_implementation") and is_bidirectional(sub):
            register()
            sub.set_attn_implementation(NAME)
            switched = True
    return switched
