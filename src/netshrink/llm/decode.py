"""Batch-1 decoding in a lean loop: the model's own Linears and norms, without transformers' per-layer machinery.

At batch 1 a small decoder spends most of each token outside its matmuls: transformers builds masks, cache
objects and position tensors, and calls some twenty Python modules per block. That costs about as much per block
as the packed INT4 matmuls do. `LeanDecoder` runs the same computation as a plain loop over the blocks: a KV cache
preallocated once, the rotary table computed once, one packed matmul for q/k/v and one for gate/up (`concat_packed`,
held by the decoder: the model is not changed), and the LM head on the last position only. Every Linear is the
model's own module, so packed, float and SmoothQuant layers all work. Llama, Mistral, Qwen2 and Qwen3 blocks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm.arch import arch_of
from netshrink.llm.fuse import FusedSlice, concat_packed
from netshrink.llm.packed_linear import PackedLinear


def _direct(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """[T, in] float32 -> [T, out] float32 through `module`, calling a packed layer's kernel directly.

    The same ops as PackedLinear.forward (cast to BF16, kernel, cast back), so the result is bit-identical, without
    its per-call reshapes and checks: at batch 1 those cost about a third of a SmolLM2-sized kernel call."""
    if not isinstance(module, PackedLinear) or module.bias is not None:
        return module
    kind = module.prepare()
    kernel, n = module._kernel, module.out_features
    if kind == "int4" and kernel[4] == module.in_features:
        _, packed, scales_zeros, group, _ = kernel
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        if packed.shape[0] == n:
            return lambda x: mm(x.to(torch.bfloat16), packed, group, scales_zeros).float()
        return lambda x: mm(x.to(torch.bfloat16), packed, group, scales_zeros)[:, :n].float()
    if kind == "int8":
        _, weight, scales = kernel
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales).float()
    return module


def _fused(modules: list[nn.Module]) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """One call that returns the concatenated outputs of sibling projections, and their widths."""
    widths = [m.out_features for m in modules]
    if all(isinstance(m, FusedSlice) for m in modules) and len({id(m._shared[0]) for m in modules}) == 1:
        return _direct(modules[0]._shared[0].fused), widths   # already fused by fuse_projections
    if all(isinstance(m, PackedLinear) for m in modules):
        return _direct(concat_packed(modules)), widths
    return (lambda x: torch.cat([m(x) for m in modules], dim=-1)), widths


class _Block:
    """What one decoder block needs for a step, taken from the model's modules."""

    def __init__(self, block: nn.Module):
        attn, mlp = block.self_attn, block.mlp
        self.norm1, self.norm2 = block.input_layernorm, block.post_attention_layernorm
        self.qkv, self.qkv_widths = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up, self.gate_up_widths = _fused([mlp.gate_proj, mlp.up_proj])
        self.o_proj, self.down_proj, self.act = _direct(attn.o_proj), _direct(mlp.down_proj), mlp.act_fn
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3
        self.scaling = attn.scaling


def sliding_window(config) -> int | None:
    """The attention window a decoder must stay within, or None (no window, or the model does not use it)."""
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


def check_length(end: int, max_len: int, window: int | None, where: str) -> None:
    """Refuse a sequence of `end` tokens longer than the decoder's cache or the model's sliding window."""
    if end > max_len:
        raise NetshrinkError(f"sequence of {end} tokens exceeds the decoder's cache of {max_len}",
                             where=where, hint="create it with a larger max_len")
    if window is not None and end > window:
        raise NetshrinkError(f"sequence of {end} tokens exceeds the model's sliding window of {window}",
                             where=where, hint="decode it with the model's own forward")


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanDecoder:
    """Greedy batch-1 decoding of a causal LM with a preallocated KV cache of `max_len` positions."""

    def __init__(self, model: nn.Module, max_len: int = 1024):
        arch = arch_of(model)
        config = model.config
        self.model, self.max_len = model, max_len
        self.blocks = [_Block(block) for block in model.get_submodule(arch.layers)]
        self.embed, self.norm = model.get_submodule(arch.embed), model.get_submodule(arch.norm)
        self.lm_head = _direct(model.get_submodule(arch.lm_head))
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.window = sliding_window(config)
        dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        with torch.inference_mode():
            positions = torch.arange(max_len)[None]
            cos, sin = model.get_submodule("model.rotary_emb")(torch.zeros(1, dtype=dtype), positions)
        self.cos, self.sin = cos[0, :, None, :].to(dtype), sin[0, :, None, :].to(dtype)   # [max_len, 1, head_dim]
        shape = (len(self.blocks), self.kv_heads, max_len, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.pos = 0

    def reset(self) -> None:
        """Forget the cached tokens (the cache memory is kept)."""
        self.pos = 0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Append the tokens `ids` ([T] or [1, T]) to the sequence; the logits [vocab] of the last of them."""
        ids = ids.reshape(-1)
        T, start = ids.shape[0], self.pos
        end = start + T
        check_length(end, self.max_len, self.window, "LeanDecoder")
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[start:end], self.sin[start:end]
        mask, causal = None, False
        if T > 1 and start == 0:
            causal = True
        elif T > 1:                                   # new tokens see the cache and the earlier new tokens
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        x = self.embed(ids)                           # [T, hidden]
        for i, b in enumerate(self.blocks):
            qkv = b.qkv(_rms_norm(x, b.norm1))
            if b.q_norm is None:                      # rotate q and k in one pass
                qk = _rotate(qkv[:, : (H + KV) * D].view(T, H + KV, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D: (H + KV) * D].view(T, KV, D)
                q = _rotate(_rms_norm(q, b.q_norm), cos, sin)
                k = _rotate(_rms_norm(k, b.k_norm), cos, sin)
            v = qkv[:, (H + KV) * D:].view(T, KV, D)
            self.k_cache[i, :, start:end] = k.transpose(0, 1)
            self.v_cache[i, :, start:end] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k_cache[i, None, :, :end],
                                                 self.v_cache[i, None, :, :end], attn_mask=mask, is_causal=causal,
                                                 scale=b.scaling, enable_gqa=KV != H)
            x = x + b.o_proj(out[0].transpose(0, 1).reshape(T, H * D))
            gate, up = b.gate_up(_rms_norm(x, b.norm2)).split(b.gate_up_widths, dim=-1)
            x = x + b.down_proj(b.act(gate) * up)
        self.pos = end
        return self.lm_head(_rms_norm(x[-1:], self.norm))[0]

    def generate(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        """Greedy continuation of the prompt `ids`: the `new_tokens` token ids after it (the cache starts empty)."""
        self.reset()
        logits = self.forward(ids)
        out: list[int] = []
        for _ in range(new_tokens):
            out.append(int(logits.argmax()))
            if len(out) == new_tokens:
                break
            logits = self.forward(torch.tensor([out[-1]]))
        return out
