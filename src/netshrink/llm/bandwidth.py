"""Memory bandwidth and the decode floor: at batch 1 every weight byte is read once per token, so
tokens/s can be at most bandwidth / weight bytes read per token."""
from __future__ import annotations

import time

import torch
from torch import nn


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best time to sum a `mib` MiB tensor (far larger than cache), all threads."""
    x = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter and buffer except the embedding table
    (of which one row is read; a tied LM head is counted once, as the head) -- packed layers count their
    kernel layout."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            total += module.weight.shape[1] * module.weight.element_size()
            continue
        kernel = getattr(module, "_kernel", None)
        if kernel is not None:
            total += sum(t.numel() * t.element_size() for t in kernel if isinstance(t, torch.Tensor))
            if getattr(module, "bias", None) is not None:
                total += module.bias.numel() * module.bias.element_size()
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if name.endswith("rotary_emb"):
                continue
            total += t.numel() * t.element_size()
    return total


def floor_tokens_per_s(weight_bytes: int, bandwidth: float) -> float:
    """Upper bound on batch-1 decode speed from memory bandwidth alone."""
    return bandwidth / weight_bytes
