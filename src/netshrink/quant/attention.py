"""BF16 attention for transformers models: the score and value matmuls in BF16 (AVX-512 BF16), softmax in FP32.

With int8 projections the attention matmuls and softmax become the largest remaining cost of an encoder
(at 128 tokens they are ~10% of the FLOPs but run at FP32 speed). Registered as a transformers attention
implementation, so the model's own modules call it and torch.compile fuses the mask, scaling and softmax.
"""
from __future__ import annotations

import torch
from torch import nn

NAME = "netshrink_bf16"


SCORES_PER_CHUNK = 1 << 21  # ~2M scores (8 MB in FP32) per chunk at 128 tokens: one chunk's softmax stays in cache
NOMINAL_TOKENS = 128        # the chunk size in sequences is set for this length, so it never depends on the input


def bf16_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """softmax(Q K^T * scale + mask) V with BF16 matmuls; returns [batch, seq, heads, head_dim] like SDPA does.

    The batch is cut into chunks of sequences (about SCORES_PER_CHUNK scores at 128 tokens): the fused softmax
    then reads and writes its scores in cache, where one pass over a whole batch-32 score tensor (25 MB in FP32)
    measured 4x slower per layer. The chunk size depends only on the head count, never on the input's length, so
    a compiled model does not specialise (and recompile) on every new sequence length; batches up to one chunk take
    a single pass.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, heads = query.shape[0], query.shape[1]
    step = max(1, SCORES_PER_CHUNK // (heads * NOMINAL_TOKENS * NOMINAL_TOKENS))
    if batch <= step:
        return _attend(query, key, value, attention_mask, scale).transpose(1, 2).contiguous(), None
    whole_mask = attention_mask is None or attention_mask.shape[0] == 1     # absent, or broadcast over the batch
    outs = [_attend(query[i:i + step], key[i:i + step], value[i:i + step],
                    attention_mask if whole_mask else attention_mask[i:i + step], scale)
            for i in range(0, batch, step)]
    return torch.cat(outs).transpose(1, 2).contiguous(), None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    scores = torch.matmul(query.to(torch.bfloat16), key.to(torch.bfloat16).transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    return torch.matmul(probs, value.to(torch.bfloat16)).to(query.dtype)


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Additive [batch, 1, 1, kv] mask (0 keep, -inf drop) from the padding mask of a bidirectional encoder.

    Broadcast over queries instead of a materialised [batch, 1, q, kv] boolean mask, so the fused softmax reads one
    value per key rather than evaluating the mask per score.
    """
    if attention_mask is None:
        return None
    return additive_bias(attention_mask[:, kv_offset: kv_offset + kv_length])


@torch.library.custom_op("netshrink::additive_bias", mutates_args=())
def additive_bias(keep: torch.Tensor) -> torch.Tensor:
    """The float bias [batch, 1, 1, kv] of a 0/1 padding mask [batch, kv], as one opaque op.

    Opaque on purpose: inductor would otherwise inline it into every layer's softmax loop and re-derive the bias
    from the int64 mask per score, which measured 3x slower than reading a ready float bias (5.8 vs 2.0 ms per
    layer at batch 32).
    """
    zero = torch.zeros((), dtype=torch.float32, device=keep.device)
    return torch.where(keep.bool(), zero, torch.full_like(zero, float("-inf")))[:, None, None, :].contiguous()


@additive_bias.register_fake
def _(keep: torch.Tensor) -> torch.Tensor:
    return keep.new_empty((keep.shape[0], 1, 1, keep.shape[1]), dtype=torch.float32)


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
